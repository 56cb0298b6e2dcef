"""Loading the compiled parts and choosing where an op runs.

``fasttfm._C`` holds the nvcc-built CUDA kernels (library ``torch.ops.fasttfm_C``) and the CPU
C++ kernels; ``fasttfm._C_emu`` holds the same CUDA sources built against the SIMT emulator
(``torch.ops.fasttfm_emu``). ``import fasttfm`` never needs either: an op that needs a missing
part raises :class:`MissingExtensionError` saying how to build it.
"""
import functools
import importlib

import torch

from ._env import emulate_enabled

__all__ = ["MissingExtensionError", "KERNEL_DTYPES", "backend", "cuda_lib", "emu_lib", "cpu_lib", "cpu_kernels_for",
           "built_parts", "emu_set_order"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the CUDA and CPU C++ kernels take

_BUILD_HINT = ("build it with `make build` (or `pip install -e . --no-build-isolation` in an environment "
               "with torch==2.14.1 and, for the CUDA and emulator parts, the CUDA toolkit; see README.md)")


class MissingExtensionError(RuntimeError):
    """A compiled part of fasttfm that this call needs is not built."""


@functools.lru_cache(maxsize=None)
def _load(module):
    try:
        importlib.import_module(f"fasttfm.{module}")
        return True
    except ImportError:
        return False


def _has_kernels(lib):
    return bool(getattr(torch.ops, lib).has_kernels())


def built_parts():
    """{'cuda': bool, 'cpu': bool, 'emulator': bool}: which compiled parts import here."""
    c = _load("_C")
    return {"cuda": c and _has_kernels("fasttfm_C"), "cpu": c, "emulator": _load("_C_emu")}


def cuda_lib():
    """``torch.ops.fasttfm_C`` with the CUDA kernels, or a clear error."""
    if not _load("_C"):
        raise MissingExtensionError(f"fasttfm._C is not built; {_BUILD_HINT}")
    if not _has_kernels("fasttfm_C"):
        raise MissingExtensionError("fasttfm._C was built without CUDA kernels (no CUDA toolkit found at build "
                                    f"time, or FASTTFM_SKIP_CUDA_BUILD=1); {_BUILD_HINT}")
    return torch.ops.fasttfm_C


def cpu_lib():
    """``torch.ops.fasttfm_C`` for the CPU C++ kernels, or a clear error."""
    if not _load("_C"):
        raise MissingExtensionError(f"fasttfm._C is not built; {_BUILD_HINT}")
    return torch.ops.fasttfm_C


def cpu_kernels_for(t: torch.Tensor):
    """``torch.ops.fasttfm_C`` when the CPU C++ kernels take ``t``'s dtype and fasttfm._C is built, else
    None (float64 inputs, or a build without the extension: callers fall back to torch ops)."""
    if t.dtype not in KERNEL_DTYPES or not _load("_C"):
        return None
    return torch.ops.fasttfm_C


def emu_lib():
    """``torch.ops.fasttfm_emu`` (CUDA kernels on CPU tensors through the SIMT emulator)."""
    if not _load("_C_emu"):
        raise MissingExtensionError("FASTTFM_EMULATE=1 needs fasttfm._C_emu (the SIMT emulator build of the CUDA "
                                    f"kernels), which is not built; {_BUILD_HINT}")
    return torch.ops.fasttfm_emu


def emu_set_order(order: int, seed: int = 0) -> None:
    """Run order of a block's threads in the emulator: 0 forward, 1 reverse, 2 random(seed)."""
    emu_lib().set_order(int(order), int(seed))


def backend(t: torch.Tensor) -> str:
    """'cuda' for CUDA tensors, 'emu' for CPU tensors under emulation, else 'cpu'."""
    if t.device.type == "cuda":
        return "cuda"
    if t.device.type == "cpu":
        return "emu" if emulate_enabled() else "cpu"
    raise ValueError(f"fasttfm: tensors must be on 'cpu' or 'cuda', got device {t.device}")
