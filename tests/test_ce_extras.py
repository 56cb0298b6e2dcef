"""Cross-entropy extras (issue 16 item 15): logit softcapping (Gemma 2's final_logit_softcapping,
logits -> c * tanh(logits / c)) fused into the cross-entropy and fused linear + cross-entropy kernels,
forward and backward, and the z-loss term returned separately (``return_z_loss=True``).

References: float64, from the definition (cap the float64 logits, then tests/test_cross_entropy.py's
``_ref_rows``), on the very values the kernel reads; cpu / emu (the CUDA kernel's source in the SIMT
emulator) / cuda.
"""
import pytest
import torch
import torch.nn.functional as TF

import fasttfm
from tests.conftest import on_device
from tests.oracle import assert_close_oracle
from tests.test_cross_entropy import _grad_tol_check, _ref_reduce, _ref_rows


def _cap(x, c):
    return c * torch.tanh(x / c) if c else x


def _reference(x64, t, w64, ignore_index, reduction, eps, smoothing, z, cap):
    """(loss, z-loss term) in float64 of logits x64 [rows, C] (requires_grad allowed)."""
    xc = _cap(x64, cap)
    rows, tw = _ref_rows(xc, t, w64, ignore_index, eps, smoothing, z)
    valid = t != ignore_index
    zrows = torch.where(valid, z * torch.logsumexp(xc, 1) ** 2, 0.0)
    return (_ref_reduce(rows, tw, w64 is not None, valid, reduction),
            _ref_reduce(zrows, tw, w64 is not None, valid, reduction))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("cap,z,eps,weighted", [(30.0, 1e-3, 0.0, False), (5.0, 1e-2, 0.1, True), (2.5, 0.0, 0.1, False)],
                         ids=["cap30_z", "cap5_z_smooth_weighted", "cap2.5"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new_buffer", "inplace_backward"])
def test_softcap_and_z_loss(kernel_device, dtype, reduction, cap, z, eps, weighted, inplace):
    device, ctx = on_device(kernel_device)
    rows, classes = 13, 1003  # odd vocabulary: scalar head and tail around the vector body
    x64 = (torch.randn(rows, classes, dtype=torch.float64) * 8).to(dtype).double()  # beyond the cap
    t = torch.randint(0, classes, (rows,))
    t[3] = -100
    w64 = torch.rand(classes, dtype=torch.float64) + 0.5 if weighted else None
    dy = torch.randn(rows if reduction == "none" else (), dtype=torch.float64)
    with ctx:
        x = x64.to(dtype).to(device).requires_grad_(True)
        w = None if w64 is None else w64.float().to(device)
        loss, zl = fasttfm.cross_entropy(x * 1, t.to(device), w, reduction=reduction, label_smoothing=eps, z_loss=z,
                                         softcap=cap, return_z_loss=True, inplace_backward=inplace)
        (g,) = torch.autograd.grad(loss, x, dy.float().to(device))
    xr = x64.clone().requires_grad_(True)
    ref, zref = _reference(xr, t, None if w64 is None else w64.float().double(), -100, reduction, eps, "torch", z, cap)
    (gref,) = torch.autograd.grad(ref, xr, dy)
    assert loss.dtype == zl.dtype == torch.float32 and loss.shape == ref.shape == zl.shape
    assert not zl.requires_grad
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(zl.cpu().double(), zref.detach(), rtol=2e-5, atol=1e-7)
    assert g.dtype == dtype
    _grad_tol_check(g, gref, dtype, "dlogits")


def test_softcap_float64_gradcheck():
    """The float64 path (torch ops) with softcapping: gradcheck and the reference."""
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 10, 7])
    fn = lambda x: fasttfm.cross_entropy(x * 4, t, reduction="none", label_smoothing=0.1, z_loss=1e-2,  # noqa: E731
                                         softcap=3.0)
    torch.autograd.gradcheck(fn, (x,))
    ref, _ = _reference(x * 4, t, None, -100, "none", 0.1, "torch", 1e-2, 3.0)
    torch.testing.assert_close(fn(x), ref)


