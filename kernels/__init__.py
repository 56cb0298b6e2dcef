"""Triton kernels of fasttfm, installed as ``fasttfm.kernels``.

Kernel files hold ``@triton.jit`` kernels and their launchers only; autograd and custom-op
registration live in ``fasttfm/ops``. Each kernel module exposes ``aot_cases(cc)`` (see
``_aot.py``) so the static report can compile every shipped config without a GPU.
"""
__all__ = []
