"""Every Hugging Face run kind on fasttfm's kernels (issue 16): padded batches, packed sequences,
DynamicCache / StaticCache / batched left-padded generation, for each covered family (tests/hf_zoo.py).

Each run is compared with the unpatched model (HF's sdpa; Gemma 2: eager, whose softcap sdpa drops):
logits at the non-padded positions and every parameter gradient (the loss ignores padded labels,
the only positions where HF's output is arbitrary), or the generated tokens. A dispatch counter
proves where attention ran: every call of the "fasttfm" attention function issued exactly one
``fasttfm::attn_fwd`` and no aten SDPA op ran, and no call was counted as a fallback."""
import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import fasttfm  # noqa: E402
from fasttfm import hf  # noqa: E402
from tests.hf_zoo import CAUSAL_LMS, MORE_LMS, OTHER_MODELS, VOCAB, auto_lm  # noqa: E402
from tests.test_patch import assert_grads_match  # noqa: E402

SEQ = 20
DENSE_OPS = ("scaled_dot_product", "_safe_softmax")  # aten SDPA (any backend) and its math decomposition


class AttentionCounter(TorchDispatchMode):
    """Counts top-level ``fasttfm::attn_fwd`` calls and aten SDPA ops (ops run inside a custom op's
    own implementation are not seen: the mode is off while it handles the op)."""

    def __init__(self):
        super().__init__()
        self.kernel = 0
        self.dense = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name == "fasttfm::attn_fwd":
            self.kernel += 1
        elif any(op in name for op in DENSE_OPS):
            self.dense.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_attention():
    """yield dict(calls, kernel, dense): calls of the "fasttfm" attention function, attn_fwd launches,
    and the aten SDPA ops seen (a list)."""
    from transformers import AttentionInterface

    stats = {"calls": 0}

    def counted(*args, **kwargs):
        stats["calls"] += 1
        return hf.attention_forward(*args, **kwargs)

    AttentionInterface.register(hf.NAME, counted)
    counter = AttentionCounter()
    try:
        with counter:
            yield stats
    finally:
        AttentionInterface.register(hf.NAME, hf.attention_forward)
        stats.update(kernel=counter.kernel, dense=counter.dense)


def assert_all_kernel(stats, model):
    fallbacks = {(p, r): n for p, m in model.named_modules() for r, n in hf.fallback_counts(m).items()}
    assert not fallbacks, fallbacks
    assert stats["calls"] > 0 and stats["kernel"] == stats["calls"] and not stats["dense"], stats


def patched(build):
    model = build()
    ref = copy.deepcopy(model)
    handle = fasttfm.patch(model)
    assert model.config._attn_implementation == "fasttfm", handle.report()
    return model, ref, handle


def padded_batch():
    """Row 0 right-padded by 3, row 1 left-padded by 5 (both HF conventions). Labels -100 where the
    token or its predictor (the position before: HF shifts labels) is padding."""
    ids = torch.randint(3, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, -3:] = 0
    mask[1, :5] = 0
    before = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    labels = ids.masked_fill((mask == 0) | (before == 0), -100)
    return ids, mask, labels


def packed_batch():
    """Two rows of packed sequences (lengths 7+9+4 and 12+8): position_ids restart, no mask."""
    ids = torch.randint(3, VOCAB, (2, SEQ))
    pos = torch.cat([torch.cat([torch.arange(n) for n in lens])[None] for lens in ((7, 9, 4), (12, 8))])
    return ids, pos


