"""fasttfm.patch: registry coverage, in-place reversible swaps of torch.nn modules, the
nn.TransformerEncoderLayer fast-path trap, reports for what stays, the SDPA context manager,
torch.compile(fullgraph=True) and host synchronizations. CPU path, fp32, small shapes."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fasttfm
import fasttfm.mha
import fasttfm.ops.attention as attn_ops
from fasttfm.patch import EXPLICIT_ONLY, REGISTRY, Row, sdpa_patched

E, H = 64, 4


# -- helpers ---------------------------------------------------------------------------------------
# Ops that read device data on the host (a stream sync on a GPU): .item(), bool(t), torch.equal,
# and data-dependent output shapes.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
             "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}


class NoHostSync(TorchDispatchMode):
    """Raise on any op that would synchronize the host with the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _SYNC_OPS:
            raise AssertionError(f"host synchronization: {func._schema.name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_kernel_calls():
    """Counts calls of the fasttfm attention entry points that MultiheadAttention uses: the kernel
    (``attention``) and the dense masked ``sdpa``."""
    names = {"attention": "attention", "sdpa": "scaled_dot_product_attention"}
    calls = dict.fromkeys(names, 0)
    real = {key: getattr(fasttfm.mha, attr) for key, attr in names.items()}

    def counting(key):
        def call(*a, **k):
            calls[key] += 1
            return real[key](*a, **k)
        return call

    for key, attr in names.items():
        setattr(fasttfm.mha, attr, counting(key))
    try:
        yield calls
    finally:
        for key, attr in names.items():
            setattr(fasttfm.mha, attr, real[key])


def encoder(norm_first=False, layers=2):
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=not norm_first),
                         nn.LayerNorm(E), nn.Linear(E, 8))


def assert_grads_match(ref, model):
    for (name, p0), p1 in zip(ref.named_parameters(), model.parameters()):
        assert (p1.grad is None) == (p0.grad is None), name
        if p0.grad is None:  # a parameter the loss does not use
            continue
        # fp32, different summation orders: tolerance relative to the gradient's scale
        atol = 2e-5 * max(1.0, p0.grad.abs().max().item())
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


# -- registry --------------------------------------------------------------------------------------
def test_every_fasttfm_nn_class_is_in_the_registry():
    targets = {row.target for row in REGISTRY}
    for name in fasttfm.nn.__all__:
        obj = getattr(fasttfm.nn, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            assert f"fasttfm.nn.{name}" in targets or f"fasttfm.nn.{name}" in EXPLICIT_ONLY, \
                f"fasttfm.nn.{name} has no row in fasttfm.patch.REGISTRY (nor a reason in EXPLICIT_ONLY)"


def test_registry_rows_name_real_classes():
    groups = {"attention", "norms", "softmax", "loss"}
    for row in REGISTRY:
        assert isinstance(row, Row) and row.group in groups and row.scope in ("module", "model")
        if row.source.startswith("torch."):
            module, _, name = row.source.rpartition(".")
            assert isinstance(getattr(__import__(module, fromlist=[name]), name), type), row.source
    for name in ("MultiheadAttention", "LayerNorm", "RMSNorm", "Softmax", "CrossEntropyLoss"):
        assert any(r.source == f"torch.nn.{name}" for r in REGISTRY), name


# -- torch.nn models -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_eval_no_grad_runs_the_kernels(norm_first):
    """The trap: in eval + no_grad nn.TransformerEncoderLayer's fast path skips replaced modules."""
    model = encoder(norm_first).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 16, E)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 11:] = True
    handle = fasttfm.patch(model)
    assert isinstance(model[0].layers[0].self_attn, fasttfm.nn.MultiheadAttention)
    with torch.no_grad(), count_kernel_calls() as calls:
        y = model(x)
        y_pad = model[2](model[1](model[0](x, src_key_padding_mask=pad)))
    assert calls["attention"] == 2 and calls["sdpa"] == 2, calls
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x))
        y_ref = ref[2](ref[1](ref[0](x, src_key_padding_mask=pad)))
    keep = ~pad  # torch's nested-tensor path returns zeros at padded positions; compare the rest
    torch.testing.assert_close(y_pad[keep], y_ref[keep])
    if not norm_first:  # the trap itself: a bare class swap is bypassed by the fast path
        bare = encoder().eval()
        for layer in bare[0].layers:
            layer.self_attn.__class__ = fasttfm.nn.MultiheadAttention
        with torch.no_grad(), count_kernel_calls() as calls:
            bare(x)
        assert sum(calls.values()) == 0
    handle.undo()
    assert type(model[0].layers[0].self_attn) is nn.MultiheadAttention and type(model[1]) is nn.LayerNorm
    assert model[0].layers[0].activation_relu_or_gelu == 1
    assert model[0].use_nested_tensor == ref[0].use_nested_tensor


