"""Hugging Face transformers integration: ``attn_implementation="fasttfm"`` and norm replacements.

Used through ``fasttfm.patch(model)`` (rows in ``fasttfm.patch.REGISTRY``), or directly:

    fasttfm.hf.register()                                   # once; imports transformers
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fasttfm")

``transformers`` is imported only when one of these functions runs, never by ``import fasttfm``.

Attention (``attention_forward``, HF's attention-interface signature): query (B, Hq, Sq, D),
key/value (B, Hkv, Skv, D) passed unexpanded (GQA is native), output (B, Sq, Hq, D).
  * no mask -> fasttfm.attention on the (B, S, H, D) views ("bnhd", no copies): causal when the
    module is causal and Sq > 1 (as HF's sdpa path), sliding window ``(sliding_window - 1, 0)``
    when the model passes ``sliding_window`` (HF: kv_idx > q_idx - sliding_window);
  * a mask (4-D bool, True = attend; padding, packed sequences, custom patterns) -> fasttfm's SDPA
    with that mask: exact, dense math, padding never dropped;
  * softcapping (Gemma 2) -> the kernel's softcap when there is no mask;
  * position bias, sinks, or softcapping that cannot take the kernel (with a mask, dropout, odd head
    dims) -> the model's own eager attention (HF's sdpa would silently drop them); attention
    dropout in training, head dims outside 16..256 -> HF's sdpa function. Both are counted as
    call-time fallbacks in ``handle.report()``.
Masks (``mask_interface``, registered under the same name, the trap in INTEGRATION.md): returns
None, with no data inspection (so no host sync, compile-clean), when the mask is exactly the plain
causal pattern -- or Mistral's sliding-window pattern -- over a fresh sequence with no padding mask;
otherwise it is ``transformers.masking_utils.sdpa_mask``, told not to inspect a padding mask's values
(HF's own skip checks ``padding_mask.all()`` on the host: a sync per forward). So a padding mask,
even one of all ones, gives the dense masked path: pass ``attention_mask=None`` when nothing is padded.

Norms: LlamaRMSNorm/MistralRMSNorm instances get a generated subclass (``rms_norm_class``) whose
forward runs fasttfm.rms_norm with HF's numerics: fp32 statistics, the normalized value cast back
to the input dtype, then ``weight * that`` (so bf16/fp16 results and the output dtype match HF's).
"""
import weakref
from collections import Counter

import torch

__all__ = ["NAME", "register", "attention_forward", "mask_interface", "rms_norm_class", "use_attention",
           "fallback_counts"]

NAME = "fasttfm"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SLIDING_MODELS = ("mistral", "gemma2")  # model types whose attention layers pass ``sliding_window`` to us
_fallbacks = weakref.WeakKeyDictionary()  # attention module -> Counter(reason)
_registered = False
_mu = None  # transformers.masking_utils, bound by register()
_and_mask_code = None  # the code object of masking_utils.and_masks' inner and_mask


def _masking_utils():
    """transformers.masking_utils. Functions that run under torch.compile (mask_interface) read the
    module from this global, bound in register() outside any trace: torch 2.11's dynamo cannot trace
    ``from transformers import masking_utils`` (the package is a _LazyModule: "Bad import result")."""
    global _mu, _and_mask_code
    if _mu is None:
        from transformers import masking_utils

        _and_mask_code = next((c for c in masking_utils.and_masks.__code__.co_consts
                               if getattr(c, "co_name", None) == "and_mask"), None)
        _mu = masking_utils
    return _mu


