"""The functional API: drop-in replacements for the ``torch.nn.functional`` ops fasttfm fuses.

Each function has the signature of the PyTorch op it replaces; see the op modules in
``fasttfm/ops/`` for shapes, layouts, dtype rules and masking conventions.
"""
from .ops.attention import attention, scaled_dot_product_attention
from .ops.layer_norm import layer_norm, rms_norm

__all__ = ["attention", "scaled_dot_product_attention", "layer_norm", "rms_norm"]
