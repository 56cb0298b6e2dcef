"""Hugging Face transformers integration: ``attn_implementation="fasttfm"`` and norm replacements.

Used through ``fasttfm.patch(model)`` (rows in ``fasttfm.patch.REGISTRY``), or directly:

    fasttfm.hf.register()                                   # once; imports transformers
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fasttfm")

``transformers`` is imported only when one of these functions runs, never by ``import fasttfm``.

Masks (``mask_interface``, ``fasttfm.hf_masks``, registered under the same name in HF's
AttentionMaskInterface -- the trap in INTEGRATION.md): HF's mask request is recognised and answered
with a ``Route`` (causal, window, key_padding_mask, seqused_k, segment_ids) instead of a dense
(B, 1, Sq, Skv) mask, for every and-composition of HF's causal / sliding-window / bidirectional /
packed-sequence mask functions, with or without a 2-D padding mask, over no cache, a DynamicCache,
sliding caches or a StaticCache (its device-tensor offset becomes ``seqused_k``: no host sync).
Other patterns (or_masks, chunked attention, a model's own mask functions) keep HF's dense
sdpa_mask, and every attention call that gets one is counted with the reason.

Attention (``attention_forward``, HF's attention-interface signature): query (B, Hq, Sq, D),
key/value (B, Hkv, Skv, D) passed unexpanded (GQA is native), output (B, Sq, Hq, D).
  * a Route -> fasttfm.attention on the (B, S, H, D) views ("bnhd", no copies) with the Route's
    arguments; with HF's flash-attention kwargs (cu_seq_lens_q/k, max_length_q/k, batch 1, no
    padding) the varlen path ("thd") instead of segment_ids;
  * no mask (the model built none) -> the kernel with HF's sdpa rule: causal when the module is
    causal and Sq > 1 (top-left: keys past Sq unseen);
  * a dense 4-D mask (an unrecognised pattern, the caller's own) -> fasttfm's SDPA with that mask;
  * softcapping (Gemma 2) -> the kernel's softcap, with any Route;
  * position bias, sinks, or softcapping with a dense mask -> the model's own eager attention (HF's
    sdpa would silently drop them); attention dropout in training, head dims outside 16..256, q/k
    head dims that differ, other dtypes -> HF's sdpa with the Route's dense mask. A v head dim other
    than q/k's (DeepSeek-style MLA, e.g. 192/128) runs in the kernels; the output has v's head dim.
Every call not on the kernel is counted per module with its reason (``fallback_counts``,
``handle.report()``).

Norms: LlamaRMSNorm/MistralRMSNorm instances get a generated subclass (``rms_norm_class``) whose
forward runs fasttfm.rms_norm with HF's numerics: fp32 statistics, the normalized value cast back
to the input dtype, then ``weight * that`` (so bf16/fp16 results and the output dtype match HF's).
"""
import weakref
from collections import Counter

import torch

from ._registry import Keep
from .hf_masks import Route, masking_utils, mask_interface

__all__ = ["NAME", "VERIFIED_WITHOUT_BACKEND_FLAG", "Route", "register", "attention_forward", "mask_interface",
           "rms_norm_class", "fp32_weight_rms_norm_class", "gemma_rms_norm_class", "fp32_layer_norm_class",
           "use_attention", "fallback_counts"]

NAME = "fasttfm"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# models without ``_supports_attention_backend`` that call HF's attention interface and build their
# masks with masking_utils: verified equal to their sdpa implementation (tests/test_hf_zoo.py)
VERIFIED_WITHOUT_BACKEND_FLAG = ("bart", "whisper", "stablelm")
_fallbacks = weakref.WeakKeyDictionary()  # attention module -> Counter(reason)
_registered = False


