"""fasttfm.patch on Hugging Face transformers models (optional dependency, pinned in
requirements.txt): attn_implementation="fasttfm" (causal, sliding window, GQA, padding masks) and
the norm swaps. Tiny models from configs with random weights (nothing downloaded), fp32; logits and
every parameter gradient are compared with the unpatched model (HF's sdpa implementation)."""
import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttfm  # noqa: E402
import fasttfm.ops.attention as attn_ops  # noqa: E402
from fasttfm import hf_masks  # noqa: E402
from tests.test_patch import NoHostSync, assert_grads_match  # noqa: E402
from fasttfm.patch import HF_NORMS  # noqa: E402

VOCAB, SEQ = 128, 24


def make(kind, layers=2, hidden=64, heads=4):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=VOCAB,
                  max_position_embeddings=64, attention_dropout=0.0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=VOCAB, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # window 8 < sequence 24: the sliding window changes the result
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **common))
    model.loss_type = "ForCausalLM"  # else GPT-2 warns (warning_once: a graph break under compile)
    return model.train()


@contextlib.contextmanager
def count_paths():
    """Counts fasttfm kernel calls (no mask) and masked SDPA calls made by fasttfm.hf."""
    calls = {"kernel": 0, "masked": 0}
    real_attention, real_sdpa = attn_ops.attention, attn_ops.scaled_dot_product_attention

    def attention(*a, **k):
        calls["kernel"] += 1
        return real_attention(*a, **k)

    def sdpa(*a, **k):
        calls["masked"] += 1
        return real_sdpa(*a, **k)

    attn_ops.attention, attn_ops.scaled_dot_product_attention = attention, sdpa
    try:
        yield calls
    finally:
        attn_ops.attention, attn_ops.scaled_dot_product_attention = real_attention, real_sdpa


def batch(padded):
    ids = torch.randint(0, VOCAB, (2, SEQ))
    mask = None
    if padded:
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, :5] = 0  # left padding
    return ids, mask


def run(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_logits_and_grads_match(kind, padded):
    model = make(kind)
    ref = copy.deepcopy(model)
    ids, mask = batch(padded)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    handle = fasttfm.patch(model)
    assert model.config._attn_implementation == "fasttfm"
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys
    norms = [e for e in handle.replaced if "norm" in e.target.lower()]
    assert len(norms) == 5, handle.report()
    with count_paths() as calls:
        logits = run(model, ids, mask)
    # the flash kernel (causal, GQA, Mistral's window), padded or not (key_padding_mask)
    assert calls == {"kernel": 2, "masked": 0}, calls
    ref_logits = run(ref, ids, mask)
    torch.testing.assert_close(logits, ref_logits)
    assert_grads_match(ref, model)

    handle.undo()
    assert model.config._attn_implementation == ref.config._attn_implementation
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())
    model.zero_grad()
    torch.testing.assert_close(run(model, ids, mask), ref_logits)


def test_rms_norm_matches_hf_numerics_in_low_precision():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for x_dtype, w_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                             (torch.float16, torch.float16)):
        ref = LlamaRMSNorm(64, eps=1e-6).to(w_dtype)
        with torch.no_grad():
            ref.weight.normal_()
        norm = copy.deepcopy(ref)
        handle = fasttfm.patch(norm)
        assert type(norm).__name__ == "FasttfmLlamaRMSNorm" and isinstance(norm, LlamaRMSNorm)
        x = torch.randn(3, 5, 64).to(x_dtype)
        y, y_ref = norm(x), ref(x)
        assert y.dtype == y_ref.dtype  # bf16 input, fp32 weight -> fp32 output, as HF
        # one bf16 step of the normalized value may differ (see test_every_registered_hf_norm_matches_hf)
        torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-5)
        handle.undo()
        assert type(norm) is LlamaRMSNorm


def test_decoding_with_cache_and_report():
    model = make("mistral").eval()
    ref = copy.deepcopy(model)
    handle = fasttfm.patch(model)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        out_ref = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, out_ref)
    text = handle.report()
    assert 'attn_implementation "sdpa" -> "fasttfm"' in text and "FasttfmMistralRMSNorm" in text
    handle.undo()


def test_sliding_window_fallback_keeps_the_window():
    """Attention dropout (no kernel yet): HF's sdpa runs, with Mistral's window as a mask."""
    model = make("mistral")
    model.config.attention_dropout = 0.2
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.2
    ref = copy.deepcopy(model)
    handle = fasttfm.patch(model)
    ids, _ = batch(False)
    torch.manual_seed(1)
    logits = run(model, ids, None)
    torch.manual_seed(1)  # the same dropout draws in both runs
    torch.testing.assert_close(logits, run(ref, ids, None))
    assert_grads_match(ref, model)
    assert "attention dropout > 0" in handle.report()


