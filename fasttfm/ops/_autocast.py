"""Autocast rules for fasttfm's custom ops, registered through torch.library.

``torch.library.register_autocast`` casts to one fixed dtype, but an autocast region picks its dtype
(float16 or bfloat16) at run time. An op whose matmuls must follow autocast as ``F.linear`` does
registers :func:`register_lowp_autocast` instead: inside an autocast region of the op's device type,
the listed floating-point tensor arguments (float64 excepted: autocast leaves it alone) are cast to the
region's dtype, and the op runs with autocast off, so its kernels and matmuls see one dtype. The casts
are ordinary differentiable ops: gradients reach fp32 master parameters in their own dtype.
"""
from typing import Iterable, Optional

import torch

__all__ = ["autocast_dtype", "register_lowp_autocast"]

_DEVICE_TYPES = ("cpu", "cuda")
_LIBS = []  # keeps the registrations alive


def _eligible(t, device_type: str) -> bool:
    """Whether autocast casts ``t`` for a lower-precision op on ``device_type`` (as aten's is_eligible)."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def autocast_dtype(t: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype ``t`` has inside an op registered with :func:`register_lowp_autocast`: the autocast
    dtype when autocast is on for t's device type and t is eligible, else t's own dtype."""
    if t is None:
        return None
    dev = t.device.type
    if dev in _DEVICE_TYPES and torch.is_autocast_enabled(dev) and _eligible(t, dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _kernel(op, device_type: str, key, cast: frozenset):
    excluded = torch._C.DispatchKeySet(key)

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(a.to(dtype) if i in cast and _eligible(a, device_type) else a for i, a in enumerate(args))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return kernel


def register_lowp_autocast(qualname: str, cast_args: Iterable[int]) -> None:
    """Autocast rule for custom op ``qualname`` ("ns::name", overload default) on CPU and CUDA: the
    positional arguments ``cast_args`` go to the autocast dtype, the others keep theirs."""
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    lib = torch.library.Library(ns, "IMPL")
    _LIBS.append(lib)
    for device_type in _DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        kernel = _kernel(op, device_type, key, frozenset(cast_args))
        lib.impl(name, kernel, key_name)
        op.py_impl(key)(kernel)  # the same rule under the Python dispatcher (tracing)
