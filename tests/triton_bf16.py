"""Test-only fix for bfloat16 in Triton's interpreter (never used by the kernels themselves).

Triton 3.8's interpreter stores bf16 as raw uint16 bits and then computes on the bit patterns
(``tl.dot``, arithmetic, fma, reductions give garbage) and casts fp32 -> bf16 by truncation
(triton-lang/triton #11584, #5424; the fix PRs were closed unmerged). ``bf16_interpreter()``
patches ``InterpreterBuilder`` (and the interpreter's reductions) for the duration of a context:
bf16 operands are widened to fp32 exactly (bits << 16), the op runs in fp32, and bf16 results
are rounded back with round-to-nearest-even (NaN kept quiet), as the GPU does.

Covered: ``tl.dot`` (bf16 operands, fp32 or bf16 accumulator); casts to/from bf16
(``.to()``, fp_to_fp with RTNE or RTZ, bf16 -> fp16/fp32/int); elementwise binary ops
(+ - * / % min max and comparisons); unary math (neg exp exp2 log log2 sqrt sin cos floor ceil
erf rsqrt); fma; ``tl.sum``/``tl.max``/``tl.min`` reductions. Not covered: clamp, scans,
atomics and generic ``tl.reduce`` combine functions on bf16 (the attention kernels use none of
these on bf16 data: they reduce and compute in fp32, and use bf16 only for loads, dots, casts
and stores).
"""
import contextlib

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp

__all__ = ["bf16_interpreter", "widen", "round_bf16"]


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


def _f32(h):
    return _interp.TensorHandle(widen(h.data), tl.float32) if _is_bf16(h) else h


def _back(h32, like_bf16):
    """fp32 result handle -> bf16 handle when the op's type is bf16."""
    if like_bf16 and h32.data.dtype == np.float32:
        return _interp.TensorHandle(round_bf16(h32.data), tl.bfloat16)
    return h32


@contextlib.contextmanager
def bf16_interpreter():
    B = _interp.InterpreterBuilder
    saved = {name: B.__dict__[name] for name in (
        "create_dot", "cast_impl", "create_fp_to_fp", "binary_op", "unary_op", "create_fma",
        "create_erf", "create_rsqrt")}
    saved_reduce = {name: _interp.ReduceOps.__dict__[name] for name in ("sum", "min_max")}
    orig = dict(saved)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (_is_bf16(a) or _is_bf16(b) or _is_bf16(d)):
            return orig["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(widen(a.data) if _is_bf16(a) else a.data.astype(np.float32),
                        widen(b.data) if _is_bf16(b) else b.data.astype(np.float32))
        out = out + (widen(d.data) if _is_bf16(d) else d.data)
        return _back(_interp.TensorHandle(out.astype(np.float32), tl.float32), _is_bf16(d))

    def cast_impl(self, src, dst_type, rtz=False):
        dst = dst_type.scalar
        if src.dtype.scalar == tl.bfloat16 and dst == tl.bfloat16:
            return src
        if dst == tl.bfloat16:
            data = src.data.astype(np.float32) if not _is_bf16(src) else widen(src.data)
            return _interp.TensorHandle(round_bf16(data, rtz), tl.bfloat16)
        if _is_bf16(src):
            return _interp.TensorHandle(widen(src.data).astype(_interp._get_np_dtype(dst_type)), dst)
        return orig["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if _is_bf16(src) or dst_type.scalar == tl.bfloat16:
            return cast_impl(self, src, dst_type, rtz=rounding_mode == _interp._ir.ROUNDING_MODE.RTZ)
        return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def binary_op(self, lhs, rhs, op):
        if not (_is_bf16(lhs) or _is_bf16(rhs)):
            return orig["binary_op"](self, lhs, rhs, op)
        output = op(widen(lhs.data) if _is_bf16(lhs) else lhs.data, widen(rhs.data) if _is_bf16(rhs) else rhs.data)
        if output.dtype == np.bool_:  # comparisons: keep the interpreter's own convention
            return orig["binary_op"](self, _interp.TensorHandle(output, lhs.dtype.scalar),
                                     _interp.TensorHandle(output, lhs.dtype.scalar), lambda a, b: a)
        return _interp.TensorHandle(round_bf16(output), tl.bfloat16)

    def unary_op(self, arg, op):
        if not _is_bf16(arg):
            return orig["unary_op"](self, arg, op)
        return _interp.TensorHandle(round_bf16(op(widen(arg.data))), tl.bfloat16)

    def create_fma(self, x, y, z):
        if not (_is_bf16(x) or _is_bf16(y) or _is_bf16(z)):
            return orig["create_fma"](self, x, y, z)
        out = _f32(x).data * _f32(y).data + _f32(z).data
        return _interp.TensorHandle(round_bf16(out), tl.bfloat16)

    def create_erf(self, arg):
        return _back(orig["create_erf"](self, _f32(arg)), _is_bf16(arg))

    def create_rsqrt(self, arg):
        return _back(orig["create_rsqrt"](self, _f32(arg)), _is_bf16(arg))

    def red_sum(self, input):
        if input.dtype.scalar != tl.bfloat16:
            return saved_reduce["sum"](self, input)
        data = np.sum(widen(input.handle.data), axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(round_bf16(data), input.dtype)

    def red_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if x.dtype.scalar != tl.bfloat16:
            return saved_reduce["min_max"](self, input, val_reduce_op, idx_reduce_op)
        vals = widen(x.handle.data)
        val = idx = None
        if val_reduce_op:
            val = self.to_tensor(round_bf16(val_reduce_op(vals, axis=self.axis, keepdims=self.keep_dims)), x.dtype)
        if idx_reduce_op:
            idx = self.to_tensor(idx_reduce_op(vals, axis=self.axis, keepdims=self.keep_dims), tl.int32)
        return (val, idx) if val is not None and idx is not None else (val if val is not None else idx)

    patches = dict(create_dot=create_dot, cast_impl=cast_impl, create_fp_to_fp=create_fp_to_fp,
                   binary_op=binary_op, unary_op=unary_op, create_fma=create_fma, create_erf=create_erf,
                   create_rsqrt=create_rsqrt)
    try:
        for name, fn in patches.items():
            setattr(B, name, fn)
        _interp.ReduceOps.sum = red_sum
        _interp.ReduceOps.min_max = red_min_max
        yield
    finally:
        for name, fn in saved.items():
            setattr(B, name, fn)
        for name, fn in saved_reduce.items():
            setattr(_interp.ReduceOps, name, fn)
