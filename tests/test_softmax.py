"""Softmax: drop-in torch.softmax (every dim, dtype=) and scaled/masked/causal softmax, forward and
backward, against float64 references with FlashAttention's relative oracle.

Runs on the CPU path, on the CUDA kernels through the SIMT emulator (forward and reverse thread
orders; random for a subset), and on the real kernels when a GPU is present. In the oracle checks
the ops run with torch's deterministic NaN fill of new memory, so an element a kernel fails to write
shows up.
Widths cover every kernel path: rows (warp- and block-per-row, vector and scalar), staged (row in
shared memory) and split (several blocks per row) up to 262144 columns.
"""
import contextlib

import pytest
import torch

import fasttfm
from fasttfm._ext import emu_set_order
from fasttfm.ops.softmax import _as_3d
from tests.conftest import on_device
from tests.oracle import DTYPES, assert_close_oracle, randn

NEG_INF = float("-inf")


@contextlib.contextmanager
def _nan_fill():
    """torch.empty (and at::empty in the bindings) returns NaN-filled memory inside this block.
    (Only around the ops under test: torch's deterministic mode makes the oracle's indexing slow.)"""
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.utils.deterministic.fill_uninitialized_memory = old[2]


def _orders(kernel_device):
    return [0, 1] if kernel_device == "emu" else [None]


def _grad(fn, leaves, dy, fill=False):
    with _nan_fill() if fill else contextlib.nullcontext():
        out = fn(*leaves)
        return out, torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dy.to(out.dtype))


def _check_softmax(device, x0, dim, dtype, out_dtype=None):
    """fasttfm.softmax vs float64 torch.softmax, with torch's own low-precision error as the baseline."""
    # inputs rounded to dtype once: the references start from exactly the kernel's values
    x0 = x0.to(dtype).double()
    dy0 = randn(*x0.shape, dtype=torch.float64).to(out_dtype or dtype).double()
    x = x0.to(dtype).to(device).requires_grad_(True)
    y, (dx,) = _grad(lambda t: fasttfm.softmax(t, dim, dtype=out_dtype), [x], dy0.to(device), fill=True)
    assert y.dtype == (out_dtype or dtype) and y.shape == x0.shape
    xr = x0.clone().requires_grad_(True)
    ref, (dref,) = _grad(lambda t: torch.softmax(t, dim), [xr], dy0)
    xl = x0.to(dtype).requires_grad_(True)
    low, (dlow,) = _grad(lambda t: torch.softmax(t, dim, dtype=out_dtype), [xl], dy0)
    assert_close_oracle(y.cpu(), ref, low, name="y")
    assert_close_oracle(dx.cpu(), dref, dlow, factor=3.0, name="dx")


LAST_DIM_CASES = [  # (rows, cols): rows path (warp/block), staged, split; odd widths -> scalar path
    (3, 1), (5, 31), (7, 33), (3, 1023), (4, 4096), (2, 4097), (2, 20000), (2, 65536), (1, 65537), (1, 262144),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", LAST_DIM_CASES)
def test_last_dim(kernel_device, rows, cols, dtype):
    for order in _orders(kernel_device):
        if order is not None:
            emu_set_order(order)
        device, ctx = on_device(kernel_device)
        with ctx:
            _check_softmax(device, randn(rows, cols, dtype=torch.float64, scale=3.0), -1, dtype)


def test_cpu_large_output_buffer():
    """An output over 16 MiB: the CPU forward asks for huge pages on its fresh buffer first."""
    with fasttfm.emulate(False):
        _check_softmax("cpu", randn(40, 131072, dtype=torch.float64, scale=3.0), -1, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 2), (2, 300, 40), (2, 2000, 3), (1, 9, 1, 33)], ids=str)
