"""The functional API: drop-in replacements for the ``torch.nn.functional`` ops fasttfm fuses.

Each function has the signature of the PyTorch op it replaces; see the op modules in
``fasttfm/ops/`` for shapes, layouts, dtype rules and masking conventions.
"""
from .ops.layer_norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]

# ---- softmax (fasttfm/ops/softmax.py) ----
from .ops.softmax import scaled_masked_softmax, softmax  # noqa: E402

__all__ += ["softmax", "scaled_masked_softmax"]
