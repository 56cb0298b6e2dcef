"""Drop-in patching of existing models: one registry table, one reversible ``patch(model)``.

    handle = fasttfm.patch(model)          # attention=True, norms=True, softmax=True, loss=True
    print(handle.report())                 # what was replaced, what was kept and why
    handle.undo()                          # the original modules, exactly as before

``REGISTRY`` below is the only place that knows which class is replaced by what. Each row names a
source class by its dotted path (a ``transformers`` class is looked up only when ``transformers`` is
already imported, so ``import fasttfm`` never needs it), the fasttfm replacement, the ``patch()``
flag that enables it, and an optional check that keeps unsupported configurations on the original
module. Only modules whose type *is* a source class are replaced; a user subclass may override
``forward`` and is reported, never changed.

How a module is swapped, in place on the instance:
  * the replacement subclasses the source class and adds no ``__init__`` state (fasttfm.nn's
    LayerNorm/RMSNorm/MultiheadAttention, the generated Hugging Face norm subclasses): the
    instance's ``__class__`` is set to it. Same object, so the same Parameters, buffers, hooks,
    state_dict keys, device, dtype, train/eval mode, and every outside reference still points to it.
  * otherwise the row's ``build`` makes a replacement instance that shares the original's Parameter
    and buffer objects and hook dicts, and it takes the original's place in every parent.
``undo()`` restores the class / puts the original object back.

``nn.TransformerEncoderLayer`` has a fast path (eval + no_grad) that reads its children's weights
and calls ``torch._transformer_encoder_layer_fwd``, silently bypassing replaced modules. A layer
whose ``self_attn``/``norm1``/``norm2`` is replaced gets ``activation_relu_or_gelu = 0`` (read only
by that fast path; the slow path uses ``self.activation``), and a ``nn.TransformerEncoder`` over
such layers gets ``use_nested_tensor = False``; both are restored by ``undo()``.

``sdpa_patched()`` is the opt-in context manager for code that calls
``torch.nn.functional.scaled_dot_product_attention`` itself.

The registry types (``Row``, ``Entry``) and ``Keep`` (a model-scope target's refusal) live in
``fasttfm._registry``, which this module and the targets (``fasttfm.hf``) import; ``fasttfm.hf``
never imports this module.
"""
import contextlib
import sys
import threading
import warnings
from collections import Counter, defaultdict
from typing import List

import torch
from torch import nn

from ._registry import Entry, Row
from ._registry import Keep as _Keep

__all__ = ["patch", "PatchHandle", "REGISTRY", "EXPLICIT_ONLY", "Row", "sdpa_patched"]

GROUPS = ("attention", "norms", "softmax", "loss")


# -- checks: a reason the module must stay on its original class, or None --------------------------
def _mha_check(m):
    if not m._qkv_same_embed_dim:
        return "kdim/vdim != embed_dim (separate q/k/v projection weights) is not supported"
    if m.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if m.add_zero_attn:
        return "add_zero_attn=True is not supported"
    if not 16 <= m.head_dim <= 256:
        return f"head_dim {m.head_dim} is outside the kernels' 16..256"
    return None