def _gemma2():
    """Tiny Gemma 2: attention-logit softcapping, a sliding-window layer then a global one; the
    reference runs HF's eager attention (its sdpa would ignore the softcap)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                                    sliding_window=8, attn_logit_softcapping=0.5, query_pre_attn_scalar=16,
                                    attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(cfg).train()
    model.loss_type = "ForCausalLM"
    return model


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_gemma2_softcap(padded):
    """Both layers on the kernel with its softcap (window 8 on layer 0), padded or not: the padding
    is the kernel's key_padding_mask. (It used to take the model's eager attention with a padding
    mask, and before that HF's sdpa, which dropped the softcap: logits off by 0.7.) Labels ignore
    the padding and the position it predicts: eager's fully masked rows are uniform, not 0."""
    model = _gemma2()
    ref = copy.deepcopy(model)
    handle = fasttfm.patch(model)
    ids, mask = batch(padded)
    labels = ids if mask is None else ids.masked_fill(torch.arange(SEQ) < 6, -100)  # row 1: 5 pads
    with count_paths() as calls:
        logits = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits.loss.backward()
    assert calls == {"kernel": 2, "masked": 0}, calls
    ref_logits = ref(input_ids=ids, attention_mask=mask, labels=labels)
    ref_logits.loss.backward()
    keep = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(logits.logits[keep], ref_logits.logits[keep])
    assert_grads_match(ref, model)
    assert "fallback" not in handle.report()
    handle.undo()


def test_fallbacks_are_reported():
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, attention_dropout=0.1)
    model = transformers.LlamaForCausalLM(cfg).train()
    handle = fasttfm.patch(model)
    assert "attention_dropout=0.1" in handle.report()
    model(input_ids=torch.randint(0, VOCAB, (1, 8)))
    assert "attention dropout > 0" in handle.report()
    handle.undo()


def graph_ops_backend(seen):
    """A torch.compile backend that records every call target of the captured graphs, then runs
    aot_eager (so the custom ops' fake and autograd registrations are exercised)."""
    from torch._dynamo.backends.common import aot_autograd  # noqa: F401  (aot_eager below)
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    return backend


def assert_kernel_graph(seen, layers, kernel=True):
    """One fasttfm::attn_fwd per layer and no dense attention in the captured graphs; kernel=False: the
    reverse (the exact dense path: masked SDPA, no attn_fwd)."""
    attn = [t for t in seen if "fasttfm.attn_fwd" in t]
    dense = [t for t in seen if "scaled_dot_product" in t or "softmax" in t]
    if kernel:
        assert len(attn) == layers and not dense, (attn, dense)
    else:
        assert not attn and dense, (attn, dense)


@pytest.mark.parametrize("kind,padded", [("mistral", False), ("mistral", True), ("gpt2", True)])
def test_compile_fullgraph_and_no_host_sync(kind, padded):
    """One graph (fullgraph) with one fasttfm::attn_fwd per layer and no SDPA, padded or not
    (Mistral: GQA + sliding window + key padding; GPT-2: key padding); same logits and grads."""
    torch._dynamo.reset()
    model = make(kind)
    ref = copy.deepcopy(model)
    fasttfm.patch(model)
    ids, mask = batch(padded)
    seen = []
    compiled = torch.compile(model, fullgraph=True, backend=graph_ops_backend(seen))
    logits = run(compiled, ids, mask)
    assert_kernel_graph(seen, 2)
    torch.testing.assert_close(logits, run(ref, ids, mask))
    assert_grads_match(ref, model)
    torch._dynamo.reset()
    with NoHostSync():
        run(model, ids, None)
        run(model, ids, batch(True)[1])  # a padding mask: no peeking at its values either