def register():
    """Register "fasttfm" in HF's AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    masking_utils().AttentionMaskInterface.register(NAME, mask_interface)
    _registered = True


def fallback_counts(module):
    """Counter(reason -> calls) of HF attention calls on ``module`` that did not run the kernels."""
    return _fallbacks.get(module, Counter())


def _fallback(module, reason):
    if not torch.compiler.is_compiling():
        _fallbacks.setdefault(module, Counter())[reason] += 1


# -- attention -------------------------------------------------------------------------------------
def _call_reason(query, key, value, dropout, softcap, extras):
    """Why this call cannot take the kernels (None when it can)."""
    d = query.shape[-1]
    if extras:
        return "position bias / attention sinks"
    if dropout:
        return "attention dropout > 0 (training mode)"
    if key.shape[-1] != d:
        return f"head dims of q ({d}) and k ({key.shape[-1]}) differ"
    if not 16 <= d <= 256:
        return f"head dim {d} outside 16..256"
    if not 16 <= value.shape[-1] <= 256:  # a v head dim != d (DeepSeek-style MLA) runs in the kernels
        return f"v head dim {value.shape[-1]} outside 16..256"
    if query.dtype not in _DTYPES or not (query.dtype == key.dtype == value.dtype):
        return f"dtype {query.dtype}"
    return None


def _route_mismatch(route, query, key):
    if route.q_length != query.shape[2] or route.kv_length != key.shape[2]:
        return (f"the mask was made for Sq={route.q_length}, Skv={route.kv_length} but the call has "
                f"Sq={query.shape[2]}, Skv={key.shape[2]}")
    for name in ("key_padding_mask", "seqused_k", "segment_ids"):
        t = getattr(route, name)
        if t is not None and t.shape[0] != query.shape[0]:
            return f"{name} has batch {t.shape[0]}, the call {query.shape[0]}"
    return None


def _varlen(route, query, kwargs):
    """(cu_q, cu_k, max_q, max_k) when HF's flash-attention kwargs describe packed sequences the
    kernel's varlen path can take for this call, else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is None or cu_k is None or not isinstance(max_q, int) or not isinstance(max_k, int):
        return None
    if query.shape[0] != 1 or route.key_padding_mask is not None or route.seqused_k is not None or \
            route.q_length != route.kv_length:
        return None
    return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, **kwargs):
    """HF attention function: returns (out (B, Sq, Hq, Dv), None) (Dv: value's head dim). See the
    module docstring."""
    softcap = kwargs.pop("softcap", None) or 0.0
    extras = [k for k in ("position_bias", "s_aux", "sinks") if kwargs.get(k) is not None]
    reason = _call_reason(query, key, value, dropout, softcap, extras)
    route = attention_mask if isinstance(attention_mask, Route) else None
    if reason is None and route is not None:
        reason = _route_mismatch(route, query, key)
        if reason is not None:
            reason = f"dense mask: {reason}"
    if reason is None and isinstance(attention_mask, torch.Tensor):
        why = getattr(attention_mask, "_fasttfm_reason", None) or \
            "a 4-D mask from outside the forward (the caller's own, or generate()'s prepared mask)"
        reason = f"dense mask: {why}"
        if not softcap:
            _fallback(module, reason + ": fasttfm's masked SDPA")
            return _dense_attention(query, key, value, attention_mask, scaling), None
    if reason is not None:
        dense = route.dense() if route is not None else attention_mask
        if softcap or extras:  # HF's sdpa would silently drop these
            _fallback(module, reason + ": the model's eager attention")
            if softcap:
                kwargs["softcap"] = softcap
            return _eager_attention(module, query, key, value, dense, dropout, scaling, is_causal,
                                    sliding_window, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _fallback(module, reason + ": HF's sdpa")
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, sliding_window=sliding_window, **kwargs)

    from .ops.attention import attention

    if route is None:  # the model built no mask: HF's sdpa rule (causal when the module is and Sq > 1)
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and q_len > 1
        if causal and kv_len > q_len:  # SDPA's is_causal is top-left: the keys past Sq are unseen
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        pattern = dict(causal=causal)
    else:
        pattern = route.kernel_kwargs()
        varlen = _varlen(route, query, kwargs)
        if varlen is not None:
            cu_q, cu_k, max_q, max_k = varlen
            pattern.pop("segment_ids", None)
            # (1, H, T, D) -> (T, H, D) views; out (T, Hq, D) -> (1, T, Hq, D)
            out = attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                            softmax_scale=scaling, layout="thd", softcap=softcap, cu_seqlens_q=cu_q,
                            cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **pattern)
            return out.unsqueeze(0), None
    # (B, H, S, D) -> (B, S, H, D) views; out (B, Sq, Hq, D) contiguous, as HF wants it
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling,
                    layout="bnhd", softcap=softcap, **pattern)
    return out, None