def _mha_call_reason(m, args, kwargs):
    """Why fasttfm.nn.MultiheadAttention will run torch's own forward for this call (or None)."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("need_weights", True):
        return "need_weights=True at call time (torch's forward)"
    if m.training and m.dropout > 0.0:
        return "dropout > 0 in training mode (torch's forward)"
    q = bound.get("query")
    if isinstance(q, torch.Tensor) and q.dim() != 3:
        return "unbatched input (torch's forward)"
    if isinstance(q, torch.Tensor) and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (torch's forward)"
    return None


def _softmax_build(m, cls):
    return cls(dim=m.dim)


def _cross_entropy_build(m, cls):
    return cls(weight=m.weight, ignore_index=m.ignore_index, reduction=m.reduction,
               label_smoothing=m.label_smoothing)


# -- the registry ----------------------------------------------------------------------------------
def _hf(family, cls):
    return f"transformers.models.{family}.modeling_{family}.{cls}"


# (model family, norm class, fasttfm.hf factory): each verified equal to HF's own module in fp32 and
# bf16, outputs and gradients (tests/test_hf.py::test_every_registered_hf_norm_matches_hf).
HF_NORMS = (
    *((fam, cls, "rms_norm_class") for fam, cls in (
        ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen3", "Qwen3RMSNorm"),
        ("qwen3_moe", "Qwen3MoeRMSNorm"), ("phi3", "Phi3RMSNorm"), ("granite", "GraniteRMSNorm"),
        ("deepseek_v3", "DeepseekV3RMSNorm"))),
    ("olmo2", "Olmo2RMSNorm", "fp32_weight_rms_norm_class"),
    ("gemma", "GemmaRMSNorm", "gemma_rms_norm_class"),
    ("gemma2", "Gemma2RMSNorm", "gemma_rms_norm_class"),
    ("gemma3", "Gemma3RMSNorm", "gemma_rms_norm_class"),
    ("cohere", "CohereLayerNorm", "fp32_layer_norm_class"),
    ("cohere2", "Cohere2LayerNorm", "fp32_layer_norm_class"),
    ("olmo", "OlmoLayerNorm", "fp32_layer_norm_class"),
)

REGISTRY = (
    Row("attention", "torch.nn.MultiheadAttention", "fasttfm.nn.MultiheadAttention", check=_mha_check,
        call_reason=_mha_call_reason),
    Row("norms", "torch.nn.LayerNorm", "fasttfm.nn.LayerNorm"),
    Row("norms", "torch.nn.RMSNorm", "fasttfm.nn.RMSNorm"),
    Row("softmax", "torch.nn.Softmax", "fasttfm.nn.Softmax", build=_softmax_build),
    Row("loss", "torch.nn.CrossEntropyLoss", "fasttfm.nn.CrossEntropyLoss", build=_cross_entropy_build),
    # Hugging Face transformers (GPT-2's norms are torch.nn.LayerNorm, covered above)
    Row("attention", "transformers.modeling_utils.PreTrainedModel", "fasttfm.hf.use_attention", scope="model"),
    *(Row("norms", _hf(fam, cls), f"fasttfm.hf.{factory}") for fam, cls, factory in HF_NORMS),
)

# fasttfm.nn classes that no existing module can be swapped for, with the reason; report() and the
# registry test read this, so a new class must land either in REGISTRY or here.
EXPLICIT_ONLY = {
    "fasttfm.nn.FusedLinearCrossEntropyLoss": "fuses the output projection with the loss (its forward takes "
    "hidden states and the projection weight), so models opt in explicitly; no torch module has that interface",
}


def _resolve_source(path):
    module_name, _, name = path.rpartition(".")
    if module_name.startswith("transformers"):
        module = sys.modules.get(module_name)  # never import transformers for a model that has none
    else:
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=[name])
    return getattr(module, name, None) if module is not None else None


def _resolve_target(row, source_cls):
    """The replacement class (or model-scope function), or None when not in this build."""
    module_name, _, name = row.target.rpartition(".")
    if module_name == "fasttfm.nn":
        from . import nn as fnn
        return getattr(fnn, name, None)
    if module_name == "fasttfm.hf":
        from . import hf
        obj = getattr(hf, name, None)
        return obj if obj is None or row.scope == "model" else obj(source_cls)
    raise ValueError(f"fasttfm.patch: bad registry target {row.target!r}")


def _retypable(target, source):
    """True when an instance of ``source`` can become ``target`` by a class change."""
    if not (isinstance(target, type) and issubclass(target, source)):
        return False
    return all("__init__" not in vars(c) for c in target.__mro__[:target.__mro__.index(source)])


def _cls_name(cls):
    from . import nn as fnn
    for prefix, namespace in (("torch.nn", nn), ("fasttfm.nn", fnn)):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


# -- the handle ------------------------------------------------------------------------------------
class PatchHandle:
    """What ``patch`` did: ``undo()`` restores the originals, ``report()`` explains every decision.
    Also a context manager: ``with fasttfm.patch(model): ...`` undoes on exit."""

    def __init__(self, model, groups):
        self.model = model
        self.groups = groups
        self.entries: List[Entry] = []
        self.fallbacks = Counter()   # (path, reason) -> calls that ran the original math (eager only)
        self.fallback_sources = []   # callables -> [(path, reason, calls)] (Hugging Face attention)
        self.active = True

    @property
    def replaced(self):
        return [e for e in self.entries if e.status == "replaced"]

    @property
    def kept(self):
        return [e for e in self.entries if e.status == "kept"]

    def undo(self):
        """Restore every original module/class/attribute (idempotent)."""
        if not self.active:
            return
        for entry in reversed(self.entries):
            if entry.undo is not None:
                entry.undo()
        self.active = False

    def report(self) -> str:
        """A readable list of what was replaced, kept (and why), adjusted, and call-time fallbacks."""
        title = type(self.model).__name__
        lines = [f"fasttfm.patch({title}): {len(self.replaced)} replaced, {len(self.kept)} kept"
                 + ("" if self.active else " (undone)")]
        if not self.replaced:
            lines.append("  nothing to replace" + ("" if self.kept else
                         f": no supported module in {title} (supported: {', '.join(supported())})"))
        for e in self.entries:
            where = e.path or "<root>"
            if e.status == "replaced":
                note = f"  ({e.reason})" if e.reason else ""
                lines.append(f"  replaced  {where}: {e.source} -> {e.target}{note}")
            elif e.status == "kept":
                lines.append(f"  kept      {where}: {e.source}: {e.reason}")
            else:
                lines.append(f"  adjusted  {where}: {e.reason}")
        off = [g for g in GROUPS if g not in self.groups]
        if off:
            lines.append(f"  not requested: {', '.join(off)}")
        calls = [(p, r, n, "ran the original module") for (p, r), n in self.fallbacks.items()]
        calls += [(p, r, n, "did not run the kernel") for source in self.fallback_sources for p, r, n in source()]
        for path, reason, n, what in sorted(calls):
            lines.append(f"  fallback  {path or '<root>'}: {n} call(s) {what}: {reason}")
        return "\n".join(lines)

    def __repr__(self):
        return self.report()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def _record_fallback(self, path, reason):
        if not torch.compiler.is_compiling():
            self.fallbacks[(path, reason)] += 1


def supported():
    """Dotted names of the classes the registry can replace."""
    return [r.source.replace("torch.nn.", "nn.") for r in REGISTRY]


# -- patch -----------------------------------------------------------------------------------------
def patch(model: nn.Module, *, attention: bool = True, norms: bool = True, softmax: bool = True,
          loss: bool = True) -> PatchHandle:
    """Swap, in place, every supported submodule of ``model`` for its fasttfm replacement.

    Parameters, buffers, state_dict keys, device, dtype and train/eval mode are unchanged (the
    replacements share the very same tensors). Covered (see ``REGISTRY``): nn.MultiheadAttention
    (also inside nn.TransformerEncoderLayer/DecoderLayer), nn.LayerNorm, nn.RMSNorm, nn.Softmax,
    nn.CrossEntropyLoss, and for Hugging Face models ``attn_implementation="fasttfm"`` plus the
    Llama/Mistral RMSNorms. Unsupported configurations stay on the original module and are listed
    by ``handle.report()``; a model with nothing to replace gets a warning.

    Returns a :class:`PatchHandle` (``undo()``, ``report()``, context manager).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fasttfm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    flags = dict(attention=attention, norms=norms, softmax=softmax, loss=loss)
    handle = PatchHandle(model, {g for g, on in flags.items() if on})
    rows = [(row, _resolve_source(row.source)) for row in REGISTRY]
    rows = [(row, src) for row, src in rows if src is not None]
    targets = {}  # source class -> replacement (resolved once per class)
    named = list(model.named_modules())
    parents = defaultdict(list)  # id(child) -> [(parent, attribute)]
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                parents[id(child)].append((parent, attr))
    replaced_ids = set()

    # model-scope rows: the top-most instance of the source class
    for row, src in rows:
        if row.scope != "model" or row.group not in handle.groups:
            continue
        taken = []  # paths of instances already handled: their submodules are part of them
        for path, m in named:
            if isinstance(m, src) and not any(_under(path, t) for t in taken):
                taken.append(path)
                _apply_model_row(handle, row, src, path, m)

    # module-scope rows: exact type matches
    by_type = {src: row for row, src in rows if row.scope == "module"}
    fasttfm_types = set()
    for path, m in named:
        row = by_type.get(type(m))
        if row is None:
            if type(m) in fasttfm_types or type(m).__module__.startswith("fasttfm"):
                continue
            base = next((s for s, r in by_type.items() if isinstance(m, s)), None)
            if base is not None and by_type[base].group in handle.groups:
                handle.entries.append(Entry(path, _cls_name(type(m)), None, "kept",
                                            f"subclass of {_cls_name(base)} (its forward may differ), not replaced"))
            continue
        if row.group not in handle.groups:
            continue
        src = type(m)
        if src not in targets:
            targets[src] = _resolve_target(row, src)
        target = targets[src]
        if target is None:
            handle.entries.append(Entry(path, _cls_name(src), row.target, "kept",
                                        f"{row.target} is not available in this build"))
            continue
        fasttfm_types.add(target)
        reason = row.check(m) if row.check is not None else None
        if reason:
            handle.entries.append(Entry(path, _cls_name(src), _cls_name(target), "kept", reason))
            continue
        if _retypable(target, src):
            entry, live = _retype(m, target, path)
        elif row.build is not None and path:
            entry, live = _rebuild(m, target, row.build, path, parents[id(m)])
        else:
            handle.entries.append(Entry(path, _cls_name(src), _cls_name(target), "kept",
                                        "the replacement cannot take this module's place "
                                        "(not a subclass, and the root module cannot be swapped)"))
            continue
        handle.entries.append(entry)
        replaced_ids.add(id(m))
        if row.call_reason is not None:
            _add_call_hook(handle, live, row.call_reason, path)

    _disable_encoder_fast_paths(handle, named, replaced_ids)
    if not handle.replaced:
        warnings.warn(f"fasttfm.patch: nothing to replace in {type(model).__name__}\n{handle.report()}",
                      stacklevel=2)
    return handle


