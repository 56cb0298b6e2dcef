"""The functional API: drop-in replacements for the ``torch.nn.functional`` ops fasttfm fuses.

Each function has the signature of the PyTorch op it replaces; see the op modules in
``fasttfm/ops/`` for shapes, layouts, dtype rules and masking conventions.
"""
from .ops.attention import attention, scaled_dot_product_attention
from .ops.attention_decode import attention_with_kvcache
from .ops.cross_entropy import cross_entropy
from .ops.layer_norm import layer_norm, rms_norm
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.softmax import scaled_masked_softmax, softmax

__all__ = ["attention", "attention_with_kvcache", "scaled_dot_product_attention", "layer_norm", "rms_norm",
           "softmax", "scaled_masked_softmax", "cross_entropy", "linear_cross_entropy"]