def _dense_attention(query, key, value, mask, scaling):
    """fasttfm's SDPA with a dense mask (exact; GQA heads expanded as HF's repeat_kv does)."""
    from .ops.attention import scaled_dot_product_attention

    g = query.shape[1] // key.shape[1]
    if g > 1:
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window,
                     **kwargs):
    """The model's own ``eager_attention_forward`` (its modeling file's), which applies softcapping,
    position bias and sinks. With no mask (the model built none) the causal pattern is built here
    as HF's sdpa would apply it; eager adds the mask to the scores, so it gets an additive float
    mask (0 or the dtype's minimum), never a bool one."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(
            f"fasttfm.hf: {type(module).__name__} needs its eager attention (softcapping, position bias or "
            f"sinks) but {type(module).__module__} has no eager_attention_forward; load this model with "
            f"attn_implementation='eager' instead of patching its attention")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_len > 1:
        if kv_len > q_len:  # SDPA's top-left is_causal: the keys past Sq are unseen
            key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        i = torch.arange(q_len, device=query.device)[:, None]
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= i)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
              sliding_window=sliding_window, **kwargs)


def use_attention(model, handle, path):
    """Model-scope registry target: switch a PreTrainedModel to "fasttfm"; returns (note, undo)."""
    if not getattr(model, "_supports_attention_backend", False) and \
            getattr(model.config, "model_type", None) not in VERIFIED_WITHOUT_BACKEND_FLAG:
        raise Keep(f"{type(model).__name__} does not declare HF's attention interface "
                   f"(_supports_attention_backend), and its family is not among the verified "
                   f"{', '.join(VERIFIED_WITHOUT_BACKEND_FLAG)}")
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    notes = []
    cfg = model.config
    for name in ("attention_dropout", "attn_pdrop"):
        if getattr(cfg, name, 0.0):
            notes.append(f"config.{name}={getattr(cfg, name)}: training-mode calls use HF's sdpa")
    head_dim = getattr(cfg, "head_dim", None) or (
        cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "num_attention_heads", None) else None)
    if head_dim is not None and not 16 <= head_dim <= 256:
        notes.append(f"head_dim {head_dim} outside 16..256: HF's sdpa runs")
    window = _local_attention(cfg)
    if window:
        notes.append(window)
    if getattr(cfg, "attention_chunk_size", None):
        notes.append(f"chunked attention ({cfg.attention_chunk_size}): HF's dense mask, counted per call")
    prefix = f"{path}." if path else ""
    modules = list(model.named_modules())
    handle.fallback_sources.append(
        lambda: [(prefix + p, reason, n) for p, m in modules for reason, n in fallback_counts(m).items()])

    def undo():
        model.set_attn_implementation(previous)

    return f'attn_implementation "{previous}" -> "{NAME}"' + (f"; {'; '.join(notes)}" if notes else ""), undo


use_attention.display = "fasttfm.hf.attention_forward"


def _local_attention(cfg):
    """A note on the config's local-attention layers (read from the masks at call time, whatever
    the family: this only says where they are), or None."""
    types = getattr(cfg, "layer_types", None) or ()
    n_local = sum(t == "sliding_attention" for t in types)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False or not window or (types and not n_local):
        window = None
    local = getattr(cfg, "local_attention", None)  # ModernBERT: +-local_attention // 2
    if window is None and not local:
        return None
    where = f"{n_local} of {len(types)} layers" if types else "every layer"
    size = f"sliding window {window}" if window else f"local attention {local}"
    return f"{size} on {where}: on the kernel's window"


# -- norms -----------------------------------------------------------------------------------------
# Three numerics among HF's norm classes, each reproduced exactly (tests/test_hf.py compares every
# registered class with HF's own module in fp32 and bf16, outputs and gradients):
#   Llama style   weight * rms_norm(x in fp32).to(x.dtype)           (round, then the weight)
#   fp32 weight   (weight * rms_norm(x in fp32)).to(x.dtype)          OLMo-2: the weight in fp32
#   Gemma         (rms_norm(x in fp32) * (1 + weight in fp32)).to(x.dtype)
# and two LayerNorms computed in fp32: Cohere's (no bias; weight 1-D, or (heads, head_dim) for its
# q/k norms) and OLMo's (no parameters, eps 1e-5).
class _RMSNormForward:
    """forward of HF's Llama-style RMSNorm on fasttfm.rms_norm (attributes weight, variance_epsilon)."""

    def forward(self, hidden_states):
        from .ops.layer_norm import rms_norm

        w = self.weight
        shape = (hidden_states.shape[-1],)
        if hidden_states.dtype == torch.float32 and w.dtype == torch.float32:
            return rms_norm(hidden_states, shape, w, self.variance_epsilon)  # fused weight
        # HF: weight * normalized.to(input_dtype): round once to the input dtype, then the weight
        return w * rms_norm(hidden_states, shape, None, self.variance_epsilon)


