"""The "fasttfm" entry of HF's ``AttentionMaskInterface``: recognise the mask HF asks for and hand
attention_forward a ``Route`` (what the kernels need) instead of a dense (B, 1, Sq, Skv) mask.

HF calls ``mask_interface(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
attention_mask, local_size, ...)`` once per forward and mask type (masking_utils.create_*_mask), and
passes the result, untouched, to every attention call of that type as ``attention_mask``. The mask
HF means is  M[b, i, j] = mask_function(b, 0, q_offset + i, kv_offset + j) & padding[b, kv_offset + j].

``mask_function`` is an ``and_masks`` composition; its leaves are read from their closures (eager
and under torch.compile: dynamo reads the cells of closures it created) and must all be one of

    causal_mask_function                 kv <= q                      -> causal
    sliding_window_overlay(W)            kv > q - W                   -> window (W - 1, 0)
    bidirectional_mask_function          (everything)                 -> not causal
    sliding_window_bidirectional_overlay(W)  |q - kv| <= W            -> window (W, W)
    packed_sequence_mask_function(ids)   ids[b, q] == ids[b, kv]      -> segment_ids = ids

which covers every model that builds its masks with create_causal_mask /
create_sliding_window_causal_mask / create_bidirectional_(sliding_window_)mask, whatever its
model type (Mistral, Mixtral, Qwen2 with use_sliding_window, Starcoder2, Gemma 2/3, Cohere 2,
ModernBERT, ...). The 2-D padding mask becomes ``key_padding_mask`` (B, Nk) (HF's own padding to
kv_offset + kv_length, then the window [kv_offset, kv_offset + kv_length)); the offsets become the
kernel's bottom-right alignment: query i sits at q_offset + i, key j at kv_offset + j, so with
``seqused_k = q_offset - kv_offset + Nq`` (the kernel puts query i at seqused_k - Nq + i) every
causal/window relation is the same; keys j >= seqused_k are in the causal future anyway. That is
None (the plain alignment) when it equals Nk (DynamicCache, sliding caches), a (B,) int32 tensor
otherwise (StaticCache: q_offset is a device tensor; no host sync).

Anything else (or_masks: image tokens / blockwise; chunked attention; a model's own and/or mask
functions; tensor kv offsets) gets today's dense ``sdpa_mask`` (told never to read the padding
mask's values on the host), tagged with the reason, which attention_forward counts in report().
"""
import torch

__all__ = ["Route", "mask_interface", "describe", "CELLS_IN_TRACE"]

# torch 2.11's dynamo cannot read the cells of closures created inside the trace ("Unexpected type in
# sourceless builder: cell"); 2.14's can. 2.12/2.13 are unverified and treated like 2.11: under
# torch.compile they recognise only what needs no cell (``_describe_without_cells``).
CELLS_IN_TRACE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)

_mu = None      # transformers.masking_utils, bound outside any trace (dynamo cannot import the lazy module)
_codes = {}     # leaf kind -> code object of masking_utils' inner functions


def masking_utils():
    """transformers.masking_utils (bound once, outside torch.compile; see hf._masking_utils)."""
    global _mu
    if _mu is None:
        from transformers import masking_utils as mu

        _codes.update(
            and_mask=mu.and_masks().__code__,
            sliding=mu.sliding_window_overlay(1).__code__,
            bidirectional_sliding=mu.sliding_window_bidirectional_overlay(1).__code__,
            packed=mu.packed_sequence_mask_function(None).__code__,
        )
        _mu = mu
    return _mu