def train_step(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    return out.logits


def padded_train_step_matches(model, ref, ids, mask, labels):
    """One training step of the patched model on a padded batch: every attention call on the kernel;
    logits at the non-padded positions and all grads equal the unpatched model's."""
    with count_attention() as stats:
        logits = train_step(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_all_kernel(stats, model)
    ref_logits = train_step(ref, input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep])
    assert_grads_match(ref, model)


@pytest.mark.parametrize("family", sorted(CAUSAL_LMS))
def test_padded_batch(family):
    model, ref, _ = patched(CAUSAL_LMS[family])
    ids, mask, labels = padded_batch()
    padded_train_step_matches(model, ref, ids, mask, labels)
    keep = mask.bool()
    model.eval(), ref.eval()
    with count_attention() as stats, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert_all_kernel(stats, model)
    with torch.no_grad():
        torch.testing.assert_close(logits[keep], ref(input_ids=ids, attention_mask=mask).logits[keep])


@pytest.mark.parametrize("family", sorted(CAUSAL_LMS))
def test_packed_sequences(family):
    """HF detects packing from position_ids only without a cache (use_cache=False, as in training
    with packing collators); the kernel gets segment_ids. The result must differ from one unpacked
    sequence per row (else the test could not tell)."""
    model, ref, _ = patched(CAUSAL_LMS[family])
    ids, pos = packed_batch()
    inputs = dict(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    with count_attention() as stats:
        logits = train_step(model, **inputs)
    assert_all_kernel(stats, model)
    torch.testing.assert_close(logits, train_step(ref, **inputs))
    assert_grads_match(ref, model)
    with torch.no_grad():
        unpacked = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(unpacked[:, 7:], logits[:, 7:], atol=1e-3)


def _generate(model, ids, mask, cache):
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=mask)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, **kwargs)


@pytest.mark.parametrize("cache,padded", [("dynamic", False), ("dynamic", True), ("static", True)],
                         ids=["dynamic", "dynamic-leftpad", "static-leftpad"])
@pytest.mark.parametrize("family", sorted(CAUSAL_LMS))
def test_generate(family, cache, padded):
    """Greedy generation past the sliding window (10 + 6 > 8): prefill and every decode step on the
    kernel; the same tokens as the unpatched model."""
    model, ref, _ = patched(CAUSAL_LMS[family])
    model.eval(), ref.eval()
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
        ids[1, :4] = 0
    with count_attention() as stats:
        out = _generate(model, ids, mask, cache)
    assert_all_kernel(stats, model)
    assert torch.equal(out, _generate(ref, ids, mask, cache))


def test_modernbert_padded_local_attention():
    """ModernBERT: bidirectional attention, local layers of +-4 (window (4, 4)) alternating with
    global ones, a padded batch: all on the kernel (key_padding_mask), same logits and grads."""
    model, ref, _ = patched(OTHER_MODELS["modernbert"])
    ids, mask, _ = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    padded_train_step_matches(model, ref, ids, mask, labels)


def test_bart_padded_and_generate():
    """BART (no _supports_attention_backend; admitted as verified): padded encoder (bidirectional +
    key padding), causal decoder, cross-attention over the padded encoder; then generation."""
    model, ref, _ = patched(OTHER_MODELS["bart"])
    ids, mask, _ = padded_batch()
    labels = torch.randint(3, VOCAB, (2, 9))
    with count_attention() as stats:
        logits = train_step(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_all_kernel(stats, model)
    assert stats["calls"] == 3  # encoder self, decoder self, decoder cross
    torch.testing.assert_close(logits, train_step(ref, input_ids=ids, attention_mask=mask, labels=labels))
    assert_grads_match(ref, model)
    model.eval(), ref.eval()
    with count_attention() as stats:
        out = _generate(model, ids, mask, "dynamic")
    assert_all_kernel(stats, model)
    assert torch.equal(out, _generate(ref, ids, mask, "dynamic"))


def test_whisper_train_and_generate():
    """Whisper (admitted as verified): encoder over audio features, causal decoder, cross-attention."""
    model, ref, _ = patched(OTHER_MODELS["whisper"])
    feats = torch.randn(2, 8, 32)
    labels = torch.randint(3, VOCAB, (2, 9))
    with count_attention() as stats:
        logits = train_step(model, input_features=feats, labels=labels)
    assert_all_kernel(stats, model)
    torch.testing.assert_close(logits, train_step(ref, input_features=feats, labels=labels))
    assert_grads_match(ref, model)
    model.eval(), ref.eval()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with count_attention() as stats, torch.no_grad():
        out = model.generate(input_features=feats, **kwargs)
    assert_all_kernel(stats, model)
    with torch.no_grad():
        assert torch.equal(out, ref.generate(input_features=feats, **kwargs))


def test_flash_attention_kwargs_take_the_varlen_path():
    """HF's flash-attention kwargs (DataCollatorWithFlattening: cu_seq_lens_q/k, max_length_q/k,
    batch 1) run the kernel's varlen ("thd") path; equal to the unpatched model, which applies the
    same packing through position_ids."""
    import fasttfm.ops.attention as attn_ops

    model, ref, _ = patched(CAUSAL_LMS["mistral"])
    lens = (7, 9, 4)
    ids = torch.randint(3, VOCAB, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 7, 16, 20], dtype=torch.int32)
    inputs = dict(input_ids=ids, position_ids=pos, labels=ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=max(lens), max_length_k=max(lens))
    layouts = []
    real = attn_ops.attention
    attn_ops.attention = lambda *a, **k: layouts.append(k.get("layout")) or real(*a, **k)
    try:
        with count_attention() as stats:
            logits = train_step(model, **inputs)
    finally:
        attn_ops.attention = real
    assert_all_kernel(stats, model)
    assert layouts == ["thd", "thd"]
    torch.testing.assert_close(logits, train_step(ref, **inputs))
    assert_grads_match(ref, model)