class _FP32WeightRMSNormForward:
    """OLMo-2's RMSNorm: the weight multiplies in fp32, one rounding at the end."""

    def forward(self, hidden_states):
        from .ops.layer_norm import rms_norm

        y = rms_norm(hidden_states.float(), (hidden_states.shape[-1],), self.weight.float(), self.variance_epsilon)
        return y.to(hidden_states.dtype)


class _GemmaRMSNormForward:
    """Gemma/Gemma 2/Gemma 3: scale (1 + weight), all in fp32, one rounding at the end (attribute eps)."""

    def forward(self, x):
        from .ops.layer_norm import rms_norm

        return rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)


class _FP32LayerNormForward:
    """Cohere's LayerNorm (weight, no bias, in fp32) and OLMo's (no parameters, eps 1e-5), over the last dim."""

    def forward(self, hidden_states):
        from .ops.layer_norm import layer_norm

        x = hidden_states.float()
        w = getattr(self, "weight", None)
        eps = getattr(self, "variance_epsilon", 1e-5)
        d = (x.shape[-1],)
        if w is None:
            y = layer_norm(x, d, None, None, eps)
        elif w.dim() == 1:
            y = layer_norm(x, d, w.float(), None, eps)
        else:  # Cohere's q/k norm: weight (heads, head_dim) broadcast over the leading dims
            y = layer_norm(x, d, None, None, eps) * w.float()
        return y.to(hidden_states.dtype)


_classes = {}


def _subclass(source, forward_mixin):
    """The fasttfm subclass of an HF norm class (cached; same __init__, parameters, state_dict)."""
    if source not in _classes:
        name = f"Fasttfm{source.__name__}"
        cls = type(name, (forward_mixin, source), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls  # findable by pickle as fasttfm.hf.<name>
        _classes[source] = cls
    return _classes[source]


def rms_norm_class(source):
    """Llama-style RMSNorm classes (Llama, Mistral, Mixtral, Qwen2/3 (+MoE), Phi-3, Granite, DeepSeek-V3)."""
    return _subclass(source, _RMSNormForward)


def fp32_weight_rms_norm_class(source):
    return _subclass(source, _FP32WeightRMSNormForward)


def gemma_rms_norm_class(source):
    return _subclass(source, _GemmaRMSNormForward)


def fp32_layer_norm_class(source):
    return _subclass(source, _FP32LayerNormForward)
