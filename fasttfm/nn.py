"""Modules with torch.nn's constructor signatures and state_dict keys, backed by fasttfm ops.

A fasttfm module can load a torch.nn module's state_dict and vice versa; ``fasttfm.patch``
swaps them into existing models.
"""
import torch

from . import functional as F
from .mha import MultiheadAttention

__all__ = ["LayerNorm", "RMSNorm", "MultiheadAttention", "Softmax", "CrossEntropyLoss", "FusedLinearCrossEntropyLoss"]


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same constructor, parameters, state_dict keys) on the fused kernels.

    Input (*, *normalized_shape); statistics in fp32 for every dtype.
    """

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on the fused kernels; ``eps=None`` is torch's default (float32's epsilon for
    fp16/bf16/fp32 input, see :func:`fasttfm.ops.layer_norm.default_rms_eps`)."""

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor, ``weight`` buffer and state_dict keys) on the fused
    cross-entropy kernels, plus ``smoothing`` ("torch": eps / C, or "fairseq": eps / (C - 1)) and
    ``z_loss`` (adds z_loss * lse^2 per non-ignored row), ``softcap`` (Gemma 2's final logit softcapping,
    fused), ``return_z_loss`` (forward returns (loss, z_loss)), and the opt-in ``inplace_backward``. Input (C,),
    (N, C) or (N, C, d1, ...) logits, target int64 class indices; the loss is float32 (see
    :func:`fasttfm.cross_entropy`).
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, smoothing="torch", z_loss=0.0, inplace_backward=False, softcap=0.0,
                 return_z_loss=False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.smoothing = smoothing
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                               self.smoothing, self.z_loss, self.inplace_backward, self.softcap, self.return_z_loss)


class FusedLinearCrossEntropyLoss(torch.nn.modules.loss._WeightedLoss):
    """Cross-entropy of a linear layer's output without materializing the logits.

    Constructor as ``torch.nn.CrossEntropyLoss`` (``weight`` = class weights, a buffer) plus
    ``smoothing``, ``z_loss``, ``chunk_size`` (rows per chunk; None adapts it to the sizes), ``softcap`` and
    ``return_z_loss``.
    ``forward(hidden, lin_weight, target, lin_bias=None)``: hidden (*, H), lin_weight (V, H) -- e.g. an
    LM head's ``weight`` --, lin_bias (V,) or None, target (*) int64. Equals
    ``CrossEntropyLoss(...)(F.linear(hidden, lin_weight, lin_bias).view(-1, V), target.view(-1))`` (for
    reduction "none" the loss has the target's shape). See :func:`fasttfm.linear_cross_entropy`.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, smoothing="torch", z_loss=0.0, chunk_size=None, softcap=0.0, return_z_loss=False):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.smoothing = smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def forward(self, hidden, lin_weight, target, lin_bias=None):
        return F.linear_cross_entropy(hidden, lin_weight, target, lin_bias, self.ignore_index, self.reduction,
                                      self.label_smoothing, self.smoothing, self.z_loss, self.weight, self.chunk_size,
                                      self.softcap, self.return_z_loss)


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` (same constructor and repr; no parameters) on the fused kernel.

    ``dim=None`` keeps torch's legacy choice (0 for 0-, 1- and 3-D inputs, else 1).
    """

    def forward(self, input):
        dim = self.dim
        if dim is None:
            dim = 0 if input.dim() in (0, 1, 3) else 1
        return F.softmax(input, dim)