def test_report_counts_dense_calls_with_the_reason():
    """A 4-D mask from the caller cannot be read as a pattern: fasttfm's masked SDPA runs it, and
    report() says so per attention module with the number of calls."""
    model, ref, handle = patched(CAUSAL_LMS["llama"])
    ids = torch.randint(3, VOCAB, (2, 9))
    mask4 = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9).clone()
    mask4[1, :, :, :3] = False
    mask4[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # fully masked rows are avoided
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask4).logits
        torch.testing.assert_close(logits, ref(input_ids=ids, attention_mask=mask4).logits)
    text = handle.report()
    for layer in (0, 1):
        assert (f"fallback  model.layers.{layer}.self_attn: 1 call(s) did not run the kernel: dense mask: "
                "a 4-D mask from outside the forward") in text, text



@pytest.mark.parametrize("model_type", MORE_LMS)
def test_more_families_padded_and_left_padded_generate(model_type):
    """Families beyond the zoo: a padded training step (logits at real tokens, all grads) and
    left-padded greedy generation, all on the kernel."""
    model, ref, _ = patched(lambda: auto_lm(model_type))
    ids, mask, labels = padded_batch()
    with count_attention() as stats:
        logits = train_step(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert_all_kernel(stats, model)
    ref_logits = train_step(ref, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(logits[mask.bool()], ref_logits[mask.bool()])
    assert_grads_match(ref, model)
    model.eval(), ref.eval()
    ids, mask = ids[:, :10].clone(), torch.ones(2, 10, dtype=torch.long)
    mask[1, :4], ids[1, :4] = 0, 0
    with count_attention() as stats:
        out = _generate(model, ids, mask, "dynamic")
    assert_all_kernel(stats, model)
    assert torch.equal(out, _generate(ref, ids, mask, "dynamic"))


def test_gradient_checkpointing_padded():
    """Reentrant and non-reentrant checkpointing recompute the forward with the same Route."""
    for reentrant in (True, False):
        model, ref, _ = patched(CAUSAL_LMS["gemma3"])
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids, mask, labels = padded_batch()
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        with count_attention() as stats:
            logits = train_step(model, **inputs)
        assert_all_kernel(stats, model)
        assert stats["calls"] == 4  # 2 layers, forward + recomputation
        torch.testing.assert_close(logits[mask.bool()], train_step(ref, **inputs)[mask.bool()])
        assert_grads_match(ref, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_low_precision_padded_follows_the_oracle(family, dtype):
    """bf16/fp16 padded training step: logits (real tokens) and every parameter gradient of the
    patched model are within 2x the unpatched model's own error in that dtype of the float64
    unpatched model (tests/oracle.py)."""
    from tests.oracle import assert_close_oracle

    build = CAUSAL_LMS[family]
    ref64, ref_lowp = build().double(), build().to(dtype)
    model, _, _ = patched(lambda: build().to(dtype))
    ids, mask, labels = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with count_attention() as stats:
        logits = train_step(model, **inputs)
    assert_all_kernel(stats, model)
    keep = mask.bool()
    outs = [logits[keep]] + [train_step(m, **inputs)[keep] for m in (ref64, ref_lowp)]
    assert_close_oracle(*outs, name="logits")
    for (name, p), p64, plow in zip(model.named_parameters(), ref64.parameters(), ref_lowp.parameters()):
        if p64.grad is not None:
            assert_close_oracle(p.grad, p64.grad, plow.grad, name=name)


@pytest.mark.parametrize("family,note", [("mistral", "sliding window 8 on every layer"),
                                         ("qwen2", "sliding window 8 on 1 of 2 layers"),
                                         ("gemma3", "sliding window 8 on 1 of 2 layers"), ("llama", None)])
def test_report_names_the_local_attention_layers(family, note):
    _, _, handle = patched(CAUSAL_LMS[family])
    text = handle.report()
    assert (note is None and "window" not in text) or f"{note}: on the kernel's window" in text, text


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["mistral", "gemma3", "llama"])
def test_chunked_prefill(family, cache):
    """A left-padded prompt fed in chunks of 7, 5 and 4 tokens (Nq < Nk after the first, crossing
    the window of 8): every chunk on the kernel, same logits at the real tokens."""
    model, ref, _ = patched(CAUSAL_LMS[family])
    model.eval(), ref.eval()
    ids, mask, _ = padded_batch()
    mask[0, -3:] = 1  # left padding only (row 1), as a prompt
    ids, mask = ids[:, :16], mask[:, :16]

    def chunks(m):
        past = transformers.StaticCache(config=m.config, max_cache_len=24) if cache == "static" else \
            transformers.DynamicCache(config=m.config)
        out, start = [], 0
        with torch.no_grad():
            for n in (7, 5, 4):
                end = start + n
                out.append(m(input_ids=ids[:, start:end], attention_mask=mask[:, :end], past_key_values=past,
                             position_ids=(mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end],
                             cache_position=torch.arange(start, end)).logits)
                start = end
        return torch.cat(out, dim=1)

    with count_attention() as stats:
        logits = chunks(model)
    assert_all_kernel(stats, model)
    assert stats["calls"] == 6
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], chunks(ref)[keep])