def _under(path, top):
    return top == "" or path == top or path.startswith(top + ".")


def _apply_model_row(handle, row, src, path, m):
    fn = _resolve_target(row, src)
    if fn is None:
        handle.entries.append(Entry(path, _cls_name(type(m)), row.target, "kept",
                                    f"{row.target} is not available in this build"))
        return
    try:
        note, undo = fn(m, handle, path)
    except _Keep as keep:
        handle.entries.append(Entry(path, _cls_name(type(m)), row.target, "kept", str(keep)))
        return
    handle.entries.append(Entry(path, _cls_name(type(m)), getattr(fn, "display", row.target), "replaced", note, undo))


def _retype(m, target, path):
    original = type(m)

    def undo_retype():
        if type(m) is target:
            m.__class__ = original

    m.__class__ = target
    return Entry(path, _cls_name(original), _cls_name(target), "replaced", "", undo_retype), m


def _rebuild(m, target, build, path, where):
    new = build(m, target)
    for name in ("_parameters", "_buffers"):
        getattr(new, name).clear()
        getattr(new, name).update(getattr(m, name))  # the same tensor objects
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    for name, value in vars(m).items():  # share hook dicts: hooks on either reach both
        if "hooks" in name:
            setattr(new, name, value)
    new.train(m.training)
    for parent, attr in where:
        parent._modules[attr] = new

    def undo_rebuild():
        for parent, attr in where:
            if parent._modules.get(attr) is new:
                parent._modules[attr] = m

    return Entry(path, _cls_name(type(m)), _cls_name(target), "replaced", "rebuilt, sharing parameters",
                 undo_rebuild), new