def register():
    """Register "fasttfm" in HF's AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    _masking_utils().AttentionMaskInterface.register(NAME, mask_interface)
    _registered = True


def fallback_counts(module):
    """Counter(reason -> calls) of HF attention calls on ``module`` that did not run the kernels."""
    return _fallbacks.get(module, Counter())


def _fallback(module, reason):
    if not torch.compiler.is_compiling():
        _fallbacks.setdefault(module, Counter())[reason] += 1


# -- attention -------------------------------------------------------------------------------------
def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, **kwargs):
    """HF attention function: returns (out (B, Sq, Hq, D), None)."""
    d = query.shape[-1]
    softcap = kwargs.pop("softcap", None) or 0.0
    extras = [k for k in ("position_bias", "s_aux", "sinks") if kwargs.get(k) is not None]
    reason = None
    if extras:
        reason = "position bias / attention sinks"
    elif dropout:
        reason = "attention dropout > 0 (training mode)"
    elif softcap and attention_mask is not None:
        reason = "softcapping with a mask"
    elif key.shape[-1] != d or value.shape[-1] != d:
        reason = (f"q/k head dim {d}, v head dim {value.shape[-1]}: the kernels need one head dim "
                  "(DeepSeek-style MLA is not supported yet)") if key.shape[-1] == d else \
            f"head dims of q ({d}) and k ({key.shape[-1]}) differ"
    elif not 16 <= d <= 256:
        reason = f"head dim {d} outside 16..256"
    elif query.dtype not in _DTYPES or not (query.dtype == key.dtype == value.dtype):
        reason = f"dtype {query.dtype}"
    if reason is not None and (softcap or extras):  # HF's sdpa would silently drop these
        _fallback(module, reason + ": the model's eager attention")
        if softcap:
            kwargs["softcap"] = softcap
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                sliding_window, **kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _fallback(module, reason + ": HF's sdpa")
        if attention_mask is None and sliding_window and query.shape[2] > 1 and (
                is_causal if is_causal is not None else getattr(module, "is_causal", True)):
            # mask_interface left the window to us: give HF's sdpa the pattern as a mask
            attention_mask = _sliding_causal_mask(query.shape[2], key.shape[2], sliding_window, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, sliding_window=sliding_window, **kwargs)

    from .ops.attention import attention, scaled_dot_product_attention

    if attention_mask is not None:
        # dense masked path; expand GQA heads as HF's repeat_kv does (torch's SDPA CPU math needs it)
        g = query.shape[1] // key.shape[1]
        if g > 1:
            key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and q_len > 1  # a single query sees every cached key (HF's sdpa rule)
    if causal and kv_len > q_len:
        # empty static cache at prefill (HF's sdpa: top-left causal, then the cache tail is unused)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    window = (sliding_window - 1 if (causal and sliding_window) else -1, -1)
    # (B, H, S, D) -> (B, S, H, D) views; out (B, Sq, Hq, D) contiguous, as HF wants it
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                    window=window, softmax_scale=scaling, layout="bnhd", softcap=softcap)
    return out, None


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window,
                     **kwargs):
    """The model's own ``eager_attention_forward`` (its modeling file's), which applies softcapping,
    position bias and sinks. When mask_interface left the pattern to the kernel (mask None), the
    causal / sliding pattern is built here; eager adds the mask to the scores, so it gets an
    additive float mask (0 or the dtype's minimum), never a bool one."""
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
        if kv_len > q_len:  # as on the kernel path: empty static cache at prefill
            key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        attention_mask = _sliding_causal_mask(q_len, kv_len, sliding_window or kv_len, query.device)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
              sliding_window=sliding_window, **kwargs)


def _sliding_causal_mask(q_len, kv_len, window, device):
    """(q_len, kv_len) bool, True = attend: HF's causal sliding window, queries at the end."""
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _is_sliding_causal(mask_function, local_size):
    """True when mask_function is masking_utils.sliding_window_causal_mask_function(local_size).

    Eager: from the closures (``and_masks(sliding_window_overlay(local_size), causal_mask_function)``).
    Under torch.compile the function was created inside the trace, and torch 2.11's dynamo cannot
    read its closure cells ("Unexpected type in sourceless builder: cell"); there the check is
    structural: HF's ``and_masks`` closure over one tuple. That suffices because
    ``create_sliding_window_causal_mask`` clears ``allow_is_causal_skip`` whenever it combines more
    masks (or/and mask functions, packed sequences, blockwise), and the caller also requires a fresh,
    unpadded sequence, a sliding model type and ``config.sliding_window == local_size``."""
    mu = _mu or _masking_utils()
    cells = getattr(mask_function, "__closure__", None) or ()
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or len(cells) != 1:
        return False
    if torch.compiler.is_compiling():
        return mask_function.__code__ is _and_mask_code
    parts = cells[0].cell_contents
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function):
        return False
    overlay = parts[0]
    inner = getattr(overlay, "__closure__", None) or ()
    return (getattr(overlay, "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask"
            and len(inner) == 1 and inner[0].cell_contents == local_size)


def mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """HF mask function: None for the patterns attention_forward applies itself, else sdpa_mask."""
    mu = _mu or _masking_utils()

    if mask_function is None:
        mask_function = mu.causal_mask_function
    config = kwargs.get("config")
    fresh = attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if allow_is_causal_skip and fresh:
        if local_size is None and mask_function is mu.causal_mask_function:
            return None
        if (local_size is not None and getattr(config, "model_type", None) in _SLIDING_MODELS
                and getattr(config, "sliding_window", None) == local_size
                and _is_sliding_causal(mask_function, local_size)):
            return None
    if attention_mask is not None:
        # HF's skips read the padding mask's values (`fast_all(...)`: a host sync); materialize instead
        allow_is_causal_skip = False
        kwargs["allow_is_bidirectional_skip"] = False
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def use_attention(model, handle, path):
    """Model-scope registry target: switch a PreTrainedModel to "fasttfm"; returns (note, undo)."""
    from .patch import _Keep

    if not getattr(model, "_supports_attention_backend", False):
        raise _Keep(f"{type(model).__name__} does not use HF's attention interface")
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
    prefix = f"{path}." if path else ""
    modules = list(model.named_modules())
    handle.fallback_sources.append(
        lambda: [(prefix + p, reason, n) for p, m in modules for reason, n in fallback_counts(m).items()])

    def undo():
        model.set_attn_implementation(previous)

    return f'attn_implementation "{previous}" -> "{NAME}"' + (f"; {'; '.join(notes)}" if notes else ""), undo


use_attention.display = "fasttfm.hf.attention_forward"


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
