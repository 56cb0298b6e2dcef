"""LayerNorm and RMSNorm as torch.library custom ops (``fasttfm::layer_norm_fwd/bwd``).

Math (fp32 statistics for fp32/fp16/bf16 inputs, float64 ones for float64):
  LayerNorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps), biased variance;
  RMSNorm:   y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps).
Both normalize over the trailing ``normalized_shape`` dims; the ops see x as [rows, cols].

Dispatch: CUDA tensors -> the CUDA kernels in csrc/layer_norm.cu; under ``FASTTFM_EMULATE=1``
CPU tensors -> the same CUDA kernels through the SIMT emulator; otherwise CPU tensors take the CPU
path, chosen by measurement on the 2-core dev machines (4M elements, fp32/bf16, widths 1024/8192):
  * LayerNorm: aten's ``native_layer_norm`` and its backward (about 2x faster than our C++ CPU
    kernel there, and bit-identical to nn.LayerNorm);
  * RMSNorm fp32/bf16: our fused C++ kernel (csrc/cpu/norm_cpu.cpp), 4-7x faster than aten's
    ``_fused_rms_norm`` forward, which also has no CPU backward; fp16: aten's forward and a
    backward in fp32 torch ops (our kernel's software fp16 conversion made it 6x slower).
Float64 inputs (gradcheck) and builds without fasttfm._C use torch ops; float64 keeps mean/rstd in
float64 from forward to backward. CUDA tensors take those torch ops only under
``FASTTFM_ALLOW_FALLBACK=1`` (one warning); otherwise a missing or broken extension raises.

Dtypes: input fp32/fp16/bf16; weight/bias either the input's dtype or fp32 (mixed precision
keeps fp32 parameters); output in the input's dtype; parameter gradients in the weight's dtype,
reduced over rows deterministically (no atomics).
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._ext import KERNEL_DTYPES, backend, cpu_kernels_for, cuda_kernels, emu_lib
from ._autocast import fp32, keep, register_autocast

__all__ = ["layer_norm", "rms_norm", "default_rms_eps"]

_FLOAT_TYPES = KERNEL_DTYPES


def _stat_dtype(x):
    """dtype of the saved mean/rstd: float32, or float64 for float64 input (plain CPU path only)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps torch's ``F.rms_norm``/``nn.RMSNorm`` use for ``eps=None``: the epsilon of the dtype the
    op computes in -- float32's for fp16/bf16/fp32 inputs, float64's for float64 -- not the input dtype's
    (aten's rms_norm and its ``_fused_rms_norm`` decomposition both take their math dtype's epsilon,
    whatever the docstring says; tests/test_layer_norm.py reads it back from the installed torch)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# ---- forward ---------------------------------------------------------------------------------

@torch.library.custom_op("fasttfm::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """x: [rows, cols] (unit column stride). Returns y [rows, cols], mean [rows] (empty for RMS), rstd [rows]."""
    return _layer_norm_fwd_cuda(x, weight, bias, eps, rms)


def _layer_norm_fwd_cuda(x, weight, bias, eps, rms):
    """CUDA tensors: the CUDA kernel; torch's ops only under FASTTFM_ALLOW_FALLBACK=1 (see _ext.cuda_kernels)."""
    lib = cuda_kernels("layer_norm")
    if lib is None:
        return _layer_norm_fwd_torch(x, weight, bias, eps, rms)
    return lib.layer_norm_fwd(x, weight, bias, eps, rms)


@_layer_norm_fwd.register_kernel("cpu")
def _layer_norm_fwd_cpu(x, weight, bias, eps, rms):
    if backend(x) == "emu":
        return emu_lib().layer_norm_fwd(x, weight, bias, eps, rms)
    ext = _rms_cpu_kernels(x) if rms else None
    if ext is not None:
        return ext.layer_norm_fwd_cpu(x, weight, bias, eps, True)
    return _layer_norm_fwd_torch(x, weight, bias, eps, rms)


def _layer_norm_fwd_torch(x, weight, bias, eps, rms):
    """The forward in aten ops (any device): the CPU path's choice, and the CUDA fallback."""
    rows, cols = x.shape
    if rms:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [cols], weight, eps)
        return y, x.new_empty((0,), dtype=_stat_dtype(x)), rstd.to(_stat_dtype(x)).reshape(rows)
    if x.dtype in _HALF:  # fp32 parameters make aten return its fp32 statistics (else rounded to x's dtype)
        weight, bias = _fp32(weight), _fp32(bias)
    y, mean, rstd = torch.native_layer_norm(x, [cols], weight, bias, eps)
    return y, mean.to(_stat_dtype(x)).reshape(rows), rstd.to(_stat_dtype(x)).reshape(rows)


_HALF = (torch.float16, torch.bfloat16)


