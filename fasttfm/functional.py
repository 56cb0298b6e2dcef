"""The functional API: drop-in replacements for the ``torch.nn.functional`` ops fasttfm fuses.

Each function has the signature of the PyTorch op it replaces; see the op modules in
``fasttfm/ops/`` for shapes, layouts, dtype rules and masking conventions.
"""
from .ops.layer_norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]

# ---- cross-entropy section ----
from .ops.cross_entropy import cross_entropy  # noqa: E402
from .ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402

__all__ += ["cross_entropy", "linear_cross_entropy"]
# ---- end of the cross-entropy section ----