def _add_call_hook(handle, module, call_reason, path):
    def hook(mod, args, kwargs):
        if not torch.compiler.is_compiling():
            reason = call_reason(mod, args, kwargs)
            if reason:
                handle._record_fallback(path, reason)
        return None

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    entry = handle.entries[-1]
    inner = entry.undo

    def undo():
        h.remove()
        inner()

    entry.undo = undo


def _disable_encoder_fast_paths(handle, named, replaced_ids):
    touched = set()
    for path, m in named:
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        kids = [getattr(m, n, None) for n in ("self_attn", "norm1", "norm2")]
        if not any(k is not None and id(k) in replaced_ids for k in kids) and not any(
                type(k).__module__.startswith("fasttfm") for k in kids if k is not None):
            continue
        touched.add(id(m))
        if getattr(m, "activation_relu_or_gelu", 0):
            _set_attr(handle, m, path, "activation_relu_or_gelu", 0,
                      "nn.TransformerEncoderLayer fast path off (it would bypass the replaced modules in eval + no_grad)")
    for path, m in named:
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and any(
                id(layer) in touched for layer in m.layers):
            _set_attr(handle, m, path, "use_nested_tensor", False,
                      "nn.TransformerEncoder nested-tensor fast path off (its layers are patched)")


def _set_attr(handle, obj, path, name, value, reason):
    old = getattr(obj, name)
    setattr(obj, name, value)

    def undo():
        setattr(obj, name, old)

    handle.entries.append(Entry(path, _cls_name(type(obj)), None, "adjusted", reason, undo))


