"""``fasttfm.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` with fasttfm's flash kernels.

Same constructor, parameters and state_dict keys (it subclasses the torch module), same forward
signature and results. The fused path runs when the call needs no attention weights
(``need_weights=False``) and ``add_bias_kv``/``add_zero_attn`` are off. Attention dropout
(``dropout`` > 0, training mode only; a no-op in eval mode as in torch) runs inside the kernels:
  * no masks                                -> fasttfm.attention (no mask);
  * ``is_causal=True`` hint (attn_mask promised causal) -> fasttfm causal kernel (top-left, as
    torch's SDPA), with a boolean ``key_padding_mask`` applied in the kernel too (L == S);
  * boolean ``key_padding_mask`` (True = ignore, torch's convention), no ``attn_mask`` -> the kernel
    with its inverse as key padding mask (padded kv tiles skipped, no dense mask built);
  * float ``key_padding_mask`` or any other ``attn_mask`` -> masks merged exactly as torch does,
    then SDPA with that additive mask (a correct dense path).
A query whose keys are all padded gives attention output 0 (then the output projection's bias), as
torch's module does in training mode and torch's SDPA does; torch's inference fast path
(eval + no_grad) returns NaN for such rows instead.
Anything else (weights requested, bias_kv/zero_attn) calls torch's own forward, so results always
match ``nn.MultiheadAttention`` (with dropout: in distribution -- the kernels draw their own
Philox mask, seeded from torch's default generator, so ``torch.manual_seed`` reproduces runs).
"""
import torch
import torch.nn.functional as F
from torch import nn

from fasttfm.ops.attention import attention, scaled_dot_product_attention

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` (see module docstring for when the fused path runs).

    Shapes: query (L, N, E) or (N, L, E) with ``batch_first``, or unbatched (L, E); key/value
    (S, N, kdim/vdim). Returns (attn_output, None) on the fused path.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        dropout = self.dropout if self.training else 0.0
        if (need_weights or self.bias_k is not None or self.add_zero_attn
                or query.dim() != 3 or self.head_dim < 16 or self.head_dim > 256
                or query.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention). "
                               "You may use nn.Transformer.generate_square_subsequent_mask to create this mask.")
        if not self.batch_first:  # (L, N, E) -> (N, L, E) views
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt_len, e = query.shape
        src_len = key.shape[1]
        h, dh = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        # (N, L, E) -> (N, L, H, Dh): flash-attn's "bnhd" layout, no copies
        q = F.linear(query, w_q, b_q).view(n, tgt_len, h, dh)
        k = F.linear(key, w_k, b_k).view(n, src_len, h, dh)
        v = F.linear(value, w_v, b_v).view(n, src_len, h, dh)

        bool_kpm = key_padding_mask is not None and key_padding_mask.dtype == torch.bool
        if is_causal and key_padding_mask is None:
            # torch uses the hint as SDPA's is_causal (top-left): right = L - S in bottom-right terms
            out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, dropout_p=dropout).transpose(1, 2)
        elif is_causal and bool_kpm and tgt_len == src_len:  # top-left == bottom-right causal when L == S
            out = attention(q, k, v, layout="bnhd", causal=True, dropout_p=dropout, key_padding_mask=~key_padding_mask)
        elif attn_mask is None and (key_padding_mask is None or bool_kpm):
            kpm = ~key_padding_mask if bool_kpm else None
            out = attention(q, k, v, layout="bnhd", dropout_p=dropout, key_padding_mask=kpm)
        else:
            mask = self._merged_mask(key_padding_mask, attn_mask, query, n, tgt_len, src_len)
            out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, dropout_p=dropout).transpose(1, 2)
        out = F.linear(out.reshape(n, tgt_len, e), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _merged_mask(self, key_padding_mask, attn_mask, query, n, tgt_len, src_len):
        """torch's merge: both masks as additive float (True / nonzero bool = masked), summed,
        broadcast to (N, H, L, S)."""
        kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                target_type=query.dtype)
        am = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                               target_type=query.dtype, check_other=False)
        mask = None
        if am is not None:
            mask = am.view(n, self.num_heads, tgt_len, src_len) if am.dim() == 3 else am.view(1, 1, tgt_len, src_len)
        if kpm is not None:
            kpm = kpm.view(n, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        return mask
