"""Shared test helpers: FlashAttention's relative oracle, fresh random inputs, devices.

The oracle (VERIFY.md, FlashAttention issue #410): a kernel's error against a float64
reference must be at most ``factor`` x the error PyTorch's own op makes in the same low
precision (``torch_lowp``), plus a tiny absolute floor. For fp32 and fp64 the low-precision
baseline is the computation itself in that dtype.
"""
import os

import pytest
import torch

__all__ = ["assert_close_oracle", "max_err", "randn", "poison_", "DTYPES", "require_gpu"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Absolute floor, relative to the largest reference magnitude. It is never below half an ulp of
# the output dtype there: a result has to be rounded to its dtype, so a correctly rounded answer
# can be that far off even when torch's own result happens to land on the nearer neighbour (small
# outputs, e.g. a 7-element dweight, make that lucky case common).
_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: torch.finfo(torch.float16).eps / 2,
          torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_oracle(out, ref64, torch_lowp, *, factor=2.0, floor=None, name="output"):
    """Assert |out - ref64| <= factor * |torch_lowp - ref64| + floor (elementwise maxima).

    out: the kernel's result; ref64: the float64 reference; torch_lowp: PyTorch's own op
    evaluated in the same dtype as ``out`` (or any baseline of that precision).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out_d = out.detach().double().cpu()
    ref_d = ref64.detach().double().cpu()
    assert torch.isfinite(out_d).all() == torch.isfinite(ref_d).all(), f"{name}: non-finite values differ"
    fin = torch.isfinite(ref_d)
    if not fin.all():
        assert torch.equal(out_d[~fin], ref_d[~fin]), f"{name}: non-finite entries differ"
    err = max_err(out_d[fin], ref_d[fin])
    base = max_err(torch_lowp.detach().double().cpu()[fin], ref_d[fin])
    if floor is None:
        floor = _FLOOR.get(out.dtype, 1e-6) * max(1.0, ref_d[fin].abs().max().item() if fin.any() else 1.0)
    bound = factor * base + floor
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x torch's {base:.3e} + {floor:.1e}"


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False, generator=None):
    t = (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel fails to write shows up."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))


def require_gpu():
    """Skip without CUDA, or fail when FASTTFM_REQUIRE_GPU=1 (GPU runners cannot pass by skipping)."""
    if torch.cuda.is_available():
        return
    if os.environ.get("FASTTFM_REQUIRE_GPU") == "1":
        pytest.fail("FASTTFM_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
    pytest.skip("no CUDA device on this machine (the same test runs the real kernels on a GPU runner)")
