"""flash-attn's padding helpers (``flash_attn.bert_padding``), same names, arguments and results.

Varlen attention wants the tokens of a padded batch packed into one (total, ...) tensor:

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out_unpad, indices, batch, seqlen)          # zeros at the padded positions

All three are differentiable in their tensor argument (gather forward / scatter backward and the
reverse). ``max_seqlen`` is a Python int (one host sync, as in flash-attn).
"""
import torch
from torch import Tensor

__all__ = ["index_first_axis", "index_put_first_axis", "unpad_input", "pad_input"]


def _check_indices(name, indices):
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        desc = f"{indices.dtype} tensor of shape {tuple(indices.shape)}" if isinstance(indices, Tensor) else \
            type(indices).__name__
        raise ValueError(f"{name}: indices must be a 1-D int64 (or int32) tensor, got {desc}")


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:
    """``input[indices]`` along the first axis: input (N, ...) with at least 2 dims -> (len(indices), ...).
    The gradient scatters back into zeros of input's shape (repeated indices accumulate)."""
    _check_indices("index_first_axis", indices)
    if input.dim() < 2:
        raise ValueError(f"index_first_axis: input must have at least 2 dims (N, ...), got shape {tuple(input.shape)}")
    return input.index_select(0, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """Zeros of shape (first_axis_dim, *values.shape[1:]) with row indices[i] = values[i]."""
    _check_indices("index_put_first_axis", indices)
    if values.dim() < 2:
        raise ValueError(f"index_put_first_axis: values must have at least 2 dims, got shape {tuple(values.shape)}")
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, indices.long(), values)


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Tensor = None):
    """Pack the valid tokens of a padded batch (flash-attn 2.7+ signature and 5-tuple result).

    hidden_states (B, S, ...); attention_mask (B, S) bool/int, nonzero = valid token; unused_mask
    (B, S) optional, nonzero = allocated but unused token (packed too, but not counted in seqused).
    Returns (hidden (total, ...), indices (total,) int64 into the flattened (B*S) positions,
    cu_seqlens (B + 1,) int32 over attention_mask + unused_mask, max_seqlen int, seqused (B,) int32
    = valid tokens per sequence from attention_mask alone).
    """
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or \
            tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"unpad_input: attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
                         f"got {shape}")
    masks = attention_mask if unused_mask is None else attention_mask + unused_mask
    seqlens = masks.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])  # (B*S, ...)
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, used


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of ``unpad_input``: (total, ...) -> (batch, seqlen, ...) with zeros where no index points."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