def test_softcap_float_targets_and_module():
    """Class-probability targets go to F.cross_entropy on the capped logits; the module forwards both."""
    x = torch.randn(4, 9, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 9, dtype=torch.float64), 1)
    got = fasttfm.cross_entropy(x * 5, p, softcap=2.0)
    torch.testing.assert_close(got, TF.cross_entropy(2.0 * torch.tanh(x * 5 / 2.0), p))
    t = torch.randint(0, 9, (4,))
    crit = fasttfm.nn.CrossEntropyLoss(z_loss=1e-3, softcap=2.0, return_z_loss=True)
    loss, zl = crit(x.float(), t)
    want, zwant = fasttfm.cross_entropy(x.float(), t, z_loss=1e-3, softcap=2.0, return_z_loss=True)
    assert torch.equal(loss, want) and torch.equal(zl, zwant)
    with pytest.raises(ValueError, match="softcap"):
        fasttfm.cross_entropy(x.float(), t, softcap=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_cross_entropy_softcap(kernel_device, dtype, reduction, bias):
    """Fused linear + CE with softcapping and the z-loss term: every chunk's logits are capped inside
    the kernels (forward and the in-place backward); grads of hidden, weight and bias."""
    device, ctx = on_device(kernel_device)
    rows, hidden, vocab, cap, z = 19, 24, 211, 4.0, 1e-3
    h0 = torch.randn(rows, hidden, dtype=torch.float64).to(dtype).double()
    w0 = (torch.randn(vocab, hidden, dtype=torch.float64) * 3 / hidden**0.5).to(dtype).double()
    b0 = torch.randn(vocab, dtype=torch.float64).to(dtype).double() if bias else None
    t = torch.randint(0, vocab, (rows,))
    t[5] = -100
    dy = torch.randn(rows if reduction == "none" else (), dtype=torch.float64)
    with ctx:
        leaves = [None if p is None else p.to(dtype).to(device).requires_grad_(True) for p in (h0, w0, b0)]
        loss, zl = fasttfm.linear_cross_entropy(leaves[0], leaves[1], t.to(device), leaves[2], reduction=reduction,
                                                label_smoothing=0.1, z_loss=z, chunk_size=8, softcap=cap,
                                                return_z_loss=True)
        used = [p for p in leaves if p is not None]
        grads = torch.autograd.grad(loss, used, dy.float().to(device))
    ref_in = [None if p is None else p.clone().requires_grad_(True) for p in (h0, w0, b0)]
    ref, zref = _reference(TF.linear(*ref_in), t, None, -100, reduction, 0.1, "torch", z, cap)
    ref_grads = torch.autograd.grad(ref, [p for p in ref_in if p is not None], dy)
    # torch's own composition in the same dtype, for the oracle's baseline
    low_in = [None if p is None else p.to(dtype).requires_grad_(True) for p in (h0, w0, b0)]
    logits = _cap(TF.linear(*low_in).float(), cap)
    zlow = _ref_reduce(torch.where(t != -100, z * torch.logsumexp(logits, 1) ** 2, 0.0), None, False, t != -100,
                       reduction)
    low = TF.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1) + zlow
    low_grads = torch.autograd.grad(low, [p for p in low_in if p is not None], dy.float())
    assert loss.dtype == zl.dtype == torch.float32 and not zl.requires_grad
    assert_close_oracle(loss.detach().cpu(), ref, low, floor=2e-5 * max(1.0, ref.abs().max().item()), name="loss")
    assert_close_oracle(zl.cpu(), zref, zlow, floor=2e-5 * max(1.0, zref.abs().max().item()), name="z_loss")
    for name, g, gr, gl in zip(["dhidden", "dweight", "dbias"], grads, ref_grads, low_grads):
        assert g.dtype == dtype
        assert_close_oracle(g.cpu(), gr, gl, factor=3.0, name=name)
