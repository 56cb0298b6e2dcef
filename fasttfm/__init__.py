"""fasttfm: fused Transformer training kernels for PyTorch.

Triton flash attention and CUDA C++ LayerNorm/RMSNorm, softmax and cross-entropy, each a
drop-in replacement for the PyTorch op or module it replaces. CUDA tensors run the kernels;
CPU tensors run a correct CPU path, or the GPU kernels' own source through Triton's interpreter
and a SIMT emulator when ``FASTTFM_EMULATE=1`` (or ``with fasttfm.emulate(): ...``).
"""
import importlib as _importlib
import importlib.util as _ilu
import os as _os
import sys as _sys


def _map_source_folders():
    # An installed fasttfm has fasttfm/kernels and fasttfm/bench (setup.py maps kernels/ and bench/ there).
    # In a source checkout built in place (`make build`), they stay in ../kernels and ../bench: load those
    # folders as fasttfm.kernels and fasttfm.bench so both layouts import the same way.
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for name in ("kernels", "bench"):
        if _ilu.find_spec(f"fasttfm.{name}") is not None:
            continue
        folder = _os.path.join(root, name)
        init = _os.path.join(folder, "__init__.py")
        if _os.path.exists(init):
            spec = _ilu.spec_from_file_location(f"fasttfm.{name}", init, submodule_search_locations=[folder])
            module = _ilu.module_from_spec(spec)
            _sys.modules[f"fasttfm.{name}"] = module
            spec.loader.exec_module(module)


_map_source_folders()

from . import nn  # noqa: E402
from ._env import emulate, emulate_enabled, set_emulate  # noqa: E402
from ._ext import MissingExtensionError  # noqa: E402
from .functional import (attention, attention_with_kvcache, cross_entropy, layer_norm,  # noqa: E402
                         linear_cross_entropy, rms_norm, scaled_dot_product_attention, scaled_masked_softmax,
                         softmax)
from .patch import patch, sdpa_patched  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # fasttfm.distributed (ring attention on torch.distributed) loads on first use, not with `import fasttfm`
    if name == "distributed":
        return _importlib.import_module(f"{__name__}.distributed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "__version__",
    "nn",
    "emulate",
    "emulate_enabled",
    "set_emulate",
    "MissingExtensionError",
    "attention",
    "attention_with_kvcache",
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
    "softmax",
    "scaled_masked_softmax",
    "cross_entropy",
    "linear_cross_entropy",
    "patch",
    "sdpa_patched",
    "distributed",
]