# -- F.scaled_dot_product_attention ----------------------------------------------------------------
_SDPA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_sdpa_lock = threading.Lock()
_sdpa_depth = 0
_sdpa_original = None


def _sdpa_fast(query, key, value, attn_mask, dropout_p, enable_gqa):
    """True when fasttfm.scaled_dot_product_attention runs its kernels (else the original runs)."""
    if attn_mask is not None or dropout_p != 0.0 or query.dim() < 3 or not (query.dim() == key.dim() == value.dim()):
        return False
    e = query.shape[-1]
    if not (key.shape[-1] == value.shape[-1] == e and 16 <= e <= 256):
        return False
    if query.dtype not in _SDPA_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return False
    hq, hkv = query.shape[-3], key.shape[-3]
    return hkv > 0 and hq % hkv == 0 and (hq == hkv or enable_gqa)


def _sdpa_replacement(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, **kwargs):
    if not kwargs and _sdpa_fast(query, key, value, attn_mask, dropout_p, enable_gqa):
        from .ops.attention import scaled_dot_product_attention
        return scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                            enable_gqa=enable_gqa)
    return torch._C._nn.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                                     **kwargs)


@contextlib.contextmanager
def sdpa_patched():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to fasttfm inside the block.

    Calls without a mask or dropout (causal or not, GQA with ``enable_gqa=True``, head dim
    16..256, fp16/bf16/fp32) run fasttfm's flash kernels; every other call runs PyTorch's SDPA
    unchanged. Process-wide while active (the module attribute is swapped; nesting is fine); code
    that bound the function before (``from torch.nn.functional import scaled_dot_product_attention``)
    is not affected.
    """
    global _sdpa_depth, _sdpa_original
    with _sdpa_lock:
        if _sdpa_depth == 0:
            _sdpa_original = torch.nn.functional.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = _sdpa_replacement
        _sdpa_depth += 1
    try:
        yield
    finally:
        with _sdpa_lock:
            _sdpa_depth -= 1
            if _sdpa_depth == 0:
                torch.nn.functional.scaled_dot_product_attention = _sdpa_original
