"""Test-wide setup: the three ways a kernel test runs.

``kernel_device`` parametrizes a test over
  * ``cpu``  - CPU tensors on the plain CPU path (no emulation);
  * ``emu``  - CPU tensors with fasttfm emulation on: the Triton kernels through the interpreter,
               the CUDA kernels through the SIMT emulator build;
  * ``cuda`` - the real kernels on a GPU (skipped without one; FASTTFM_REQUIRE_GPU=1 fails instead).
Use ``on_device(kernel_device)`` to get (torch device, context manager).
"""
import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.oracle import require_gpu  # noqa: E402

KERNEL_DEVICES = ["cpu", "emu", "cuda"]


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    if request.param == "cuda":
        require_gpu()
    return request.param


def on_device(kernel_device):
    """(torch device string, context manager) for a kernel_device parameter."""
    import fasttfm

    if kernel_device == "emu":
        return "cpu", fasttfm.emulate(True)
    if kernel_device == "cpu":
        return "cpu", fasttfm.emulate(False)
    return "cuda", contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _seed():
    # Fresh inputs every run; the seed is printed so a failure can be replayed with
    # FASTTFM_TEST_SEED=<seed>.
    seed = int(os.environ.get("FASTTFM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"seed={seed}")
    yield