def test_compile_fullgraph_packed():
    """Packed sequences (position_ids restarting, no cache) compiled with fullgraph: HF's packing
    detection always yields segment ids when tracing; one attn_fwd per layer, same logits/grads. On a
    torch whose dynamo cannot read closure cells (2.11) the segment ids are out of reach under
    compile: the exact dense mask instead (hf_masks.CELLS_IN_TRACE), same logits/grads."""
    torch._dynamo.reset()
    model = make("mistral")
    ref = copy.deepcopy(model)
    fasttfm.patch(model)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    pos = torch.cat([torch.arange(10), torch.arange(SEQ - 10)])[None].expand(2, -1)

    def step(m):
        out = m(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits

    seen = []
    logits = step(torch.compile(model, fullgraph=True, backend=graph_ops_backend(seen)))
    assert_kernel_graph(seen, 2, kernel=hf_masks.CELLS_IN_TRACE)
    torch.testing.assert_close(logits, step(ref))
    assert_grads_match(ref, model)
    torch._dynamo.reset()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_compile_fullgraph_decode(cache):
    """A decode step (left-padded batch) compiled with fullgraph: one attn_fwd per layer, no SDPA,
    no host sync in eager either; StaticCache's offset is a device tensor (seqused_k), a
    DynamicCache's a Python int (plain bottom-right alignment). Same logits as the unpatched model."""
    torch._dynamo.reset()
    model = make("mistral").eval()
    ref = copy.deepcopy(model)
    fasttfm.patch(model)
    ids, mask = batch(True)
    step = torch.randint(0, VOCAB, (2, 1))
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)

    def prefill(m):
        if cache == "static":
            past = transformers.StaticCache(config=m.config, max_cache_len=40)
        else:
            past = transformers.DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
        return past

    def decode(m, past):
        pos = torch.tensor([SEQ])
        with torch.no_grad():
            return m(input_ids=step, attention_mask=mask2, past_key_values=past, cache_position=pos,
                     position_ids=mask2.cumsum(-1)[:, -1:] - 1, use_cache=True).logits

    ref_logits = decode(ref, prefill(ref))
    seen = []
    compiled = torch.compile(model, fullgraph=True, backend=graph_ops_backend(seen))
    logits = decode(compiled, prefill(model))
    assert_kernel_graph(seen, 2)
    torch.testing.assert_close(logits, ref_logits)
    torch._dynamo.reset()
    past = prefill(model)
    with NoHostSync():
        logits = decode(model, past)
    torch.testing.assert_close(logits, ref_logits)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compile_fullgraph_with_generate_prepared_masks(family):
    """generate() with a StaticCache builds the masks before the (on CUDA auto-compiled) forward
    and calls .contiguous() on them: the Routes (a dict of them for Gemma 3's hybrid layers) enter
    the compiled graph as inputs; still one attn_fwd per layer, no SDPA, same logits."""
    from transformers.masking_utils import create_masks_for_generate

    from tests.hf_zoo import CAUSAL_LMS

    torch._dynamo.reset()
    model = CAUSAL_LMS[family]().eval()
    ref = copy.deepcopy(model)
    fasttfm.patch(model)
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    pos = mask2.cumsum(-1)[:, -1:] - 1

    def decode(m, forward):
        past = transformers.StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask, past_key_values=past)
            masks = create_masks_for_generate(config=m.config, inputs_embeds=torch.empty((2, 1, 0)),
                                              attention_mask=mask2, past_key_values=past, position_ids=pos)
            masks = {k: v.contiguous() for k, v in masks.items()} if isinstance(masks, dict) else masks.contiguous()
            return forward(input_ids=ids[:, -1:], attention_mask=masks, past_key_values=past, position_ids=pos,
                           cache_position=torch.tensor([10])).logits

    seen = []
    logits = decode(model, torch.compile(model, fullgraph=True, backend=graph_ops_backend(seen)))
    assert_kernel_graph(seen, 2)
    torch.testing.assert_close(logits, decode(ref, ref))
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["plain", "padded", "packed", "static-decode"])
def test_tiny_model_under_emulation(kind):
    """The GPU kernels' own source (Triton interpreter, SIMT emulator) inside a patched model, in
    each routing: no mask, key padding (left-padded row), packed sequences (segment ids), and a
    StaticCache decode step (seqused_k from the cache's device offset, plus key padding)."""
    model = make("mistral" if kind == "static-decode" else "llama", layers=1, hidden=64, heads=4)
    ref = copy.deepcopy(model)
    fasttfm.patch(model)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    if kind == "static-decode":
        model.eval(), ref.eval()

        def forward(m):
            past = transformers.StaticCache(config=m.config, max_cache_len=16)
            with torch.no_grad():
                m(input_ids=ids[:, :11], attention_mask=mask[:, :11], past_key_values=past)
                return m(input_ids=ids[:, 11:], attention_mask=mask, past_key_values=past,
                         cache_position=torch.tensor([11]), position_ids=mask.cumsum(-1)[:, -1:] - 1).logits
    elif kind == "packed":
        pos = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)

        def forward(m):
            out = m(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
            out.loss.backward()
            return out.logits
    else:
        def forward(m):
            return run(m, ids, mask if kind == "padded" else None)
    launches = []
    real_launch = attn_ops._kf.attn_fwd
    attn_ops._kf.attn_fwd = lambda *a, **k: launches.append(k.get("interpret")) or real_launch(*a, **k)
    try:
        with fasttfm.emulate(True), count_paths() as calls:
            logits = forward(model)
    finally:
        attn_ops._kf.attn_fwd = real_launch
    n = 2 if kind == "static-decode" else 1  # prefill + decode step
    assert calls == {"kernel": n, "masked": 0} and launches == [True] * n  # the Triton kernel, interpreted
    torch.testing.assert_close(logits, forward(ref), rtol=1e-4, atol=1e-4)
    if kind != "static-decode":
        assert_grads_match(ref, model)


def _hf_norm(fam, cls_name, hidden):
    import importlib

    cls = getattr(importlib.import_module(f"transformers.models.{fam}.modeling_{fam}"), cls_name)
    norm = cls(hidden)
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            setattr(norm, attr, 1e-5)
    if getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.normal_(0.0 if "Gemma" in cls_name else 1.0, 0.3)
    return cls, norm


@pytest.mark.parametrize("fam,cls_name,factory", HF_NORMS, ids=lambda x: x)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32w"])
def test_every_registered_hf_norm_matches_hf(fam, cls_name, factory, x_dtype, w_dtype):
    """Each HF norm class in the registry, patched, gives HF's own module's output and gradients
    (input and weight), in fp32 and bf16 (and bf16 activations with fp32 weights)."""
    hidden = (4, 16) if cls_name.startswith("Cohere") else 64
    cls, ref = _hf_norm(fam, cls_name, hidden)
    ref = ref.to(w_dtype)
    norm = copy.deepcopy(ref)
    handle = fasttfm.patch(norm)
    assert type(norm).__name__ == f"Fasttfm{cls_name}" and isinstance(norm, cls), handle.report()
    shape = (3, 5, 4, 16) if cls_name.startswith("Cohere") else (3, 5, 64)
    x0 = (torch.randn(*shape, dtype=torch.float64) * 2 + 0.3).to(x_dtype)
    dy = torch.randn(*shape, dtype=torch.float64)
    outs = []
    for m in (norm, ref):
        x = x0.clone().requires_grad_(True)
        y = m(x)
        y.backward(dy.to(y.dtype))
        w = getattr(m, "weight", None)
        outs.append((y.detach(), x.grad, None if w is None else w.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    assert y.dtype == y_ref.dtype
    # With bf16 activations HF rounds the fp32 normalized value to bf16 inside the norm (Llama style),
    # so a last-bit difference in the fp32 statistic can land on the neighbouring bf16 value even
    # when the output is fp32 (fp32 weights): allow one bf16 step there (1 case in ~50 runs hit it).
    lowp = x_dtype == torch.bfloat16
    tol = dict(rtol=1.6e-2, atol=1e-5) if lowp else {}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    if dw_ref is not None:
        tol = dict(rtol=2e-2, atol=2e-2 * dw_ref.abs().max().item()) if lowp else {}
        torch.testing.assert_close(dw, dw_ref, **tol)  # weight grads: sums over 15 rows of such values
    handle.undo()
    assert type(norm) is cls


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_v_head_dim_differs_runs_the_kernels(mode):
    """q/k head dim 48, v head dim 32 (DeepSeek-V3 MLA's shape, scaled down): the kernels run it (no
    fallback), out (B, Sq, Hq, Dv) and every gradient vs the fp64 reference (relative oracle)."""
    import torch.nn.functional as F

    from fasttfm import hf
    from tests.oracle import assert_close_oracle

    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.randn(2, 4, 9, 48, dtype=torch.float64), torch.randn(2, 2, 9, 48, dtype=torch.float64)
    v, do = torch.randn(2, 2, 9, 32, dtype=torch.float64), torch.randn(2, 9, 4, 32, dtype=torch.float64)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", torch.float16)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=0.2, enable_gqa=True).transpose(1, 2)
        refs[name] = (o, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    qd, kd, vd = (t.to(torch.float16).requires_grad_() for t in (q, k, v))
    with fasttfm.emulate(mode == "emu"):
        out, _ = hf.attention_forward(module, qd, kd, vd, None, scaling=0.2)
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(torch.float16))
    assert hf.fallback_counts(module) == {}
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_oracle(grads[i], refs["64"][1 + i], refs["lowp"][1 + i], factor=3.0, name=name,
                            floor=1e-3 * max(1.0, *(g.abs().max().item() for g in refs["64"][1:])))


def test_qk_head_dims_differ_fall_back_with_the_reason():
    """q and k with different head dims (no attention model has them): HF's sdpa path, reason named."""
    from fasttfm import hf

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 48), torch.randn(1, 2, 5, 32)
    with contextlib.suppress(RuntimeError):  # HF's sdpa itself rejects the mismatch
        hf.attention_forward(module, q, k, v, None, scaling=0.2)
    (reason,) = hf.fallback_counts(module)
    assert "head dims of q (32) and k (48) differ" in reason
