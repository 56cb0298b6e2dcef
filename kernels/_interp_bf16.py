"""bfloat16 for Triton's interpreter, applied only while fasttfm's own interpreted launches run.

Triton's interpreter (3.6 .. 3.8) stores bf16 as raw uint16 bits and then computes on the bit
patterns: ``tl.dot``, arithmetic, fma and reductions give garbage, and fp32 -> bf16 casts
truncate (triton-lang/triton #11584, #5424; the fix PRs were closed unmerged). So
``FASTTFM_EMULATE=1`` would return garbage for bf16 attention. ``bf16_arithmetic()`` patches
``InterpreterBuilder`` (and the interpreter's reductions) for the duration of a context: bf16
operands are widened to fp32 exactly (bits << 16), the op runs in fp32, and bf16 results are
rounded back with round-to-nearest-even (NaN kept quiet), as the GPU does. Operations on other
dtypes go to the interpreter's own code unchanged.

``kernels/_interp.py`` enters the context around each interpreted launch of a fasttfm kernel and
leaves it afterwards, so other Triton code in the process (and GPU compilation) never sees it.

Covered: ``tl.dot`` (bf16 operands, fp32 or bf16 accumulator); casts to/from bf16 (``.to()``,
fp_to_fp with RTNE or RTZ, bf16 -> fp16/fp32/int); elementwise binary ops (+ - * / % min max
and comparisons); unary math (neg exp exp2 log log2 sqrt sin cos floor ceil erf rsqrt); fma;
``tl.sum``/``tl.max``/``tl.min`` reductions. Not covered: clamp, scans, atomics and generic
``tl.reduce`` combine functions on bf16 (the attention kernels use none of these on bf16 data:
they reduce and compute in fp32, and use bf16 only for loads, dots, casts and stores).
"""
import contextlib
import threading

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp

__all__ = ["bf16_arithmetic", "widen", "round_bf16"]

_BUILDER_METHODS = ("create_dot", "cast_impl", "create_fp_to_fp", "binary_op", "unary_op", "create_fma",
                    "create_erf", "create_rsqrt")
_REDUCE_METHODS = ("sum", "min_max")
# One state per process, kept on Triton's interpreter module: a source checkout can import this
# file twice (as ``kernels._interp_bf16`` and ``fasttfm.kernels._interp_bf16``), and both copies
# must agree on the nesting depth and on the methods to delegate to. Those are whatever the
# interpreter had when the outermost context was entered (Triton's own, or a caller's wrapper,
# e.g. a test counting ``create_dot`` calls), and they are put back on exit.
_STATE = _interp.__dict__.setdefault("_fasttfm_bf16_state", {"lock": threading.Lock(), "depth": 0,
                                                              "builder": {}, "reduce": {}})
_ORIG = _STATE["builder"]  # name -> the method in place when the outermost context was entered
_ORIG_REDUCE = _STATE["reduce"]


