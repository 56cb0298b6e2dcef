"""Softmax as torch.library custom ops (``fasttfm::softmax_fwd/bwd``): a drop-in ``torch.softmax``
over any dim, and the scaled / masked / causal softmax of attention fallbacks (Megatron style).

Math (fp32 for fp32/fp16/bf16 inputs):
  z = x * scale (+ additive mask), -inf where a bool mask is False or a key is causally hidden;
  y = exp(z - max z) / sum exp(z - max z);   dx = scale * y * (dy - sum(y * dy))  (dy is never written).

Layouts. The kernels see x as ``[outer, C, inner]`` with softmax over C:
  * last dim (inner == 1): rows with a row stride, read in place (no copy for any strided batch of
    rows, e.g. a slice of a wider buffer);
  * other dims: a strided kernel reads x in place, threads along the contiguous inner axis, so no
    transpose copy is made. A tensor whose softmax dim has unit stride (a transposed view) is read as
    rows instead. Only when x's strides allow neither view is x copied once (``contiguous()``).
The output is contiguous in that layout (x's shape; for a transposed view, a permuted view of a
contiguous buffer).

Dispatch: CUDA tensors -> csrc/softmax.cu. CPU tensors with ``FASTTFM_EMULATE=1`` -> the same CUDA
source in the SIMT emulator. CPU tensors otherwise, chosen by measurement on the 2-core dev machines
(bench/bench_softmax.py, rows labelled CPU):
  * plain ``softmax``: ``torch.softmax`` itself (aten's vectorized kernel ties our C++ row kernel for
    fp32/bf16 and beats it 3-5x for fp16; the custom op would only add dispatch), so the result is
    torch's, bit for bit;
  * scaled / masked / causal rows: the fused C++ kernel csrc/cpu/softmax_cpu.cpp (one pass into a
    float row buffer, AVX2 exp), 2.3-2.8x faster than composing torch ops (fp32/bf16; on par for
    fp16), with fp32 math and empty rows -> 0; its backward is aten's ``_softmax_backward_data``.
There are no float64 kernels: plain ``softmax`` of float64 (input, or ``dtype=torch.float64``) calls
``torch.softmax`` on every backend (CPU, emulation, CUDA); the custom ops take float64 on the plain CPU
path only (torch ops; gradcheck). CUDA tensors take the torch-ops path only under
``FASTTFM_ALLOW_FALLBACK=1`` (one warning); otherwise a missing or broken extension raises.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .._ext import KERNEL_DTYPES, backend, cpu_kernels_for, cuda_kernels, emu_lib
from ._autocast import eligible, keep, register_autocast

__all__ = ["softmax", "scaled_masked_softmax"]

_FLOAT_TYPES = KERNEL_DTYPES


# ---- forward ---------------------------------------------------------------------------------

@torch.library.custom_op("fasttfm::softmax_fwd", mutates_args=())
def _softmax_fwd(x: Tensor, nq: int, scale: float, mask: Optional[Tensor], causal: bool, zero_empty: bool,
                 dtype: Optional[torch.dtype]) -> Tensor:
    """x: [outer, C, inner] (unit stride along C when inner == 1, else along inner); softmax over C.

    mask (inner == 1 only): [d0, d1, nq, C] view with broadcast (0) strides, d0 * d1 * nq == outer;
    bool (True = keep) or additive in x's dtype. causal: row r is query r % nq of nq over C keys,
    aligned bottom-right. zero_empty: rows with no visible key give 0 instead of NaN.
    dtype: output dtype (x's, or float32 for fp16/bf16 x). Returns contiguous [outer, C, inner].
    """
    return _softmax_fwd_cuda(x, nq, scale, mask, causal, zero_empty, dtype)


def _softmax_fwd_cuda(x, nq, scale, mask, causal, zero_empty, dtype):
    """CUDA tensors: the CUDA kernel; torch's ops only under FASTTFM_ALLOW_FALLBACK=1 (see _ext.cuda_kernels)."""
    lib = cuda_kernels("softmax")
    if lib is None:
        return _softmax_fwd_torch(x, nq, scale, mask, causal, zero_empty, dtype)
    return lib.softmax_fwd(x, nq, scale, mask, causal, zero_empty, dtype)


def _plain(mask, causal, scale, zero_empty):
    return mask is None and not causal and scale == 1.0 and not zero_empty


@_softmax_fwd.register_kernel("cpu")
def _softmax_fwd_cpu(x, nq, scale, mask, causal, zero_empty, dtype):
    if backend(x) == "emu" and x.dtype in _FLOAT_TYPES:
        return emu_lib().softmax_fwd(x, nq, scale, mask, causal, zero_empty, dtype)
    ext = None if _plain(mask, causal, scale, zero_empty) else _cpu_ext(x)
    if ext is not None:  # fused C++ kernel: 3x faster than the composition below (fp32/bf16, 2 cores)
        return ext.softmax_fwd_cpu(x, nq, scale, mask, causal, zero_empty, dtype)
    return _softmax_fwd_torch(x, nq, scale, mask, causal, zero_empty, dtype)


def _softmax_fwd_torch(x, nq, scale, mask, causal, zero_empty, dtype):
    """The forward in torch ops (any device): the CPU path's choice, and the CUDA fallback."""
    out_dtype = dtype or x.dtype
    if _plain(mask, causal, scale, zero_empty):
        outer, c, inner = x.shape
        if inner == 1:  # torch's last-dim kernel, as torch.softmax(input, -1) uses (same bits)
            return torch.softmax(x.to(out_dtype).view(outer, c), -1).view(outer, c, 1)
        return torch.softmax(x.to(out_dtype), 1).contiguous()
    outer, nk, _ = x.shape  # float64 (gradcheck), no fasttfm._C, or the CUDA fallback: fp32/fp64 math
    d0, d1 = (mask.shape[0], mask.shape[1]) if mask is not None else (outer // nq, 1)
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(math_dtype).reshape(d0, d1, nq, nk) * scale
    if mask is not None:  # [d0, d1, nq, nk] with broadcast strides: elementwise, never expanded
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(math_dtype)
    if causal:
        keep = torch.ones(nq, nk, dtype=torch.bool, device=x.device).tril(nk - nq)
        z = z.masked_fill(~keep, float("-inf"))
    y = torch.softmax(z, -1)
    if zero_empty:
        y = y.masked_fill(torch.isneginf(z.amax(-1, keepdim=True)), 0.0)
    return y.reshape(outer, nk, 1).to(out_dtype)


def _cpu_ext(x):
    """The CPU C++ kernel for fp32/fp16/bf16 rows (inner == 1), or None (float64, strided, or not built)."""
    return cpu_kernels_for(x) if x.shape[2] == 1 else None


@_softmax_fwd.register_fake
def _(x, nq, scale, mask, causal, zero_empty, dtype):
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


# ---- backward --------------------------------------------------------------------------------

@torch.library.custom_op("fasttfm::softmax_bwd", mutates_args=())
def _softmax_bwd(y: Tensor, dy: Tensor, nq: int, scale: float, causal: bool, dx_dtype: torch.dtype) -> Tensor:
    """dx = scale * y * (dy - sum_C(y * dy)) as a new contiguous [outer, C, inner] tensor of dx_dtype.

    causal (inner == 1): hidden keys, where y == 0, are not read. y and dy keep their own dtype.
    """
    return _softmax_bwd_cuda(y, dy, nq, scale, causal, dx_dtype)


def _softmax_bwd_cuda(y, dy, nq, scale, causal, dx_dtype):
    """CUDA tensors: the CUDA kernel; torch's ops only under FASTTFM_ALLOW_FALLBACK=1."""
    lib = cuda_kernels("softmax")
    if lib is None:
        return _softmax_bwd_torch(y, dy, nq, scale, causal, dx_dtype)
    return lib.softmax_bwd(y, dy, nq, scale, causal, dx_dtype)


@_softmax_bwd.register_kernel("cpu")
def _softmax_bwd_cpu(y, dy, nq, scale, causal, dx_dtype):
    if backend(y) == "emu" and y.dtype in _FLOAT_TYPES:
        return emu_lib().softmax_bwd(y, dy, nq, scale, causal, dx_dtype)
    return _softmax_bwd_torch(y, dy, nq, scale, causal, dx_dtype)


def _softmax_bwd_torch(y, dy, nq, scale, causal, dx_dtype):
    """The backward in aten ops (any device; hidden keys have y == 0, so causal needs nothing)."""
    outer, c, inner = y.shape
    if inner == 1:  # aten's last-dim kernel (its generic dim-1 path is ~20x slower on [outer, C, 1])
        dx = torch._softmax_backward_data(dy.reshape(outer, c), y.reshape(outer, c), 1, y.dtype).view(outer, c, 1)
    else:
        dx = torch._softmax_backward_data(dy.contiguous(), y.contiguous(), 1, y.dtype)
    if scale != 1.0:
        dx = dx * scale
    return dx.to(dx_dtype).contiguous()


@_softmax_bwd.register_fake
def _(y, dy, nq, scale, causal, dx_dtype):
    return y.new_empty(y.shape, dtype=dx_dtype)


def _setup_context(ctx, inputs, output):
    x, nq, scale, mask, causal, _, _ = inputs
    ctx.args = (nq, scale, causal, x.dtype)
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.save_for_backward(output)


def _kernel_layout(t: Tensor) -> Tensor:
    """``t`` ([outer, C, inner]) when it has the unit stride the kernels read along (C when inner == 1,
    else inner), otherwise a contiguous copy: e.g. the expanded (stride-0) gradient of ``y.sum()``."""
    ok = (t.shape[1] <= 1 or t.stride(1) == 1) if t.shape[2] == 1 else t.stride(2) == 1
    return t if ok else t.contiguous()


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    nq, scale, causal, x_dtype = ctx.args
    dy = _kernel_layout(dy)
    need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if not need_mask:
        dx = _softmax_bwd(y, dy, nq, scale, causal, x_dtype) if need_x else None
        return dx, None, None, None, None, None, None
    dz = _softmax_bwd(y, dy, nq, 1.0, causal, x_dtype)  # d loss / d z; an additive mask's gradient
    dx = dz * scale if need_x else None
    return dx, None, None, dz.reshape(ctx.mask_shape), None, None, None


torch.library.register_autograd("fasttfm::softmax_fwd", _backward, setup_context=_setup_context)


def _fp32_out(args, device_type):
    """torch.softmax on CUDA under autocast (fp32_set_opt_dtype): no dtype given and fp16/bf16 input ->
    dtype=float32 (the upcast is fused; no input copy); an explicit dtype is kept."""
    x, dtype = args[0], args[6]
    if dtype is None and eligible(x, device_type) and x.dtype != torch.float32:
        args = args[:6] + (torch.float32,)
    return args


# Autocast: torch.softmax is on CUDA autocast's fp32 list (output fp32) and on no CPU list.
register_autocast("fasttfm::softmax_fwd", cpu=keep, cuda=_fp32_out)
register_autocast("fasttfm::softmax_bwd", keep, keep)


# ---- layouts ---------------------------------------------------------------------------------

def _merged_stride(sizes, strides):
    """The stride of dims (sizes, strides) merged into one, or None when they do not merge as a view."""
    kept = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (_, s0), (n1, s1) in zip(kept, kept[1:]):
        if s0 != s1 * n1:
            return None
    return kept[-1][1] if kept else 0


def _as_3d(x, dim):
    """(x3, undo): an [outer, C, inner] view of x for softmax over `dim` and a function that maps the
    contiguous [outer, C, inner] result back to x's shape. Copies x only when no such view exists."""
    shape, strides = list(x.shape), list(x.stride())
    outer, c, inner = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    lead, tail = _merged_stride(shape[:dim], strides[:dim]), _merged_stride(shape[dim + 1:], strides[dim + 1:])
    if lead is not None and tail is not None:
        if inner == 1 and (c <= 1 or strides[dim] == 1):
            return x.view(outer, c, 1), lambda y: y.view(shape)
        if inner > 1 and tail == 1:
            return x.view(outer, c, inner), lambda y: y.view(shape)
    if c > 1 and strides[dim] == 1:  # e.g. a transposed view: softmax dim contiguous -> rows
        xm = x.movedim(dim, -1)
        if _merged_stride(list(xm.shape[:-1]), list(xm.stride()[:-1])) is not None:
            mshape = list(xm.shape)
            return xm.view(outer * inner, c, 1), lambda y: y.view(mshape).movedim(-1, dim)
    return x.contiguous().view(outer, c, inner), lambda y: y.view(shape)


def _mask_view(mask, scores_shape):
    """mask broadcast to scores (..., Nq, Nk) as a [d0, d1, Nq, Nk] view (0 strides where broadcast).

    The leading dims are merged into at most two; a mask whose strides need more is materialized
    over the leading dims (a copy, documented).
    """
    nq, nk = scores_shape[-2:]
    lead = list(scores_shape[:-2])
    m = mask.expand(*scores_shape)
    sizes, strides = lead, list(m.stride()[:-2])
    groups = []  # (size, stride) of merged leading dims
    for n, s in zip(sizes, strides):
        if n == 1:
            continue
        if groups and groups[-1][1] == s * n:
            groups[-1] = (groups[-1][0] * n, s)
        else:
            groups.append((n, s))
    if len(groups) > 2:
        return m.reshape(1, -1, nq, nk)
    while len(groups) < 2:
        groups.insert(0, (1, 0))
    (d0, _), (d1, _) = groups
    return m.reshape(d0, d1, nq, nk)


# ---- public functions ------------------------------------------------------------------------

def _check_input(name, x, where_ok_f64=True):
    if not isinstance(x, Tensor):
        raise TypeError(f"fasttfm.{name}: input must be a Tensor, got {type(x).__name__}")
    where = backend(x)  # rejects devices other than cpu/cuda with a clear error
    if x.dtype not in _FLOAT_TYPES and not (x.dtype == torch.float64 and where == "cpu" and where_ok_f64):
        raise TypeError(f"fasttfm.{name}: input dtype must be float32, float16 or bfloat16 (float64 only on the "
                        f"plain CPU path), got {x.dtype} on {where}")


def softmax(input: Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Drop-in ``torch.softmax(input, dim, dtype=None)``: same values for every dim and dtype.

    input: any shape and strides, fp32/fp16/bf16 (fp32 math). ``dtype``: as torch, the input is cast
    to it first; fp16/bf16 -> float32 is fused into the kernel (no cast copy). Fully -inf slices give
    NaN, as in torch (``scaled_masked_softmax`` gives zeros instead). Non-last dims are reduced in place
    by a strided kernel (see the module docstring). float64 calls ``torch.softmax`` (every backend).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"fasttfm.softmax: input must be a Tensor, got {type(input).__name__}")
    x = input
    out_dtype = None
    if dtype is not None and dtype != x.dtype:
        if dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
            out_dtype = torch.float32
        else:
            x = x.to(dtype)
    n = max(x.dim(), 1)
    if not isinstance(dim, int) or not -n <= dim < n:
        raise IndexError(f"fasttfm.softmax: dim {dim} is out of range for a {x.dim()}-D input "
                         f"(expected an int in [{-n}, {n - 1}])")
    if x.dtype == torch.float64:  # no float64 kernels: torch's op, one rule for CPU, emulation and CUDA
        return torch.softmax(x, dim)
    _check_input("softmax", x)
    if backend(x) == "cpu":  # aten's CPU kernel: the fastest measured; the op layer would only add dispatch
        return torch.softmax(x, dim, dtype=out_dtype)
    if x.dim() == 0:
        return softmax(x.reshape(1), 0, out_dtype).reshape(())
    x3, undo = _as_3d(x, dim % x.dim())
    return undo(_softmax_fwd(x3, 1, 1.0, None, False, False, out_dtype))


def scaled_masked_softmax(input: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                          causal: bool = False) -> Tensor:
    """Softmax over the last dim of attention scores ``input`` (..., Nq, Nk) with scale and masks.

    z = input * scale, then
      * ``mask`` broadcastable to input (e.g. (B, 1, Nq, Nk), (B, 1, 1, Nk), (Nq, Nk)), never expanded:
        bool with SDPA's convention (True = attend, False = -inf), or additive in input's dtype
        (z + mask; it receives a gradient when it requires one);
      * ``causal``: key k visible to query q iff k <= q + Nk - Nq (bottom-right aligned, as
        FlashAttention and fasttfm's attention; the usual lower triangle when Nq == Nk).
    Rows with no visible key (all masked, or causal rows above the diagonal when Nq > Nk) return
    zeros and get zero gradient, instead of NaN. Output in input's dtype; math in fp32.
    """
    _check_input("scaled_masked_softmax", input)
    x = input
    if x.dim() < 2:
        raise ValueError(f"fasttfm.scaled_masked_softmax: input must be (..., Nq, Nk), got shape {list(x.shape)}")
    nq, nk = x.shape[-2:]
    m4 = None
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"fasttfm.scaled_masked_softmax: mask must be a Tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"fasttfm.scaled_masked_softmax: mask is on {mask.device} but input is on {x.device}")
        if mask.dtype != torch.bool and mask.dtype != x.dtype:
            raise TypeError(f"fasttfm.scaled_masked_softmax: mask dtype must be torch.bool (True = keep) or the "
                            f"input's dtype {x.dtype} (additive), got {mask.dtype}")
        if mask.dim() > x.dim() or any(m not in (1, s) for m, s in zip(reversed(mask.shape), reversed(x.shape))):
            raise ValueError(f"fasttfm.scaled_masked_softmax: mask shape {list(mask.shape)} does not broadcast "
                             f"to the scores shape {list(x.shape)}")
        m4 = _mask_view(mask, x.shape)
    x3, undo = _as_3d(x, x.dim() - 1)
    return undo(_softmax_fwd(x3, nq, float(scale), m4, bool(causal), True, None))
