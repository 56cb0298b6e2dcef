"""Process-wide switches read by every op.

``FASTTFM_EMULATE=1`` (or :func:`set_emulate` / the :func:`emulate` context manager) makes CPU
tensors run the *GPU kernels from their own source*: Triton kernels through Triton's
interpreter (per call, see ``fasttfm.kernels._interp``), CUDA C++ kernels through the SIMT
emulator build ``fasttfm._C_emu``. It is slow and meant for tests and for debugging a kernel on a
laptop. Without it, CPU tensors take a plain, correct CPU path. CUDA tensors always run the real
kernels.
"""
import contextlib
import os
import threading

__all__ = ["emulate_enabled", "set_emulate", "emulate"]

_state = threading.local()


def _env_default() -> bool:
    return os.environ.get("FASTTFM_EMULATE", "0").strip().lower() in ("1", "true", "yes", "on")


def emulate_enabled() -> bool:
    """True when CPU tensors should run the GPU kernels through the interpreter/emulator."""
    value = getattr(_state, "emulate", None)
    return _env_default() if value is None else value


def set_emulate(enabled) -> None:
    """Turn emulation on/off for this thread (``None`` restores the FASTTFM_EMULATE default)."""
    _state.emulate = None if enabled is None else bool(enabled)


@contextlib.contextmanager
def emulate(enabled: bool = True):
    """Context manager: ``with fasttfm.emulate(): ...`` runs CPU tensors through the GPU kernels."""
    previous = getattr(_state, "emulate", None)
    _state.emulate = bool(enabled)
    try:
        yield
    finally:
        _state.emulate = previous
