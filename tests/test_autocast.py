"""Every fasttfm custom op under torch.autocast (issue 16 item 14): the op decides its own precision
through its torch.library autocast rule (fasttfm/ops/_autocast.py) and gives what the torch op it
replaces gives under the same autocast region: the same output and gradient dtypes, and values as
close to a float64 reference (computed on the values autocast hands the op) as torch's own result.

cpu / emu / cuda via the kernel_device fixture: a GPU run covers CUDA autocast (whose lists differ:
layer_norm, rms_norm and softmax are fp32 ops there, on the CPU they are on no list).
linear_cross_entropy has its own autocast test in tests/test_linear_cross_entropy.py.
"""

import pytest
import torch
import torch.nn.functional as F

import fasttfm
from tests.conftest import on_device
from tests.oracle import assert_close_oracle

AMP = [torch.bfloat16, torch.float16]


def _amp(dev, dtype):
    return torch.autocast("cuda" if dev == "cuda" else "cpu", dtype=dtype)


def _leaves(dev, *ts):
    return [t.detach().to(dev).requires_grad_(True) for t in ts]


def _check(out, grads, low, low_grads, ref, ref_grads, names):
    """Same dtypes as torch's op under autocast; errors vs float64 within the oracle of torch's."""
    assert out.dtype == low.dtype, f"output dtype {out.dtype}, torch under autocast gives {low.dtype}"
    assert_close_oracle(out.detach().cpu(), ref, low, name="output")
    for name, g, gl, gr in zip(names, grads, low_grads, ref_grads):
        assert g.dtype == gl.dtype, f"{name}: dtype {g.dtype}, torch's {gl.dtype}"
        assert_close_oracle(g.cpu(), gr, gl, factor=3.0, name=name)


def _run(fn, dev, amp_dtype, inputs, dy=None):
    leaves = _leaves(dev, *inputs)
    with _amp(dev, amp_dtype):
        out = fn(*leaves)
    dy = torch.randn(out.shape, dtype=torch.float64) if dy is None else dy
    return out, torch.autograd.grad(out, leaves, dy.to(dev).to(out.dtype)), dy


# -- attention ---------------------------------------------------------------------------------------

def _mask(n, m, window=(-1, -1), chunk=0):
    i = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    vis = torch.ones(n, m, dtype=torch.bool)
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    if chunk:
        vis &= i // chunk == j // chunk
    return vis


def _torch_attn(q, k, v, mask, softcap):
    """torch's composition: SDPA with an explicit mask, or the eager softcapped attention of Gemma 2."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = torch.tanh((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 / softcap) * softcap
    p = torch.softmax(s.masked_fill(~mask, float("-inf")).float(), -1).to(v.dtype)
    return p @ v


@pytest.mark.parametrize("amp_dtype", AMP, ids=str)
@pytest.mark.parametrize("kw", [dict(window=(6, 2)), dict(chunk_size=8), dict(softcap=5.0, window=(9, 0)),
                                dict(causal=True)], ids=["window", "chunk", "softcap", "causal"])
def test_attention_under_autocast(kernel_device, amp_dtype, kw):
    """fp32 q/k/v (activations of an fp32 model) go to the autocast dtype, as SDPA's; the dense CPU path
    (window/chunk/softcap) used to run its einsums in bf16 under CPU autocast and return fp32."""
    dev, ctx = on_device(kernel_device)
    b, h, n, d = 1, 2, 37, 32
    qkv = [torch.randn(b, h, n, d, dtype=torch.float64).float() for _ in range(3)]
    window = kw.get("window", (-1, 0 if kw.get("causal") else -1))
    mask = _mask(n, n, window, kw.get("chunk_size", 0))
    with ctx:  # bf16 under emulation: fasttfm's interpreted launches compute it right (issue 16 item 2)
        out, grads, dy = _run(lambda q, k, v: fasttfm.attention(q, k, v, **kw), dev, amp_dtype, qkv)
    low, low_grads, _ = _run(lambda q, k, v: _torch_attn(q, k, v, mask, kw.get("softcap", 0.0)), "cpu", amp_dtype,
                             qkv, dy)
    ref_in = [t.to(amp_dtype).double().requires_grad_(True) for t in qkv]
    ref = _torch_attn(*ref_in, mask, kw.get("softcap", 0.0))
    ref_grads = torch.autograd.grad(ref, ref_in, dy)
    _check(out, grads, low, low_grads, ref, ref_grads, ["dq", "dk", "dv"])


@pytest.mark.parametrize("amp_dtype", AMP, ids=str)
def test_sdpa_under_autocast_mixed_dtypes(kernel_device, amp_dtype):
    """Inputs of different dtypes that autocast makes one (an fp32 q, an autocast-dtype k/v) are
    accepted, as torch's SDPA accepts them, and run on the kernel in the autocast dtype."""
    dev, ctx = on_device(kernel_device)
    q = torch.randn(2, 2, 19, 16, device=dev)
    k, v = (torch.randn(2, 2, 23, 16, device=dev).to(amp_dtype) for _ in range(2))
    with ctx, _amp(dev, amp_dtype):
        out = fasttfm.scaled_dot_product_attention(q, k, v)
        low = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == low.dtype == amp_dtype
    ref = F.scaled_dot_product_attention(q.to(amp_dtype).double(), k.double(), v.double())
    assert_close_oracle(out.cpu(), ref.cpu(), low.cpu())