def _fp32(t):
    return None if t is None else t.float()


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, rms):
    rows = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((0 if rms else rows,), dtype=_stat_dtype(x)), x.new_empty((rows,), dtype=_stat_dtype(x)))


# ---- backward --------------------------------------------------------------------------------

@torch.library.custom_op("fasttfm::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, rms: bool,
                    need_dweight: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns dx [rows, cols] (a new buffer), dweight and dbias [cols] (empty when not needed)."""
    return _layer_norm_bwd_cuda(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias)


def _layer_norm_bwd_cuda(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias):
    """CUDA tensors: the CUDA kernel; torch's ops only under FASTTFM_ALLOW_FALLBACK=1."""
    lib = cuda_kernels("layer_norm")
    if lib is None:
        return _layer_norm_bwd_torch(dy.contiguous(), x, weight, mean, rstd, rms, need_dweight, need_dbias)
    return lib.layer_norm_bwd(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias)


def _rms_cpu_kernels(x):
    # fp16 stays on torch ops: our kernel converts fp16 in software (no F16C without -march) and was
    # 6x slower than aten's _fused_rms_norm on fp16 (4096 x 1024, 2 cores); fp32/bf16 take our kernel.
    return None if x.dtype == torch.float16 else cpu_kernels_for(x)


def _cpu_stat_dtype(x, weight):
    # native_layer_norm on the CPU keeps its statistics in x's dtype unless the weight is fp32.
    return torch.float32 if x.dtype == torch.float32 or (weight is not None and weight.dtype == torch.float32) else x.dtype


def _half_ln_bwd_cpu(dy, x, weight, mean, rstd, need_dweight, need_dbias):
    """LayerNorm backward for fp16/bf16 x on the CPU with fp32 statistics and fp32 accumulation: aten's
    CPU backward gives dx (with fp32 weight, so it reads the fp32 mean/rstd as they are), but its
    dweight/dbias row reductions for 16-bit inputs were ~8% off float64 at 4096 x 1024 (issue 16 item 13),
    so those are fp32 torch reductions here (one fp32 temporary of x's size)."""
    rows, cols = x.shape
    w32 = _fp32(weight)
    dx = torch.ops.aten.native_layer_norm_backward(
        dy, x, [cols], mean.reshape(rows, 1), rstd.reshape(rows, 1), w32, None, [True, False, False])[0]
    dyf = dy.float()
    dw = db = None
    if need_dweight:
        xhat = (x.float() - mean.reshape(rows, 1)) * rstd.reshape(rows, 1)
        dw = (dyf * xhat).sum(0).to(weight.dtype)
    if need_dbias:
        db = dyf.sum(0).to(x.dtype if weight is None else weight.dtype)
    return dx, dw, db


@_layer_norm_bwd.register_kernel("cpu")
def _layer_norm_bwd_cpu(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias):
    if backend(x) == "emu":
        return emu_lib().layer_norm_bwd(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias)
    dy = dy.contiguous()
    if rms and _rms_cpu_kernels(x) is not None:
        need_dweight = need_dweight and weight is not None
        return _rms_cpu_kernels(x).layer_norm_bwd_cpu(dy, x, weight, mean, rstd, True, need_dweight, need_dbias)
    return _layer_norm_bwd_torch(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias)


def _layer_norm_bwd_torch(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias):
    """The backward in torch ops (any device; dy contiguous): the CPU path's choice, and the CUDA fallback."""
    rows, cols = x.shape
    need_dweight = need_dweight and weight is not None
    if rms:  # aten has no CPU kernel for _fused_rms_norm_backward: fp32 math in torch ops
        math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xhat = x.to(math_dtype) * rstd.to(math_dtype).reshape(rows, 1)
        dyf = dy.to(math_dtype)
        g = dyf if weight is None else dyf * weight.to(math_dtype)
        dx = (rstd.to(math_dtype).reshape(rows, 1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        dw = (dyf * xhat).sum(0).to(weight.dtype) if need_dweight else None
        db = None
    elif x.dtype in _HALF:
        dx, dw, db = _half_ln_bwd_cpu(dy, x, weight, mean, rstd, need_dweight, need_dbias)
    else:
        sd = _cpu_stat_dtype(x, weight)
        bias = None if weight is None else torch.zeros_like(weight)  # only its presence matters to aten
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, [cols], mean.to(sd).reshape(rows, 1), rstd.to(sd).reshape(rows, 1), weight, bias,
            [True, need_dweight, need_dbias and weight is not None])
        if need_dbias and weight is None:
            db = dy.float().sum(0).to(x.dtype)
    return dx, (dw if need_dweight else x.new_empty((0,))), (db if need_dbias else x.new_empty((0,)))


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, rms, need_dweight, need_dbias):
    cols = x.shape[1]
    wdtype = weight.dtype if weight is not None else x.dtype
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((cols if need_dweight and weight is not None else 0,), dtype=wdtype),
            x.new_empty((cols if need_dbias else 0,), dtype=wdtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.rms = rms
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy.shape[1] > 1 and dy.stride(1) != 1 or dy.shape[0] > 1 and dy.stride(0) < dy.shape[1]:
        dy = dy.contiguous()  # e.g. the expanded gradient of y.sum(): the kernels need unit column stride
    need_dw = ctx.needs_input_grad[1] and weight is not None
    need_db = ctx.needs_input_grad[2] and ctx.has_bias
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd, ctx.rms, need_dw, need_db)
    if db is not None and db.numel() and db.dtype != ctx.bias_dtype:
        db = db.to(ctx.bias_dtype)
    return (dx if ctx.needs_input_grad[0] else None, dw if need_dw else None, db if need_db else None, None, None)


torch.library.register_autograd("fasttfm::layer_norm_fwd", _backward, setup_context=_setup_context)

# Autocast, as torch's layer_norm/rms_norm: on CUDA layer_norm is on autocast's fp32 list (x, weight,
# bias cast to fp32, fp32 output), and rms_norm joined it in torch 2.12 (pytorch #174824; on 2.11 an
# rms_norm under CUDA autocast keeps its input dtype -- the H200 run caught our fp32 output there); on
# the CPU neither is on a list (input dtype in and out; fp32 math anyway).
_RMS_NORM_FP32_ON_CUDA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)
_fp32_args = fp32(0, 1, 2)