def test_training_grads_state_and_identity_preserved():
    dec = nn.TransformerDecoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)
    model = nn.ModuleDict({"enc": encoder(), "dec": dec, "norm": nn.RMSNorm(E)}).train()
    model["enc"][1].eval()  # mixed modes must survive
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    hook_calls = []
    model["norm"].register_forward_hook(lambda *a: hook_calls.append(1))

    handle = fasttfm.patch(model)
    assert {e.path for e in handle.replaced} >= {"dec.self_attn", "dec.multihead_attn", "dec.norm1", "norm"}
    assert isinstance(model["norm"], fasttfm.nn.RMSNorm)
    assert dict(model.named_parameters()) == params  # the very same Parameter objects
    assert list(model.state_dict()) == keys
    assert {n: m.training for n, m in model.named_modules()} == modes

    x, mem = torch.randn(2, 12, E), torch.randn(2, 10, E)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(12)

    def run(m):
        h = m["enc"][1](m["enc"][0](x))
        return (m["norm"](m["dec"](h, mem, tgt_mask=tgt_mask, tgt_is_causal=True)) ** 2).sum()

    with count_kernel_calls() as calls:
        run(model).backward()
    assert calls["attention"] + calls["sdpa"] >= 4 and hook_calls == [1]
    run(ref).backward()
    assert_grads_match(ref, model)
    handle.undo()
    handle.undo()  # idempotent
    assert type(model["norm"]) is nn.RMSNorm and type(model["dec"].multihead_attn) is nn.MultiheadAttention
    assert dict(model.named_parameters()) == params


def test_unsupported_configurations_stay_and_are_reported():
    model = nn.ModuleDict({
        "kdim": nn.MultiheadAttention(E, H, kdim=32, vdim=32, batch_first=True),
        "bias_kv": nn.MultiheadAttention(E, H, add_bias_kv=True),
        "small_head": nn.MultiheadAttention(E, 8),
        "ok": nn.MultiheadAttention(E, H, batch_first=True),
    })
    handle = fasttfm.patch(model)
    for name in ("kdim", "bias_kv", "small_head"):
        assert type(model[name]) is nn.MultiheadAttention
    assert isinstance(model["ok"], fasttfm.nn.MultiheadAttention)
    text = handle.report()
    assert "kept      kdim" in text and "kdim/vdim != embed_dim" in text
    assert "add_bias_kv" in text and "head_dim 8" in text
    x = torch.randn(2, 5, E)
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    ref.load_state_dict(model["ok"].state_dict())
    out, w = model["ok"](x, x, x)  # need_weights defaults to True: torch's forward, reported
    out2, w2 = ref(x, x, x)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(w, w2)
    model["ok"](x, x, x, need_weights=False)
    assert "fallback  ok: 1 call(s) ran the original module: need_weights=True" in handle.report()
    handle.undo()


def test_nothing_to_replace_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing to replace"):
        handle = fasttfm.patch(model)
    assert "nothing to replace" in handle.report() and not handle.replaced
    with pytest.raises(TypeError):
        fasttfm.patch(torch.zeros(3))


def test_subclasses_flags_and_root_module():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(E), nn.LayerNorm(E), nn.MultiheadAttention(E, H))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = fasttfm.patch(model, norms=False)
    assert type(model[1]) is nn.LayerNorm and "not requested: norms" in handle.report()
    handle.undo()
    handle = fasttfm.patch(model, attention=False)
    assert type(model[0]) is MyNorm and "subclass of torch.nn.LayerNorm" in handle.report()
    assert type(model[2]) is nn.MultiheadAttention
    handle.undo()
    root = nn.LayerNorm(E)
    with fasttfm.patch(root) as handle:  # the root module itself, as a context manager
        assert type(root) is fasttfm.nn.LayerNorm
    assert type(root) is nn.LayerNorm and not handle.active


