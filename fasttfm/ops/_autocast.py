"""Autocast rules for fasttfm's custom ops, registered through torch.library.

A custom op without an autocast rule is invisible to ``torch.autocast``: it runs on whatever dtypes it
is handed, *with autocast still on inside it*, so any torch op its implementation calls (an einsum of a
CPU fallback, a matmul) is silently cast to fp16/bf16. Every fasttfm op therefore registers a rule here:
inside an autocast region of the op's device type the rule rewrites the arguments, then the op runs
with that device's autocast off, so the op alone decides the precision of its math. The rules follow
what torch's autocast does to the op each one replaces (``torch/include/ATen/autocast_mode.h``):

  * :func:`lowp` - like ``F.linear``/``F.scaled_dot_product_attention`` (lower-precision list): the
    listed floating-point arguments (float64 excepted, as aten's ``is_eligible``) go to the region's
    dtype, picked at run time (``torch.library.register_autocast`` only knows one fixed dtype);
  * :func:`fp32` - like ``layer_norm``/``rms_norm`` on CUDA (fp32 list): the listed arguments go to fp32;
  * :func:`keep` - no cast; the op's own precision (e.g. its CPU twin is on no autocast list, or the
    op already computes in fp32 as the listed op would, or it writes into its arguments);
  * any ``rule(args, device_type) -> args`` for the rest (softmax's fp32 ``dtype`` on CUDA).

The casts are ordinary differentiable ops: gradients reach fp32 master parameters in their own dtype.
"""
from typing import Callable, Iterable, Optional, Tuple

import torch

__all__ = ["autocast_dtype", "eligible", "fp32", "keep", "lowp", "register_autocast", "register_lowp_autocast"]

_DEVICE_TYPES = ("cpu", "cuda")
_LIBS = []  # keeps the registrations alive

Rule = Callable[[Tuple, str], Tuple]


def eligible(t, device_type: str) -> bool:
    """Whether autocast casts ``t`` for an op on ``device_type`` (as aten's is_eligible)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def autocast_dtype(t: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype ``t`` has inside an op with a :func:`lowp` rule: the autocast dtype when autocast is on
    for t's device type and t is eligible, else t's own dtype."""
    if t is None:
        return None
    dev = t.device.type
    if dev in _DEVICE_TYPES and torch.is_autocast_enabled(dev) and eligible(t, dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _cast(idx: Iterable[int], dtype_of: Callable[[str], torch.dtype]) -> Rule:
    idx = frozenset(idx)

    def rule(args, device_type):
        dtype = dtype_of(device_type)
        return tuple(a.to(dtype) if i in idx and eligible(a, device_type) else a for i, a in enumerate(args))

    return rule


def lowp(*idx: int) -> Rule:
    """Cast positional arguments ``idx`` to the autocast region's dtype."""
    return _cast(idx, torch.get_autocast_dtype)


def fp32(*idx: int) -> Rule:
    """Cast positional arguments ``idx`` to float32."""
    return _cast(idx, lambda _dev: torch.float32)


def keep(args, device_type):
    """No cast: the op runs on its inputs' dtypes, with autocast off inside."""
    return args


def _kernel(op, device_type: str, key, rule: Rule):
    excluded = torch._C.DispatchKeySet(key)

    def kernel(*args):
        args = rule(args, device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return kernel


def register_autocast(qualname: str, cpu: Rule, cuda: Rule) -> None:
    """Autocast rules for custom op ``qualname`` ("ns::name", overload default) on CPU and CUDA."""
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    lib = torch.library.Library(ns, "IMPL")
    _LIBS.append(lib)
    for device_type, rule in (("cpu", cpu), ("cuda", cuda)):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        kernel = _kernel(op, device_type, key, rule)
        lib.impl(name, kernel, key_name)
        op.py_impl(key)(kernel)  # the same rule under the Python dispatcher (tracing)


def register_lowp_autocast(qualname: str, cast_args: Iterable[int]) -> None:
    """:func:`lowp` on CPU and CUDA for ``cast_args``; the other arguments keep their dtypes."""
    rule = lowp(*cast_args)
    register_autocast(qualname, rule, rule)