# -- the issue-16 table: python -m tests.test_hf_routes ----------------------------------------------
def _run_kinds():
    def unpadded(m):
        ids = torch.randint(3, VOCAB, (2, SEQ))
        train_step(m, input_ids=ids, labels=ids)

    def padded(m):
        ids, mask, labels = padded_batch()
        train_step(m, input_ids=ids, attention_mask=mask, labels=labels)

    def packed(m):
        ids, pos = packed_batch()
        train_step(m, input_ids=ids, position_ids=pos, labels=ids, use_cache=False)

    def generation(cache, pad):
        def run(m):
            m.eval()
            ids = torch.randint(3, VOCAB, (2, 10))
            mask = torch.ones_like(ids)
            if pad:
                mask[1, :4] = 0
            _generate(m, ids, mask, cache)
        return run

    return {"unpadded fwd/bwd": unpadded, "padded batch": padded, "packed sequences": packed,
            "DynamicCache generate": generation("dynamic", False),
            "StaticCache / left-padded generate": lambda m: (generation("static", True)(m),
                                                             generation("dynamic", True)(m))}


def measure():
    """{run kind: {family: (attn_fwd launches, attention calls, aten SDPA ops, fallback calls)}}."""
    table = {}
    for kind, run in _run_kinds().items():
        for family, build in sorted(CAUSAL_LMS.items()):
            model = build()
            fasttfm.patch(model)
            with count_attention() as stats:
                run(model)
            off = sum(n for m in model.modules() for n in hf.fallback_counts(m).values())
            table.setdefault(kind, {})[family] = (stats["kernel"], stats["calls"], len(stats["dense"]), off)
    return table


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    result = measure()
    families = sorted(CAUSAL_LMS)
    print("| run kind | all on fasttfm::attn_fwd | families not all-kernel (attn_fwd/calls, SDPA ops, fallbacks) |")
    print("|---|---|---|")
    for kind, rows in result.items():
        ok = [f for f in families if rows[f][0] == rows[f][1] > 0 and rows[f][2] == rows[f][3] == 0]
        bad = ", ".join(f"{f} {rows[f][0]}/{rows[f][1]}, {rows[f][2]}, {rows[f][3]}" for f in families if f not in ok)
        print(f"| {kind} | {len(ok)} / {len(families)} | {bad or '-'} |")