def widen(bits):
    """bf16 bit patterns (uint16 array) -> float32 values, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def round_bf16(x, rtz=False):
    """float array -> bf16 bit patterns (uint16), round-to-nearest-even (or toward zero)."""
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    if rtz:
        r = b >> 16
    else:
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = r.astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


def _is_bf16(h):
    return h.dtype.scalar == tl.bfloat16


def _handle(data, dtype):
    return _interp.TensorHandle(data, dtype)


def _f32(h):
    return _handle(widen(h.data), tl.float32) if _is_bf16(h) else h


def _back(h32, like_bf16):
    """fp32 result handle -> bf16 handle when the op's type is bf16."""
    if like_bf16 and h32.data.dtype == np.float32:
        return _handle(round_bf16(h32.data), tl.bfloat16)
    return h32


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if not (_is_bf16(a) or _is_bf16(b) or _is_bf16(d)):
        return _ORIG["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
    out = np.matmul(widen(a.data) if _is_bf16(a) else a.data.astype(np.float32),
                    widen(b.data) if _is_bf16(b) else b.data.astype(np.float32))
    out = out + (widen(d.data) if _is_bf16(d) else d.data)
    return _back(_handle(out.astype(np.float32), tl.float32), _is_bf16(d))


def _cast_impl(self, src, dst_type, rtz=False):
    dst = dst_type.scalar
    if _is_bf16(src) and dst == tl.bfloat16:
        return src
    if dst == tl.bfloat16:
        data = widen(src.data) if _is_bf16(src) else src.data.astype(np.float32)
        return _handle(round_bf16(data, rtz), tl.bfloat16)
    if _is_bf16(src):
        return _handle(widen(src.data).astype(_interp._get_np_dtype(dst_type)), dst)
    return _ORIG["cast_impl"](self, src, dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode):
    if _is_bf16(src) or dst_type.scalar == tl.bfloat16:
        return _cast_impl(self, src, dst_type, rtz=rounding_mode == _interp._ir.ROUNDING_MODE.RTZ)
    return _ORIG["create_fp_to_fp"](self, src, dst_type, rounding_mode)


def _binary_op(self, lhs, rhs, op):
    if not (_is_bf16(lhs) or _is_bf16(rhs)):
        return _ORIG["binary_op"](self, lhs, rhs, op)
    output = op(widen(lhs.data) if _is_bf16(lhs) else lhs.data, widen(rhs.data) if _is_bf16(rhs) else rhs.data)
    if output.dtype == np.bool_:  # comparisons: keep the interpreter's own convention
        return _ORIG["binary_op"](self, _handle(output, lhs.dtype.scalar), _handle(output, lhs.dtype.scalar),
                                  lambda a, b: a)
    return _handle(round_bf16(output), tl.bfloat16)


def _unary_op(self, arg, op):
    if not _is_bf16(arg):
        return _ORIG["unary_op"](self, arg, op)
    return _handle(round_bf16(op(widen(arg.data))), tl.bfloat16)


def _create_fma(self, x, y, z):
    if not (_is_bf16(x) or _is_bf16(y) or _is_bf16(z)):
        return _ORIG["create_fma"](self, x, y, z)
    return _handle(round_bf16(_f32(x).data * _f32(y).data + _f32(z).data), tl.bfloat16)


def _create_erf(self, arg):
    return _back(_ORIG["create_erf"](self, _f32(arg)), _is_bf16(arg))


def _create_rsqrt(self, arg):
    return _back(_ORIG["create_rsqrt"](self, _f32(arg)), _is_bf16(arg))


def _red_sum(self, input):
    if input.dtype.scalar != tl.bfloat16:
        return _ORIG_REDUCE["sum"](self, input)
    data = np.sum(widen(input.handle.data), axis=self.axis, keepdims=self.keep_dims)
    return self.to_tensor(round_bf16(data), input.dtype)


def _red_min_max(self, input, val_reduce_op, idx_reduce_op=None):
    x = input[0] if isinstance(input, tuple) else input
    if x.dtype.scalar != tl.bfloat16:
        return _ORIG_REDUCE["min_max"](self, input, val_reduce_op, idx_reduce_op)
    vals = widen(x.handle.data)
    val = idx = None
    if val_reduce_op:
        val = self.to_tensor(round_bf16(val_reduce_op(vals, axis=self.axis, keepdims=self.keep_dims)), x.dtype)
    if idx_reduce_op:
        idx = self.to_tensor(idx_reduce_op(vals, axis=self.axis, keepdims=self.keep_dims), tl.int32)
    return (val, idx) if val is not None and idx is not None else (val if val is not None else idx)


_PATCHES = {"create_dot": _create_dot, "cast_impl": _cast_impl, "create_fp_to_fp": _create_fp_to_fp,
            "binary_op": _binary_op, "unary_op": _unary_op, "create_fma": _create_fma,
            "create_erf": _create_erf, "create_rsqrt": _create_rsqrt}
_REDUCE_PATCHES = {"sum": _red_sum, "min_max": _red_min_max}


@contextlib.contextmanager
def bf16_arithmetic():
    """bf16-correct interpreter arithmetic inside the context (reentrant); the methods found on
    entry are put back when the outermost context exits."""
    with _STATE["lock"]:
        if _STATE["depth"] == 0:
            _ORIG.update({name: _interp.InterpreterBuilder.__dict__[name] for name in _BUILDER_METHODS})
            _ORIG_REDUCE.update({name: _interp.ReduceOps.__dict__[name] for name in _REDUCE_METHODS})
            for name, fn in _PATCHES.items():
                setattr(_interp.InterpreterBuilder, name, fn)
            for name, fn in _REDUCE_PATCHES.items():
                setattr(_interp.ReduceOps, name, fn)
        _STATE["depth"] += 1
    try:
        yield
    finally:
        with _STATE["lock"]:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0:
                for name, fn in _ORIG.items():
                    setattr(_interp.InterpreterBuilder, name, fn)
                for name, fn in _ORIG_REDUCE.items():
                    setattr(_interp.ReduceOps, name, fn)