def _cuda_norm_rule(args, device_type):
    rms = args[4]
    return _fp32_args(args, device_type) if (not rms or _RMS_NORM_FP32_ON_CUDA) else args


register_autocast("fasttfm::layer_norm_fwd", cpu=keep, cuda=_cuda_norm_rule)
register_autocast("fasttfm::layer_norm_bwd", keep, keep)


# ---- public functions ------------------------------------------------------------------------

def _check(name, x, normalized_shape, weight, bias):
    if not isinstance(x, Tensor):
        raise TypeError(f"fasttfm.{name}: input must be a Tensor, got {type(x).__name__}")
    where = backend(x)  # also rejects devices other than cpu/cuda with a clear error
    if x.dtype not in _FLOAT_TYPES and not (x.dtype == torch.float64 and where == "cpu"):
        raise TypeError(f"fasttfm.{name}: input dtype must be float32, float16 or bfloat16 (float64 only on the "
                        f"plain CPU path), got {x.dtype} on {where}")
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (list, tuple, torch.Size)) else (int(normalized_shape),)
    if len(shape) == 0 or x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"fasttfm.{name}: normalized_shape {list(shape)} must equal the trailing dims of the "
                         f"input, whose shape is {list(x.shape)}")
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != shape:
            raise ValueError(f"fasttfm.{name}: {pname} shape {list(p.shape)} must equal normalized_shape {list(shape)}")
        if p.device != x.device:
            raise ValueError(f"fasttfm.{name}: {pname} is on {p.device} but input is on {x.device}; they must match")
        if p.dtype != x.dtype and p.dtype != torch.float32:
            raise TypeError(f"fasttfm.{name}: {pname} dtype must be the input's ({x.dtype}) or float32, got {p.dtype}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"fasttfm.{name}: weight ({weight.dtype}) and bias ({bias.dtype}) dtypes must match")
    return shape


def _as_rows(x, cols):
    """[rows, cols] view of x with unit column stride (a copy only when no such view exists)."""
    rows = x.numel() // cols if cols else 0
    if x.dim() >= 1 and cols > 0:
        try:
            x2 = x.view(rows, cols)
            if cols == 1 or x2.stride(1) == 1:
                return x2
        except RuntimeError:
            pass
    return x.reshape(rows, cols).contiguous()


def _norm(name, x, normalized_shape, weight, bias, eps, rms):
    shape = _check(name, x, normalized_shape, weight, bias)
    cols = math.prod(shape)
    x2 = _as_rows(x, cols)
    w = None if weight is None else weight.reshape(cols)
    b = None if bias is None else bias.reshape(cols)
    y, _, _ = _layer_norm_fwd(x2, w, b, float(eps), rms)
    return y.view(x.shape)


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Drop-in ``F.layer_norm``: normalizes over the trailing ``normalized_shape`` dims.

    input: (*, *normalized_shape), fp32/fp16/bf16, any strides; weight/bias: normalized_shape,
    input's dtype or fp32. Returns a contiguous tensor of input's shape and dtype.
    """
    return _norm("layer_norm", input, normalized_shape, weight, bias, eps, rms=False)


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Drop-in ``F.rms_norm``: ``eps=None`` means torch's default, :func:`default_rms_eps` (float32's
    epsilon for fp16/bf16/fp32 input, float64's for float64)."""
    if eps is None:
        eps = default_rms_eps(input.dtype) if isinstance(input, Tensor) else 1e-6
    return _norm("rms_norm", input, normalized_shape, weight, None, eps, rms=True)
