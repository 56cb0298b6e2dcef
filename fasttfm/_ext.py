"""Loading the compiled parts and choosing where an op runs.

``fasttfm._C`` holds the nvcc-built CUDA kernels (library ``torch.ops.fasttfm_C``) and the CPU
C++ kernels; ``fasttfm._C_emu`` holds the same CUDA sources built against the SIMT emulator
(``torch.ops.fasttfm_emu``). ``import fasttfm`` never needs either: an op that needs a missing
part raises :class:`MissingExtensionError` saying how to build it.

CUDA tensors never fall back silently: when the CUDA kernels are absent, built without CUDA or fail to
load, every op raises with the real reason (the ImportError text, or the torch version mismatch) and
the rebuild command. ``FASTTFM_ALLOW_FALLBACK=1`` lets them run torch's own ops instead, with one
warning per process (:func:`cuda_kernels`).
"""
import functools
import importlib
import importlib.util
import json
import os
import warnings

import torch

from ._env import emulate_enabled

__all__ = ["MissingExtensionError", "KERNEL_DTYPES", "backend", "cuda_lib", "emu_lib", "cpu_lib", "cpu_kernels_for",
           "built_parts", "emu_set_order", "load_errors", "cuda_kernels", "fallback_allowed"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the CUDA and CPU C++ kernels take

_BUILD_HINT = ("rebuild it against the running torch: `make build` in a source checkout, or `pip install "
               "--no-build-isolation --force-reinstall --no-deps <the fasttfm sdist or checkout>` in this environment "
               "(with the CUDA toolkit for the CUDA and emulator parts; see README.md)")


class MissingExtensionError(RuntimeError):
    """A compiled part of fasttfm that this call needs is not built."""


def _build_info():
    """fasttfm/_build_info.json as written by setup.py (archs, torch version, ...), or {}."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=None)
def _load_error(module):
    """None when ``fasttfm.<module>`` loads; else why not: "not built" when there is no such file,
    otherwise the real reason (a torch version the build was not made for, or the ImportError text)."""
    if importlib.util.find_spec(f"fasttfm.{module}") is None:
        return "not built"
    built = _build_info().get("torch")
    if built and built != torch.__version__:
        return (f"was built against torch {built}, but torch {torch.__version__} is running (a C++ extension only "
                f"loads into the torch it was built for)")
    try:
        importlib.import_module(f"fasttfm.{module}")
        return None
    except ImportError as exc:
        return f"fails to load: {exc}"


def _load(module):
    return _load_error(module) is None


def load_errors():
    """{part: reason} for the compiled parts that exist but do not load (absent parts are not listed)."""
    out = {}
    for part, module in (("_C", "_C"), ("_C_emu", "_C_emu")):
        err = _load_error(module)
        if err not in (None, "not built"):
            out[part] = err
    return out


def _missing(module, what):
    err = _load_error(module)
    if err == "not built":
        return MissingExtensionError(f"{what} is not built; {_BUILD_HINT}")
    return MissingExtensionError(f"{what} {err}; {_BUILD_HINT}")


def _has_kernels(lib):
    return bool(getattr(torch.ops, lib).has_kernels())


def built_parts():
    """{'cuda': bool, 'cpu': bool, 'emulator': bool}: which compiled parts import here."""
    c = _load("_C")
    return {"cuda": c and _has_kernels("fasttfm_C"), "cpu": c, "emulator": _load("_C_emu")}


def cuda_lib():
    """``torch.ops.fasttfm_C`` with the CUDA kernels, or a clear error."""
    if not _load("_C"):
        raise _missing("_C", "fasttfm._C")
    if not _has_kernels("fasttfm_C"):
        raise MissingExtensionError("fasttfm._C was built without CUDA kernels (no CUDA toolkit found at build "
                                    f"time, or FASTTFM_SKIP_CUDA_BUILD=1); {_BUILD_HINT}")
    return torch.ops.fasttfm_C


def fallback_allowed() -> bool:
    """True when ``FASTTFM_ALLOW_FALLBACK=1``: CUDA tensors may run torch's ops when the kernels can't load."""
    return os.environ.get("FASTTFM_ALLOW_FALLBACK", "0").strip().lower() in ("1", "true", "yes", "on")


_fallback_warned = False


def cuda_kernels(what: str):
    """``torch.ops.fasttfm_C`` for the CUDA kernels of op ``what``; or None (the caller runs torch's ops)
    when they can't be used and ``FASTTFM_ALLOW_FALLBACK=1``, with one warning per process. Without that
    variable a missing or broken extension raises :class:`MissingExtensionError` with the real reason."""
    global _fallback_warned
    try:
        return cuda_lib()
    except MissingExtensionError as exc:
        if not fallback_allowed():
            raise MissingExtensionError(f"fasttfm.{what} on a CUDA tensor needs the CUDA kernels: {exc} (or set "
                                        "FASTTFM_ALLOW_FALLBACK=1 to run torch's slower ops instead)") from None
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(f"fasttfm: FASTTFM_ALLOW_FALLBACK=1: CUDA tensors run torch's ops, not fasttfm's kernels "
                          f"(first: {what}): {exc}", RuntimeWarning, stacklevel=3)
        return None


def cpu_lib():
    """``torch.ops.fasttfm_C`` for the CPU C++ kernels, or a clear error."""
    if not _load("_C"):
        raise _missing("_C", "fasttfm._C")
    return torch.ops.fasttfm_C


def cpu_kernels_for(t: torch.Tensor):
    """``torch.ops.fasttfm_C`` when the CPU C++ kernels take ``t``'s dtype and fasttfm._C is built, else
    None (float64 inputs, or an install without the extension: callers fall back to torch ops). An
    extension that exists but does not load raises with the real reason instead of falling back."""
    if t.dtype not in KERNEL_DTYPES:
        return None
    err = _load_error("_C")
    if err == "not built":
        return None
    if err is not None:
        raise _missing("_C", "fasttfm._C")
    return torch.ops.fasttfm_C


def emu_lib():
    """``torch.ops.fasttfm_emu`` (CUDA kernels on CPU tensors through the SIMT emulator)."""
    if not _load("_C_emu"):
        raise _missing("_C_emu", "FASTTFM_EMULATE=1 needs fasttfm._C_emu (the SIMT emulator build of the CUDA "
                       "kernels), which")
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