def test_decode_under_autocast_keeps_cache_dtype(kernel_device):
    """attention_with_kvcache writes into its caches, so it casts nothing: under autocast an fp32 cache
    decodes in fp32 math exactly as without autocast (the CPU path's einsums were cast to bf16)."""
    dev, ctx = on_device(kernel_device)
    q = torch.randn(2, 1, 4, 32, device=dev)
    kc, vc = (torch.randn(2, 41, 2, 32, device=dev) for _ in range(2))
    kn, vn = (torch.randn(2, 1, 2, 32, device=dev) for _ in range(2))
    lens = torch.tensor([17, 40], dtype=torch.int32, device=dev)
    with ctx, torch.no_grad():
        plain = fasttfm.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, vn, window=(11, 0))
        with _amp(dev, torch.bfloat16):
            amp = fasttfm.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, vn, window=(11, 0))
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, plain, rtol=1e-5, atol=1e-6)


# -- norms, softmax, cross-entropy -------------------------------------------------------------------

@pytest.mark.parametrize("amp_dtype", AMP, ids=str)
@pytest.mark.parametrize("x_amp", [False, True], ids=["x_fp32", "x_amp"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_under_autocast(kernel_device, amp_dtype, x_amp, rms):
    """fp32 weight/bias (master parameters); x fp32 or in the autocast dtype (a matmul's output)."""
    dev, ctx = on_device(kernel_device)
    rows, cols = 13, 72
    x = (torch.randn(rows, cols, dtype=torch.float64) * 2 + 0.5).to(amp_dtype if x_amp else torch.float32)
    w = torch.randn(cols, dtype=torch.float64).float()
    bias = torch.randn(cols, dtype=torch.float64).float()
    if rms:
        mine = lambda x, w: fasttfm.rms_norm(x, (cols,), w, 1e-5)  # noqa: E731
        theirs, inputs = (lambda x, w: F.rms_norm(x, (cols,), w, 1e-5)), (x, w)
    else:
        mine = lambda x, w, b: fasttfm.layer_norm(x, (cols,), w, b)  # noqa: E731
        theirs, inputs = (lambda x, w, b: F.layer_norm(x, (cols,), w, b)), (x, w, bias)
    with ctx:
        out, grads, dy = _run(mine, dev, amp_dtype, inputs)
    low, low_grads, _ = _run(theirs, "cpu" if dev != "cuda" else "cuda", amp_dtype, inputs, dy)
    ref_in = [t.double().requires_grad_(True) for t in inputs]
    ref = theirs(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dy)
    _check(out, grads, low, low_grads, ref, ref_grads, ["dx", "dweight", "dbias"])


@pytest.mark.parametrize("amp_dtype", AMP, ids=str)
@pytest.mark.parametrize("which", ["softmax", "softmax_dim0", "scaled_masked"])
def test_softmax_under_autocast(kernel_device, amp_dtype, which):
    """softmax on an autocast-dtype input (attention scores from a matmul): fp32 output on CUDA as
    torch.softmax's, the input's dtype on the CPU; scaled_masked_softmax as its torch composition."""
    dev, ctx = on_device(kernel_device)
    x = torch.randn(3, 5, 29, dtype=torch.float64).mul(3).to(amp_dtype)
    mask = torch.rand(3, 1, 29) > 0.3
    if which == "scaled_masked":
        mine = lambda x: fasttfm.scaled_masked_softmax(x, mask.to(x.device), scale=0.7)  # noqa: E731
        theirs = lambda x: torch.softmax((x * 0.7).masked_fill(~mask.to(x.device), float("-inf")), -1)  # noqa: E731
    else:
        dim = 0 if which == "softmax_dim0" else -1
        mine, theirs = (lambda x: fasttfm.softmax(x, dim)), (lambda x: torch.softmax(x, dim))
    with ctx:
        out, grads, dy = _run(mine, dev, amp_dtype, [x])
    low, low_grads, _ = _run(theirs, "cpu" if dev != "cuda" else "cuda", amp_dtype, [x], dy)
    ref_in = [x.double().requires_grad_(True)]
    ref = theirs(*ref_in)
    _check(out, grads, low, low_grads, ref, torch.autograd.grad(ref, ref_in, dy), ["dx"])


@pytest.mark.parametrize("amp_dtype", AMP, ids=str)
@pytest.mark.parametrize("x_amp", [False, True], ids=["x_fp32", "x_amp"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_under_autocast(kernel_device, amp_dtype, x_amp, reduction):
    """fp32 loss and fp32 math, as F.cross_entropy under autocast (class weights fp32)."""
    dev, ctx = on_device(kernel_device)
    rows, classes = 21, 97
    x = (torch.randn(rows, classes, dtype=torch.float64) * 3).to(amp_dtype if x_amp else torch.float32)
    cw = torch.rand(classes, dtype=torch.float64).float() + 0.5
    t = torch.randint(0, classes, (rows,))
    t[4] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1)
    with ctx:
        out, grads, dy = _run(lambda x: fasttfm.cross_entropy(x, t.to(x.device), cw.to(x.device), **kw), dev,
                              amp_dtype, [x])
    low, low_grads, _ = _run(lambda x: F.cross_entropy(x, t.to(x.device), cw.to(x.device), **kw),
                             "cpu" if dev != "cuda" else "cuda", amp_dtype, [x], dy)
    ref_in = [x.double().requires_grad_(True)]
    ref = F.cross_entropy(ref_in[0], t, cw.double(), **kw)
    _check(out, grads, low, low_grads, ref, torch.autograd.grad(ref, ref_in, dy), ["dlogits"])


def test_every_op_has_an_autocast_rule():
    """No fasttfm custom op falls through autocast (the cause of the bf16 einsums above)."""
    import fasttfm.ops.linear_cross_entropy  # noqa: F401  (registers its ops)
    names = [n for n in dir(torch.ops.fasttfm) if not n.startswith("_") and
             isinstance(getattr(torch.ops.fasttfm, n), torch._ops.OpOverloadPacket)]
    assert {"attn_fwd", "attn_bwd", "attn_decode", "layer_norm_fwd", "softmax_fwd", "cross_entropy_fwd",
            "linear_cross_entropy_fwd"} <= set(names)
    missing = [n for n in names
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttfm::{n}", "AutocastCPU")
               or not torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttfm::{n}", "AutocastCUDA")]
    assert not missing, f"custom ops without an autocast rule: {missing}"


def test_attention_autocast_rule_under_torch_compile():
    """The rule also holds when torch.compile traces the op (py_impl of the autocast key)."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 37, 32, requires_grad=True) for _ in range(3))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fasttfm.attention(q, k, v, window=(5, 2))

    with fasttfm.emulate(False):
        out = torch.compile(step, fullgraph=True, backend="aot_eager")()
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        ref = step()
        ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_rms_norm_cuda_rule_matches_the_installed_torch():
    """rms_norm joined CUDA autocast's fp32 list in torch 2.12; fasttfm's rule must say what the
    installed torch's own list (ATen/autocast_mode.h, shipped in the wheel) says. On torch 2.11 the
    H200 run caught fasttfm returning fp32 where torch keeps bf16."""
    import os
    import re

    from fasttfm.ops import layer_norm as ln

    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "autocast_mode.h")
    if not os.path.exists(header):
        pytest.skip("torch's headers are not installed")
    text = open(header).read()
    assert re.search(r"_\(layer_norm\)", text), "the header's layout changed: update this test"
    assert ln._RMS_NORM_FP32_ON_CUDA == bool(re.search(r"_\(rms_norm\)", text))
