"""Modules with torch.nn's constructor signatures and state_dict keys, backed by fasttfm ops.

A fasttfm module can load a torch.nn module's state_dict and vice versa; ``fasttfm.patch``
swaps them into existing models.
"""
import torch

from . import functional as F

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same constructor, parameters, state_dict keys) on the fused kernels.

    Input (*, *normalized_shape); statistics in fp32 for every dtype.
    """

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (``eps=None`` -> ``torch.finfo(input.dtype).eps``) on the fused kernels."""

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


# ---- softmax (fasttfm/ops/softmax.py) ----
class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` (same constructor and repr; no parameters) on the fused kernel.

    ``dim=None`` keeps torch's legacy choice (0 for 0-, 1- and 3-D inputs, else 1).
    """

    def forward(self, input):
        dim = self.dim
        if dim is None:
            dim = 0 if input.dim() in (0, 1, 3) else 1
        return F.softmax(input, dim)


__all__ += ["Softmax"]