class Route:
    """The attention pattern of one HF mask, in the kernels' terms (what ``mask_interface`` returns
    in place of a dense mask; attention_forward passes the fields to ``fasttfm.attention``).

    causal (bool), window (left, right) (-1 = unbounded), key_padding_mask bool (B, Nk) or None
    (True = attend), seqused_k int32 (B,) or None (bottom-right alignment against it instead of
    Nk), segment_ids int (B, N) or None (packed sequences), q_length / kv_length (the Sq / Skv the
    mask was made for). ``dense()`` materializes the same mask as HF's sdpa_mask (bool
    (B, 1, Sq, Skv), True = attend) for the calls that cannot take the kernel (dropout, ...).

    It stands in for a 4-D mask where HF handles one opaquely: ``ndim`` is 4, ``shape``/``dtype``/
    ``device`` are the dense mask's and ``contiguous()`` returns itself (generate() prepares
    compileable-cache masks ahead of the forward and calls ``.contiguous()``; the model's own mask
    creation then hands the Route back to mask_interface, which returns it as is). A model that
    uses the mask as a tensor before attention (indexing, tensor methods, torch functions,
    operators) gets the dense mask itself, tagged with that reason, so it keeps HF's exact dense
    path and the calls are counted.
    """
    ndim = 4
    dtype = torch.bool

    def __init__(self, q_length, kv_length, causal, window, key_padding_mask, seqused_k, segment_ids, dense_args):
        self.q_length, self.kv_length = q_length, kv_length
        self.causal, self.window = causal, window
        self.key_padding_mask, self.seqused_k, self.segment_ids = key_padding_mask, seqused_k, segment_ids
        self._dense_args = dense_args

    def contiguous(self, *args, **kwargs):
        return self

    def dim(self):
        return 4

    @property
    def shape(self):
        return torch.Size((self._dense_args["batch_size"], 1, self.q_length, self.kv_length))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def device(self):
        return torch.device(self._dense_args.get("device", "cpu"))

    # -- used as a tensor: the dense mask; tensor results tagged with the reason --------------------
    @staticmethod
    def _tag(result, what):
        if isinstance(result, torch.Tensor) and not torch.compiler.is_compiling():
            result._fasttfm_reason = f"the model used the mask as a tensor ({what}) before attention"
        return result

    def __getattr__(self, name):  # tensor methods/attributes other than the ones above
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self.dense(), name)
        if not callable(attr):
            return attr

        def method(*args, **kwargs):
            return Route._tag(attr(*args, **kwargs), f".{name}()")
        return method

    def __getitem__(self, index):
        return Route._tag(self.dense()[index], "indexing")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        swap = lambda x: x.dense() if isinstance(x, Route) else x  # noqa: E731
        result = func(*tree_map(swap, args), **tree_map(swap, kwargs or {}))
        return Route._tag(result, getattr(func, "__name__", str(func)))

    def _op(name):
        def op(self, *others):
            return Route._tag(getattr(self.dense(), name)(*others), name)
        op.__name__ = name
        return op

    __invert__, __and__, __rand__ = _op("__invert__"), _op("__and__"), _op("__rand__")
    __or__, __ror__ = _op("__or__"), _op("__ror__")
    __add__, __radd__, __mul__, __rmul__ = _op("__add__"), _op("__radd__"), _op("__mul__"), _op("__rmul__")
    del _op

    def kernel_kwargs(self):
        """Keyword arguments of fasttfm.attention for this pattern (only the ones in use)."""
        kw = dict(causal=self.causal, window=self.window)
        for name in ("key_padding_mask", "seqused_k", "segment_ids"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return kw

    def dense(self):
        """HF's own bool mask (B, 1, Sq, Skv) for this call (sdpa_mask, no skips, no host sync)."""
        return masking_utils().sdpa_mask(**self._dense_args)

    def __repr__(self):
        parts = [f"causal={self.causal}", f"window={self.window}", f"q_length={self.q_length}",
                 f"kv_length={self.kv_length}"]
        parts += [f"{n}=tensor{tuple(getattr(self, n).shape)}" for n in ("key_padding_mask", "seqused_k", "segment_ids")
                  if getattr(self, n) is not None]
        return f"Route({', '.join(parts)})"


def _leaves(fn, out):
    """Flatten nested ``and_masks``; False when fn is not an and-composition of plain functions."""
    code = getattr(fn, "__code__", None)
    if code is _codes["and_mask"]:
        for part in fn.__closure__[0].cell_contents:
            if not _leaves(part, out):
                return False
        return True
    if code is None:
        return False
    out.append(fn)
    return True


def _name(fn):
    return getattr(fn, "__qualname__", type(fn).__name__)


def _describe_without_cells(fn, local_size, allow_skip, config):
    """``describe`` under torch.compile where dynamo cannot read closure cells: HF's plain causal and
    bidirectional functions (module-level), and create_sliding_window_causal_mask's plain pattern
    and_masks(sliding_window_overlay(W), causal) recognised from its call: W = local_size =
    config.sliding_window with the causal skip still allowed (HF clears it whenever it adds a mask --
    and/or functions, packing, blockwise -- and for a compileable cache's decode step, which then keeps
    the dense mask). Chunked attention passes local_size too and is excluded by its config field."""
    mu = masking_utils()
    p = dict(causal=fn is mu.causal_mask_function, window=None, bidirectional_window=None, segments=None)
    if fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
        return p, None
    if (getattr(fn, "__code__", None) is _codes["and_mask"] and allow_skip and isinstance(local_size, int)
            and local_size >= 1 and getattr(config, "sliding_window", None) == local_size
            and not getattr(config, "attention_chunk_size", None)):
        p.update(causal=True, window=local_size)
        return p, None
    return None, (f"torch {torch.__version__.split('+')[0]} under torch.compile cannot read the closure of "
                  f"mask function {_name(fn)} (packed sequences, a compileable cache's decode step, a model's own "
                  f"masks): dense mask (torch >= 2.14 reads it)")


def describe(mask_function, local_size=None, allow_skip=False, config=None):
    """(pattern, reason): pattern = dict(causal, window, bidirectional_window, segments) when every
    leaf of ``mask_function`` is one the kernels take, else None and the reason (a sentence).
    ``local_size``/``allow_skip``/``config`` (HF's mask_interface arguments) are read only under
    torch.compile on a torch whose dynamo cannot read closure cells (``CELLS_IN_TRACE``)."""
    if not CELLS_IN_TRACE and torch.compiler.is_compiling():
        return _describe_without_cells(mask_function, local_size, allow_skip, config)
    mu = masking_utils()
    leaves = []
    if not _leaves(mask_function, leaves):
        return None, f"mask function {_name(mask_function)} is not an and-composition of HF's causal/sliding/" \
                     f"packed patterns (or_masks: image tokens or blockwise attention, or a model's own)"
    p = dict(causal=False, window=None, bidirectional_window=None, segments=None)
    for leaf in leaves:
        code = leaf.__code__
        if leaf is mu.causal_mask_function:
            p["causal"] = True
        elif leaf is mu.bidirectional_mask_function:
            pass
        elif code is _codes["sliding"]:
            w = leaf.__closure__[0].cell_contents
            p["window"] = w if p["window"] is None else min(w, p["window"])
        elif code is _codes["bidirectional_sliding"]:
            w = leaf.__closure__[0].cell_contents
            p["bidirectional_window"] = w if p["bidirectional_window"] is None else min(w, p["bidirectional_window"])
        elif code is _codes["packed"] and p["segments"] is None:
            p["segments"] = leaf.__closure__[0].cell_contents
        else:
            return None, f"mask function part {_name(leaf)} (e.g. chunked attention, a model's own and_mask_function)" \
                         f" is not a pattern the kernels take"
    if p["window"] is not None and (not p["causal"] or p["bidirectional_window"] is not None):
        return None, "a causal sliding-window overlay on a non-causal mask"
    if p["bidirectional_window"] is not None and p["causal"]:
        return None, "a bidirectional sliding window on a causal mask"
    for name in ("window", "bidirectional_window"):
        if p[name] is not None and not (isinstance(p[name], int) and p[name] >= 1):
            return None, f"sliding window {p[name]!r} is not a positive int"
    return p, None


def _route(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device, dense_args,
           allow_skip=False):
    """A Route for this mask, or (None, reason); ``allow_skip``: HF's allow_is_causal_skip for this call."""
    p, reason = describe(mask_function, dense_args.get("local_size"), allow_skip, dense_args.get("config"))
    if p is None:
        return None, reason
    if not isinstance(kv_offset, int):
        return None, "a tensor kv_offset (cache layout the kernels do not read)"
    fresh = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if p["segments"] is not None and (not fresh or p["segments"].shape != (batch_size, q_length)):
        return None, "packed sequences over a cache or with a segment-id shape other than (batch, q_length)"
    if p["bidirectional_window"] is not None and not fresh:
        return None, "a bidirectional sliding window with q/kv offsets or Sq != Skv"
    key_padding_mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or \
                attention_mask.shape[0] != batch_size:
            return None, "a padding mask that is not a (batch, keys) tensor"
        padded = masking_utils().prepare_padding_mask(attention_mask, kv_length, kv_offset)
        key_padding_mask = padded[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
    seqused_k = None
    if p["causal"]:
        used = q_offset - kv_offset + q_length  # the key index (exclusive) of the last query's position
        if isinstance(used, torch.Tensor):
            seqused_k = used.to(device=device, dtype=torch.int32).reshape(1).expand(batch_size).contiguous()
        elif used > kv_length:
            return None, f"queries past the last key (q_offset {q_offset} + q_length {q_length} > kv_offset " \
                         f"{kv_offset} + kv_length {kv_length})"
        elif used != kv_length:
            seqused_k = torch.full((batch_size,), used, dtype=torch.int32, device=device)
    if p["window"] is not None:
        window = (p["window"] - 1, -1)  # kv > q - W  <=>  j >= i - (W - 1); causal adds right = 0
    elif p["bidirectional_window"] is not None:
        window = (p["bidirectional_window"],) * 2
    else:
        window = (-1, -1)
    return Route(q_length, kv_length, p["causal"], window, key_padding_mask, seqused_k, p["segments"], dense_args), None


def _dense_args(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size,
                kwargs):
    args = dict(kwargs, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                # StaticCache passes its cumulative length, which its update() then advances in place
                q_offset=q_offset.clone() if isinstance(q_offset, torch.Tensor) else q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return args


def mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """HF mask function (AttentionMaskInterface "fasttfm"): a ``Route``, or for patterns the
    kernels do not take, HF's dense sdpa_mask (bool (B, 1, Sq, Skv), True = attend, never reading
    the padding mask's values on the host) tagged ``_fasttfm_reason`` (eager only)."""
    mu = masking_utils()
    if isinstance(attention_mask, Route):  # prepared by generate() for this very step
        return attention_mask
    if mask_function is None:
        mask_function = mu.causal_mask_function
    device = kwargs.get("device", "cpu")
    dense_args = _dense_args(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                             local_size, kwargs)
    route, reason = _route(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                           device, dense_args, allow_is_causal_skip)
    if route is not None:
        return route
    if attention_mask is not None:
        # HF's skips read the padding mask's values (`fast_all(...)`: a host sync); materialize instead
        allow_is_causal_skip = False
        kwargs["allow_is_bidirectional_skip"] = False
    mask = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    if mask is not None and not torch.compiler.is_compiling():
        mask._fasttfm_reason = reason
    return mask