def test_softmax_and_loss_rows_before_and_after_they_land(monkeypatch):
    model = nn.ModuleDict({"softmax": nn.Softmax(dim=-1), "loss": nn.CrossEntropyLoss(label_smoothing=0.1)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = fasttfm.patch(model)
    for name in ("Softmax", "CrossEntropyLoss"):
        if getattr(fasttfm.nn, name, None) is None:
            assert f"fasttfm.nn.{name} is not available in this build" in handle.report()
    handle.undo()

    class FakeSoftmax(nn.Module):  # stands in for a replacement that is not a subclass
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, x):
            return torch.softmax(x, self.dim)

    monkeypatch.setattr(fasttfm.nn, "Softmax", FakeSoftmax, raising=False)
    original = model["softmax"]
    seen = []
    original.register_forward_hook(lambda *a: seen.append(1))
    handle = fasttfm.patch(model, loss=False)
    assert type(model["softmax"]) is FakeSoftmax and model["softmax"].dim == -1
    x = torch.randn(3, 5)
    torch.testing.assert_close(model["softmax"](x), torch.softmax(x, -1))
    assert seen == [1]  # hooks are shared with the original
    handle.undo()
    assert model["softmax"] is original


def test_sdpa_patched_context_manager():
    q, k, v = (torch.randn(2, 4, 16, 32, requires_grad=True) for _ in range(3))
    kv2 = torch.randn(2, 2, 16, 32)
    original = F.scaled_dot_product_attention
    calls = []
    real = attn_ops.scaled_dot_product_attention
    try:
        attn_ops.scaled_dot_product_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        with sdpa_patched():
            with sdpa_patched():  # nesting
                assert F.scaled_dot_product_attention is not original
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            gqa = F.scaled_dot_product_attention(q, kv2, kv2, enable_gqa=True)
            mask = torch.rand(16, 16) > 0.3
            masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert len(calls) == 2  # the masked call ran PyTorch's SDPA
    finally:
        attn_ops.scaled_dot_product_attention = real
    assert F.scaled_dot_product_attention is original
    torch.testing.assert_close(out, original(q, k, v, is_causal=True))
    torch.testing.assert_close(gqa, original(q, kv2, kv2, enable_gqa=True))
    torch.testing.assert_close(masked, original(q, k, v, attn_mask=mask))
    g = torch.randn_like(out)
    dq = torch.autograd.grad(out, q, g)[0]
    torch.testing.assert_close(dq, torch.autograd.grad(original(q, k, v, is_causal=True), q, g)[0])


# -- torch.compile and host synchronizations -------------------------------------------------------
def test_compile_fullgraph_patched_model_and_sdpa():
    torch._dynamo.reset()
    model = encoder(norm_first=True).train()
    ref = copy.deepcopy(model)
    fasttfm.patch(model)
    x = torch.randn(2, 16, E)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert_grads_match(ref, model)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 16, 32)
    with sdpa_patched():
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, q, q)
    torch.testing.assert_close(out, f(q, q, q))
    torch._dynamo.reset()


def test_no_host_sync_in_patched_model_and_the_check_catches_one():
    model = encoder().train()
    fasttfm.patch(model)
    x = torch.randn(2, 16, E)
    with NoHostSync():
        model(x).sum().backward()
    model.eval()
    with NoHostSync(), torch.no_grad():
        model(x)

    class PlantedItem(nn.Module):
        def forward(self, x):
            return x * x.abs().max().item()

    class PlantedBranch(nn.Module):  # data-dependent control flow: bool(tensor)
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    for planted in (PlantedItem(), PlantedBranch()):
        with pytest.raises(AssertionError, match="host synchronization"):
            with NoHostSync():
                planted(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data.dependent|graph break|unsupported"):
        torch.compile(PlantedBranch(), fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