def test_every_dim(kernel_device, shape, dtype):
    """Non-last dims run the strided kernel (registers, and the two-pass path for long C)."""
    device, ctx = on_device(kernel_device)
    if kernel_device == "emu":
        emu_set_order(2, seed=sum(shape))
    x0 = randn(*shape, dtype=torch.float64, scale=2.0)
    with ctx:
        for dim in range(-len(shape), len(shape)):
            _check_softmax(device, x0, dim, dtype)


@pytest.mark.parametrize("layout", ["transposed", "sliced_rows", "step_slice", "misaligned", "expanded"])
def test_strided_inputs(kernel_device, layout):
    device, ctx = on_device(kernel_device)
    base = randn(6, 8, 260, dtype=torch.float64).float().double()  # the values the kernel sees
    x0 = {"transposed": base.transpose(1, 2),  # softmax dim 1 has unit stride -> read as rows
          "sliced_rows": base[:, :, :257],  # row stride 260 > 257 columns
          "step_slice": base[:, ::2, ::3],  # no [outer, C, inner] view: copied once
          "misaligned": base.reshape(-1)[1:1 + 12 * 256].view(12, 256),
          "expanded": base[:1, :1].expand(4, 3, 260)}[layout]
    with ctx:
        for dim in range(x0.dim()):
            x = x0.float().to(device)
            y = fasttfm.softmax(x, dim)
            torch.testing.assert_close(y.cpu().double(), torch.softmax(x0, dim), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("reduce", ["sum", "mean_of_slice"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_gradient_of_a_reduction(kernel_device, dim, reduce):
    """``softmax(x).sum().backward()`` hands the backward an expanded (stride-0) gradient; the CUDA
    kernels refused it (found on the first real-GPU run; reproduced under emulation)."""
    device, ctx = on_device(kernel_device)
    x0 = randn(7, 33, 5, dtype=torch.float64)
    s0 = randn(2, 3, 9, 17, dtype=torch.float64)
    mask = torch.rand(2, 1, 9, 17) > 0.3

    def loss(y):
        return y.sum() if reduce == "sum" else y[..., ::2].mean()

    with ctx:
        for dtype in (torch.float32, torch.bfloat16):
            x = x0.to(dtype).to(device).requires_grad_(True)
            loss(fasttfm.softmax(x, dim)).backward()
            xr = x0.to(dtype).double().requires_grad_(True)
            loss(torch.softmax(xr, dim)).backward()
            xl = x0.to(dtype).requires_grad_(True)
            loss(torch.softmax(xl, dim)).backward()
            assert_close_oracle(x.grad, xr.grad, xl.grad, name=f"softmax dim={dim} {dtype} dx")
            s = s0.to(dtype).to(device).requires_grad_(True)
            loss(fasttfm.scaled_masked_softmax(s, mask.to(device), scale=0.5)).backward()
            sr = s0.to(dtype).double().requires_grad_(True)
            loss(torch.softmax((sr * 0.5).masked_fill(~mask, NEG_INF), -1)).backward()
            sl = s0.to(dtype).requires_grad_(True)
            loss(torch.softmax((sl * 0.5).masked_fill(~mask, NEG_INF), -1)).backward()
            assert_close_oracle(s.grad, sr.grad, sl.grad, name=f"scaled_masked_softmax {dtype} dx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [-1, 1])
def test_fused_upcast_dtype(kernel_device, dtype, dim):
    """softmax(x_half, dim, dtype=float32): the cast is fused; dx comes back in x's dtype."""
    device, ctx = on_device(kernel_device)
    with ctx:
        _check_softmax(device, randn(4, 33, 40, dtype=torch.float64, scale=3.0), dim, dtype, out_dtype=torch.float32)
        x = randn(3, 5, dtype=torch.float32, device=device)
        assert fasttfm.softmax(x, -1, dtype=torch.float16).dtype == torch.float16  # downcast: cast first, as torch



@pytest.mark.parametrize("cast", [False, True], ids=["float64_input", "dtype_float64"])
def test_float64_same_rule_on_every_backend(kernel_device, cast):
    """float64 (input, or dtype=torch.float64) runs torch.softmax on every backend: the plain CPU path,
    emulation and CUDA alike (issue 16: emulation raised where CUDA handed off to torch)."""
    device, ctx = on_device(kernel_device)
    x0 = randn(3, 7, 5, dtype=torch.float64, scale=3.0)
    outs = []
    with ctx:
        for dim in (0, 1, -1):
            x = (x0.float() if cast else x0).to(device).requires_grad_(True)
            y = fasttfm.softmax(x, dim, dtype=torch.float64 if cast else None)
            outs.append((dim, x, y, torch.autograd.grad(y, x, torch.ones_like(y).cumsum(dim))[0]))
    for dim, x, y, dx in outs:
        xr = x.detach().cpu().requires_grad_(True)
        ref = torch.softmax(xr, dim, dtype=torch.float64)
        (dref,) = torch.autograd.grad(ref, xr, torch.ones_like(ref).cumsum(dim))
        assert y.dtype == torch.float64 and dx.dtype == x.dtype
        assert_close_oracle(y.cpu(), ref, ref, name="y")  # float64: torch's own op is the reference
        assert_close_oracle(dx.cpu(), dref, dref, name="dx")


# ---- scaled / masked / causal ---------------------------------------------------------------------

def _masked_ref(x, mask, scale, causal):
    """float64 (or x.dtype) composite reference; rows with no visible key -> 0."""
    nq, nk = x.shape[-2:]
    z = x * scale
    if mask is not None:
        z = z.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if causal:
        keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)  # bottom-right aligned
        z = z.masked_fill(~keep, NEG_INF)
    empty = torch.isneginf(z.amax(-1, keepdim=True))
    y = torch.softmax(z.masked_fill(empty, 0.0), -1)  # no NaN in empty rows, so no NaN in the reference grad
    return y.masked_fill(empty, 0.0)


def _make_mask(kind, b, h, nq, nk, dtype):
    if kind == "none":
        return None
    if kind == "bool_b1qk":
        return torch.rand(b, 1, nq, nk) > 0.3
    if kind == "bool_padding":  # (B, 1, 1, Nk) key padding, some batches fully masked
        m = torch.rand(b, 1, 1, nk) > 0.3
        m[0] = False
        return m
    if kind == "bool_qk":
        return torch.rand(nq, nk) > 0.5
    if kind == "add_bhqk":
        return randn(b, h, nq, nk, dtype=torch.float64).to(dtype)
    if kind == "add_1h1k":
        m = randn(1, h, 1, nk, dtype=torch.float64)
        m[..., 0] = NEG_INF
        return m.to(dtype)
    raise ValueError(kind)


def _check_masked(device, dtype, b, h, nq, nk, kind, causal, scale=0.375):
    x0 = randn(b, h, nq, nk, dtype=torch.float64, scale=4.0).to(dtype).double()
    mask = _make_mask(kind, b, h, nq, nk, dtype)
    dy0 = randn(b, h, nq, nk, dtype=torch.float64).to(dtype).double()
    x = x0.to(dtype).to(device).requires_grad_(True)
    y, (dx,) = _grad(lambda t: fasttfm.scaled_masked_softmax(t, None if mask is None else mask.to(device), scale, causal),
                     [x], dy0.to(device), fill=True)
    assert y.dtype == dtype and y.shape == x0.shape
    mref = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    xr = x0.clone().requires_grad_(True)
    ref, (dref,) = _grad(lambda t: _masked_ref(t, mref, scale, causal), [xr], dy0)
    xl = x0.to(dtype).requires_grad_(True)
    low, (dlow,) = _grad(lambda t: _masked_ref(t, mask, scale, causal), [xl], dy0)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert_close_oracle(y.cpu(), ref, low, name="y")
    assert_close_oracle(dx.cpu(), dref, dlow, factor=3.0, name="dx")
    return y


MASKS = ["none", "bool_b1qk", "bool_padding", "bool_qk", "add_bhqk", "add_1h1k"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("nq,nk", [(5, 9), (9, 5), (7, 7), (3, 40)])
def test_masked_fp32(kernel_device, nq, nk, kind, causal):
    device, ctx = on_device(kernel_device)
    if kernel_device == "emu":
        emu_set_order((nq + nk) % 3, seed=nq * nk)
    with ctx:
        _check_masked(device, torch.float32, 2, 3, nq, nk, kind, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bool_b1qk", "add_1h1k"])
@pytest.mark.parametrize("nq,nk", [(6, 64), (3, 4097), (2, 20000)])
def test_masked_half_and_wide(kernel_device, dtype, kind, nq, nk):
    """Vector mask loads (nk % 8 == 0), scalar ones (odd nk), and the staged path with fp32 logits."""
    for order in _orders(kernel_device):
        if order is not None:
            emu_set_order(order)
        device, ctx = on_device(kernel_device)
        with ctx:
            _check_masked(device, dtype, 1, 2, nq, nk, kind, causal=True)


@pytest.mark.parametrize("nk", [300, 262144])
def test_masked_split_path(kernel_device, nk):
    """Rows too long for one block: the split path with bool masks and causal (Nq > Nk and Nq < Nk)."""
    device, ctx = on_device(kernel_device)
    with ctx:
        _check_masked(device, torch.float32, 1, 1, 2, nk, "bool_qk", causal=True)


def test_fully_masked_rows_are_zero(kernel_device):
    device, ctx = on_device(kernel_device)
    x = randn(2, 2, 6, 4, device=device, requires_grad=True)
    mask = torch.ones(2, 1, 6, 4, dtype=torch.bool)
    mask[1, :, 2] = False  # one query row of batch 1 sees nothing
    with ctx:
        y = fasttfm.scaled_masked_softmax(x, mask.to(device), 0.5, causal=True)  # Nq > Nk: rows 0, 1 see nothing
        y.backward(randn(*y.shape, device=device))
    empty = torch.zeros(2, 2, 6, dtype=torch.bool)
    empty[:, :, :2] = True
    empty[1, :, 2] = True
    assert torch.equal(y.detach().cpu()[empty], torch.zeros(int(empty.sum()), 4))
    assert torch.equal(x.grad.cpu()[empty], torch.zeros(int(empty.sum()), 4))
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.detach().cpu().sum(-1)[~empty], torch.ones(int((~empty).sum())))


def test_additive_mask_gradient(kernel_device):
    device, ctx = on_device(kernel_device)
    x0, m0, dy0 = randn(2, 3, 4, 7), randn(1, 3, 1, 7), randn(2, 3, 4, 7)
    with ctx:
        x, m = x0.to(device).requires_grad_(True), m0.to(device).requires_grad_(True)
        y = fasttfm.scaled_masked_softmax(x, m, 0.5, causal=True)
        gx, gm = torch.autograd.grad(y, (x, m), dy0.to(device))
    xr, mr = x0.double().requires_grad_(True), m0.double().requires_grad_(True)
    gxr, gmr = torch.autograd.grad(_masked_ref(xr, mr, 0.5, True), (xr, mr), dy0.double())
    torch.testing.assert_close(gx.cpu().double(), gxr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gm.cpu().double(), gmr, atol=1e-6, rtol=1e-5)


def test_mask_strides(kernel_device):
    """Masks are read through their own strides: transposed (key stride != 1) and offset views."""
    device, ctx = on_device(kernel_device)
    x = randn(2, 2, 8, 16, device=device)
    base = torch.rand(2, 1, 16, 8) > 0.4
    masks = (base.transpose(-1, -2), (torch.rand(2, 1, 8, 17) > 0.4)[..., 1:])
    with ctx:
        ys = [fasttfm.scaled_masked_softmax(x, mask.to(device), 0.25) for mask in masks]
    for mask, y in zip(masks, ys):
        torch.testing.assert_close(y.cpu().double(), _masked_ref(x.cpu().double(), mask, 0.25, False),
                                   atol=2e-6, rtol=1e-5)


def test_nan_and_inf_like_torch(kernel_device):
    """Plain softmax keeps torch's results for all -inf / +inf / NaN rows (NaN), unlike the masked op."""
    device, ctx = on_device(kernel_device)
    x = torch.tensor([[NEG_INF] * 5, [0.0, float("inf"), 1.0, 2.0, 3.0], [0.0, float("nan"), 1.0, 2.0, 3.0],
                      [NEG_INF, 0.0, NEG_INF, 1.0, NEG_INF]], device=device)
    with ctx:
        y = fasttfm.softmax(x, -1)
        z = fasttfm.scaled_masked_softmax(x[:1], None)
    torch.testing.assert_close(y.cpu(), torch.softmax(x.cpu(), -1), equal_nan=True)
    assert torch.equal(z.cpu(), torch.zeros(1, 5))


def test_deterministic_and_dy_untouched(kernel_device):
    device, ctx = on_device(kernel_device)
    x = randn(5, 70000, device=device, requires_grad=True)
    dy = randn(5, 70000, device=device)
    dy_copy = dy.clone()
    with ctx:
        runs = [torch.autograd.grad(fasttfm.softmax(x, -1), x, dy)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(dy, dy_copy)


def test_empty_and_scalar(kernel_device):
    device, ctx = on_device(kernel_device)
    with ctx:
        for shape, dim in (((0, 5), -1), ((3, 0), -1), ((3, 0, 4), 2), ((), 0), ((1,), 0)):
            x = torch.randn(shape, device=device)
            torch.testing.assert_close(fasttfm.softmax(x, dim).cpu(), torch.softmax(x.cpu(), dim))


# ---- API -------------------------------------------------------------------------------------------

def test_gradcheck_float64_cpu():
    with fasttfm.emulate(False):
        x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        for dim in (0, 1, 2):  # the custom op and its autograd (fasttfm.softmax on CPU is torch.softmax)
            def op(t, dim=dim):
                t3, undo = _as_3d(t, dim)
                return undo(torch.ops.fasttfm.softmax_fwd(t3, 1, 1.0, None, False, False, None))
            assert torch.autograd.gradcheck(op, (x,))
        m = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, a: fasttfm.scaled_masked_softmax(t, a, 0.7, causal=True), (x, m))
        b = torch.rand(2, 1, 4) > 0.3
        assert torch.autograd.gradcheck(lambda t: fasttfm.scaled_masked_softmax(t, b, 1.3), (x,))


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"mask shape \[3, 5\] does not broadcast to the scores shape \[2, 3, 4, 5\]"):
        fasttfm.scaled_masked_softmax(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask dtype must be torch.bool .* or the input's dtype torch.float32"):
        fasttfm.scaled_masked_softmax(x, torch.ones(4, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="mask dtype must be"):
        fasttfm.scaled_masked_softmax(x, torch.zeros(4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="is on meta but input is on cpu"):
        fasttfm.scaled_masked_softmax(x, torch.ones(4, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"must be \(..., Nq, Nk\)"):
        fasttfm.scaled_masked_softmax(torch.randn(5), None)
    with pytest.raises(IndexError, match=r"dim 4 is out of range for a 4-D input \(expected an int in \[-4, 3\]\)"):
        fasttfm.softmax(x, 4)
    with pytest.raises(IndexError, match="out of range"):
        fasttfm.softmax(x, -5)
    with pytest.raises(TypeError, match="input dtype must be"):
        fasttfm.softmax(torch.ones(3, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        fasttfm.softmax([1.0, 2.0], 0)
    assert fasttfm.softmax(torch.ones(3, dtype=torch.int64), 0, dtype=torch.float32).dtype == torch.float32


def test_module_is_drop_in():
    x = torch.randn(2, 3, 4)
    for dim in (None, 0, 1, -1):
        ref, ours = torch.nn.Softmax(dim), fasttfm.nn.Softmax(dim)
        assert repr(ref) == repr(ours) and list(ours.state_dict()) == []
        with pytest.warns(UserWarning) if dim is None else contextlib.nullcontext():
            expected = ref(x)
        torch.testing.assert_close(ours(x), expected)


def test_opcheck():
    x = torch.randn(6, 9, 1, requires_grad=True)
    torch.library.opcheck(torch.ops.fasttfm.softmax_fwd.default, (x, 1, 1.0, None, False, False, None))
    torch.library.opcheck(torch.ops.fasttfm.softmax_fwd.default, (torch.randn(2, 9, 4, requires_grad=True), 1, 1.0,
                                                                   None, False, False, None))
    mask = torch.randn(1, 2, 3, 9, requires_grad=True).expand(1, 2, 3, 9)
    torch.library.opcheck(torch.ops.fasttfm.softmax_fwd.default, (x, 3, 0.5, mask, True, True, None))
    xh = torch.randn(6, 9, 1, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.fasttfm.softmax_fwd.default, (xh, 1, 1.0, None, False, False, torch.float32))
    y = torch.softmax(x.detach(), 1)
    torch.library.opcheck(torch.ops.fasttfm.softmax_bwd.default, (y, torch.randn_like(y), 1, 0.5, False, torch.float32))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, mask):
        s = fasttfm.scaled_masked_softmax(x, mask, 0.125, causal=True)
        return fasttfm.nn.Softmax(1)(s * 2.0) + fasttfm.softmax(x, 0)

    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    mask = torch.rand(2, 1, 1, 7) > 0.2
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = (torch.softmax(_masked_ref(x2, mask, 0.125, True) * 2.0, 1) + torch.softmax(x2, 0))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


def test_int64_offsets_cuda():
    """Row offsets beyond 2^31 elements (needs ~9 GB on the GPU)."""
    from tests.oracle import require_gpu

    require_gpu()
    rows, cols = (2**31 // 4096) + 8, 4096
    try:
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    y = fasttfm.softmax(x, -1)
    last = x[-4:].float()
    torch.testing.assert_close(y[-4:].float(), torch.softmax(last, -1), atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_cxx_kernel(dtype):
    """csrc/cpu/softmax_cpu.cpp directly (the CPU path uses it for scaled/masked/causal rows)."""
    from fasttfm._ext import cpu_lib

    lib = cpu_lib()
    x0 = randn(6, 37, dtype=torch.float64, scale=3.0)
    x0[1] = NEG_INF
    x = x0.to(dtype).view(6, 37, 1)
    for zero_empty in (False, True):
        y = lib.softmax_fwd_cpu(x, 3, 0.5, None, True, zero_empty, None).view(2, 3, 37)
        ref = _masked_ref(x0.view(2, 3, 37), None, 0.5, True)
        low = _masked_ref(x0.to(dtype).view(2, 3, 37), None, 0.5, True)
        if zero_empty:
            assert torch.equal(y[0, 1], torch.zeros(37, dtype=dtype))
        else:
            assert torch.isnan(y[0, 1]).all()  # torch's result for a row with no finite value
            y = y.clone()
            y[0, 1] = 0
        assert_close_oracle(y, ref, low, name="y")
    up = lib.softmax_fwd_cpu(x, 1, 1.0, None, False, True, torch.float32)
    assert up.dtype == torch.float32
    w = torch.zeros(3, 300, dtype=dtype)  # NaN or +inf anywhere in a row -> NaN row, as torch (vector + tail)
    w[0, 5], w[1, 290], w[2, 7] = float("nan"), float("nan"), float("inf")
    assert torch.isnan(lib.softmax_fwd_cpu(w.view(3, 300, 1), 1, 1.0, None, False, True, None)).all()
