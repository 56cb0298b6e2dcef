"""A small GPT-style decoder-only Transformer built from fasttfm's modules.

One config dataclass, one model class, pre-norm blocks. ``GPT(config, kernels="fasttfm")`` uses
fasttfm's attention and norms; ``kernels="torch"`` builds the same model from PyTorch's own
modules and ``F.scaled_dot_product_attention``: identical parameters and state_dict keys, so the
two can be compared step by step (``load_state_dict`` works across them).

Shapes: B batch, T sequence length, C = d_model, H query heads, Hkv key/value heads (GQA when
Hkv < H), D = C // H head dim, V vocabulary.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "KVCache", "ContextParallel", "KERNELS", "attention_available"]

KERNELS = ("fasttfm", "torch")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope")
ATTENTIONS = ("causal", "sliding", "chunked")

try:
    from .ops.attention import attention as _fasttfm_attention
except ImportError as _exc:  # attention not built / not present yet: kernels="fasttfm" says so
    _fasttfm_attention = None
    _ATTENTION_IMPORT_ERROR = repr(_exc)
else:
    _ATTENTION_IMPORT_ERROR = None

try:
    from .ops.attention_decode import attention_with_kvcache as _fasttfm_attention_with_kvcache
except ImportError:  # no decode kernel: generate() keeps the uncached loop
    _fasttfm_attention_with_kvcache = None


def attention_available():
    """(True, None) when fasttfm.ops.attention imports, else (False, the import error)."""
    return _fasttfm_attention is not None, _ATTENTION_IMPORT_ERROR


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0          # key/value heads; 0 = n_head (no GQA)
    d_model: int = 128
    d_ff: int = 0               # MLP hidden size; 0 = 4 * d_model
    max_seq_len: int = 128
    dropout: float = 0.0        # on embeddings, attention output and MLP output (not inside attention)
    norm: str = "layernorm"     # layernorm | rmsnorm
    norm_eps: float = 1e-5
    positions: str = "learned"  # learned | sinusoidal | rope
    attention: str = "causal"   # causal | sliding | chunked (all causal)
    window: int = 64            # sliding: each token sees itself and `window` previous tokens
    chunk_size: int = 64        # chunked: causal inside block-diagonal chunks of chunk_size tokens
    bias: bool = True           # biases in Linear and LayerNorm layers
    tie_embeddings: bool = True

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GPTConfig: {msg}")

        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if self.d_model % self.n_head:
            bad(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
        if self.n_kv_head < 0 or self.n_head % self.n_kv_head:
            bad(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) (grouped-query attention)")
        if self.d_ff < 0:
            bad(f"d_ff must be >= 0 (0 = 4 * d_model), got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("norm", NORMS), ("positions", POSITIONS), ("attention", ATTENTIONS)):
            if getattr(self, name) not in allowed:
                bad(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            bad(f"positions='rope' needs an even head dim, got d_model/n_head = {self.head_dim}")
        if self.attention == "sliding" and self.window < 1:
            bad(f"attention='sliding' needs window >= 1, got {self.window}")
        if self.attention == "chunked" and self.chunk_size < 1:
            bad(f"attention='chunked' needs chunk_size >= 1, got {self.chunk_size}")

    @property
    def head_dim(self):
        return self.d_model // self.n_head

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}")
        return cls(**d)


def _loss(logits, targets):
    """Mean token cross-entropy; targets -1 are ignored. The one place the loss op is chosen."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def visible_mask(cfg: GPTConfig, n: int, device=None):
    """(n, n) bool, True where query i may attend key j: the masks the fasttfm kernel applies."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    vis = j <= i
    if cfg.attention == "sliding":
        vis &= j >= i - cfg.window
    elif cfg.attention == "chunked":
        vis &= torch.div(i, cfg.chunk_size, rounding_mode="floor") == torch.div(j, cfg.chunk_size,
                                                                                 rounding_mode="floor")
    return vis


def _rope_tables(cfg: GPTConfig):
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x, cos, sin):
    """x (B, H, T, D) rotated in (first half, second half) pairs; cos/sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _sinusoidal_table(cfg: GPTConfig):
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, cfg.d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / cfg.d_model))
    pe = torch.zeros(cfg.max_seq_len, cfg.d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : cfg.d_model // 2]
    return pe.float()


def _norm(cfg: GPTConfig, kernels: str):
    if kernels == "fasttfm":
        from . import nn as fnn

        ln, rms = fnn.LayerNorm, fnn.RMSNorm
    else:
        ln, rms = nn.LayerNorm, nn.RMSNorm
    if cfg.norm == "rmsnorm":
        return rms(cfg.d_model, eps=cfg.norm_eps)
    return ln(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Per-layer key/value caches for ``GPT.generate`` (kernels="fasttfm", causal/sliding attention).

    k[l], v[l]: (B, size, Hkv, D), allocated by layer l on first use in its k/v dtype; seqlens: int32
    (B,) valid length *before* the current forward (all rows advance together: no padding), kept in
    step with ``length`` (a host int, also the absolute position offset of the next token).
    """

    def __init__(self, n_layer, batch, size, device):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.size, self.length = size, 0
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def advance(self, n):
        self.length += n
        self.seqlens += n


@dataclass
class ContextParallel:
    """The sequence of every batch is sharded over the `world` ranks of `group` (None = the default
    group) in `order` ("contiguous" or "zigzag", see ``fasttfm.distributed``): each rank's forward gets
    its (B, T / world) shard and attention runs as ``fasttfm.distributed.ring_attention``."""
    group: object
    rank: int
    world: int
    order: str = "zigzag"


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, kernels: str):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        self.cp = None                              # ContextParallel, set by GPT.set_context_parallel
        d = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * d, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, pos_offset=0, kv_cache=None, layer=0):
        """kv_cache (KVCache, inference only): x holds the tokens at absolute positions
        pos_offset .. pos_offset + T - 1 (pos_offset = kv_cache.length); their keys/values are appended
        to layer `layer`'s cache and the queries attend over the whole cached prefix. pos_offset may
        also be an int64 (T,) tensor of the tokens' absolute positions (a context-parallel shard)."""
        cfg = self.cfg
        B, T, C = x.shape
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)   # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)   # (B, Hkv, T, D)
        if rope is not None:
            cos, sin = rope
            if isinstance(pos_offset, torch.Tensor):
                cos, sin = cos[pos_offset], sin[pos_offset]                          # (T, D/2)
            else:
                cos, sin = cos[pos_offset:pos_offset + T], sin[pos_offset:pos_offset + T]
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if kv_cache is not None:
            if kv_cache.k[layer] is None:
                shape = (B, kv_cache.size, Hkv, D)
                kv_cache.k[layer] = k.new_empty(shape)
                kv_cache.v[layer] = v.new_empty(shape)
            window = (cfg.window, 0) if cfg.attention == "sliding" else (-1, -1)
            # (B, T, H|Hkv, D) views; bounds were checked by the caller (GPT._forward), so no host sync
            y = _fasttfm_attention_with_kvcache(q.transpose(1, 2), kv_cache.k[layer], kv_cache.v[layer],
                                                kv_cache.seqlens, k.transpose(1, 2), v.transpose(1, 2),
                                                causal=True, window=window, check_seqlens=False)
            y = y.reshape(B, T, C)                 # (B, T, C)
            return self.drop(self.proj(y))
        if self.cp is not None:
            from .distributed import ring_attention

            window = (cfg.window, 0) if cfg.attention == "sliding" else (-1, -1)
            y = ring_attention(q, k, v, group=self.cp.group, causal=True, window=window, order=self.cp.order,
                               check=False)                                      # (B, H, T, D) shard
        elif self.kernels == "fasttfm":
            window = (cfg.window, 0) if cfg.attention == "sliding" else (-1, -1)
            chunk = cfg.chunk_size if cfg.attention == "chunked" else None
            y = _fasttfm_attention(q, k, v, causal=True, window=window, chunk_size=chunk)  # (B, H, T, D)
        elif cfg.attention == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        else:
            mask = visible_mask(cfg, T, x.device)                                        # (T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B, T, C)     # (B, T, C)
        return self.drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, kernels: str):
        super().__init__()
        self.norm1 = _norm(cfg, kernels)
        self.attn = SelfAttention(cfg, kernels)
        self.norm2 = _norm(cfg, kernels)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, pos_offset=0, kv_cache=None, layer=0):
        x = x + self.attn(self.norm1(x), rope, pos_offset, kv_cache, layer)
        x = x + self.mlp(self.norm2(x))
        return x


class GPT(nn.Module):
    """Decoder-only Transformer. ``forward(idx, targets=None) -> (logits, loss)``.

    idx, targets: (B, T) int64 token ids with T <= max_seq_len; targets -1 are ignored.
    logits: (B, T, V); loss: mean cross-entropy (None without targets).
    """

    def __init__(self, config: GPTConfig, kernels: str = "fasttfm"):
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"GPT: kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        if kernels == "fasttfm":
            if _fasttfm_attention is None:
                raise ImportError(f"GPT(kernels='fasttfm') needs fasttfm.ops.attention, which failed to import "
                                  f"({_ATTENTION_IMPORT_ERROR}); use kernels='torch'")
            if not 16 <= config.head_dim <= 256:
                raise ValueError(f"GPT(kernels='fasttfm'): head dim d_model/n_head = {config.head_dim} must be "
                                 f"in 16..256 (the fasttfm attention kernels' range)")
        self.config, self.kernels = config, kernels
        self.cp = None
        cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pe", _sinusoidal_table(cfg), persistent=False)   # (max_T, C)
        else:
            cos, sin = _rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)                 # (max_T, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg, kernels)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual output projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def set_context_parallel(self, cp=None):
        """Shard sequences over ranks (a :class:`ContextParallel`) or stop (None). While set, forward
        takes this rank's (B, T / world) shard of each sequence, positions (learned, sinusoidal,
        RoPE) are the shard's global ones, and attention is ring attention over ``cp.group``; the
        loss is the mean over the shard's tokens (equal shards: the mean of the ranks' losses is the
        full sequence's). kernels="fasttfm", causal or sliding attention; not with a KV cache."""
        if cp is not None:
            if self.kernels != "fasttfm":
                raise ValueError("GPT.set_context_parallel: needs kernels='fasttfm' (ring attention)")
            if self.config.attention == "chunked":
                raise ValueError("GPT.set_context_parallel: attention='chunked' is not supported with context "
                                 "parallelism (causal or sliding)")
        self.cp = cp
        for block in self.blocks:
            block.attn.cp = cp

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        logits = self._forward(idx)
        loss = None if targets is None else _loss(logits, targets)
        return logits, loss

    def _forward(self, idx, kv_cache=None):
        """Logits (B, T, V) for idx (B, T). With kv_cache (inference only, kernels="fasttfm", causal or
        sliding attention) idx continues the cached sequence: positions start at kv_cache.length,
        attention covers the cache, and the cache is advanced by T."""
        cfg = self.config
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.length
        if self.cp is not None:
            if kv_cache is not None:
                raise ValueError("GPT: a KV cache is not supported with context parallelism")
            return self._forward_shard(idx)
        if pos + T > cfg.max_seq_len:
            raise ValueError(f"GPT: sequence length {pos + T} is longer than max_seq_len {cfg.max_seq_len}")
        if kv_cache is not None and pos + T > kv_cache.size:
            raise ValueError(f"GPT: {pos + T} tokens do not fit the KV cache of {kv_cache.size} positions")
        x = self.wte(idx)                                  # (B, T, C)
        rope = None
        if cfg.positions == "learned":
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        elif cfg.positions == "sinusoidal":
            x = x + self.pe[pos:pos + T]
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, pos, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.lm_head(self.norm_f(x))                # (B, T, V)

    def _forward_shard(self, idx):
        """Logits (B, T, V) of this rank's shard idx (B, T) of sequences of T * world tokens."""
        cfg, cp = self.config, self.cp
        B, T = idx.shape
        if T * cp.world > cfg.max_seq_len:
            raise ValueError(f"GPT: sequence length {T * cp.world} ({cp.world} shards of {T}) is longer than "
                             f"max_seq_len {cfg.max_seq_len}")
        from .distributed import shard_positions

        pos = shard_positions(T * cp.world, rank=cp.rank, world=cp.world, order=cp.order, device=idx.device)  # (T,)
        x = self.wte(idx)                                  # (B, T, C)
        rope = None
        if cfg.positions == "learned":
            x = x + self.wpe(pos)
        elif cfg.positions == "sinusoidal":
            x = x + self.pe[pos]
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, pos)
        return self.lm_head(self.norm_f(x))                # (B, T, V)

    def can_use_kv_cache(self):
        """True when generate() decodes with fasttfm's KV-cache kernel: kernels="fasttfm" and causal or
        sliding attention. Chunked attention keeps the uncached loop (a token's keys depend on its
        chunk, which a plain append-and-attend cache does not model)."""
        return (self.kernels == "fasttfm" and _fasttfm_attention_with_kvcache is not None
                and self.config.attention in ("causal", "sliding"))

    def new_kv_cache(self, batch, size=None, device=None):
        """An empty KVCache for `batch` sequences of up to `size` (default max_seq_len) tokens."""
        size = self.config.max_seq_len if size is None else min(size, self.config.max_seq_len)
        device = self.wte.weight.device if device is None else device
        return KVCache(self.config.n_layer, batch, size, device)

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        logits = logits.float() / max(temperature, 1e-6)                  # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)           # (B, 1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); the context is cropped to max_seq_len.

        With kernels="fasttfm" and causal or sliding attention (and use_cache), decoding runs on
        ``fasttfm.attention_with_kvcache``: per-layer caches of min(T + max_new_tokens - 1, max_seq_len)
        positions, the prompt prefilled in one call per layer, then one token per step at position
        offset = cache length. Once the sequence would exceed max_seq_len (the context must be cropped,
        which shifts every position) the remaining steps fall back to the cropped uncached loop, so
        the result is the same as the uncached path's. kernels="torch" and chunked attention always
        use the uncached loop (full forward over the cropped context each step).
        """
        max_len = self.config.max_seq_len
        B, T0 = idx.shape
        n_cached = 0
        if use_cache and self.can_use_kv_cache() and max_new_tokens > 0 and T0 <= max_len:
            # steps that see an uncropped context: the one fed at step i has T0 + i tokens
            n_cached = min(max_new_tokens, max_len - T0 + 1)
        if n_cached:
            cache = self.new_kv_cache(B, T0 + n_cached - 1, device=idx.device)
            logits = self._forward(idx, cache)                         # prefill
            for i in range(n_cached):
                nxt = self._sample(logits[:, -1, :], temperature, top_k, generator)
                idx = torch.cat([idx, nxt], dim=1)
                if i + 1 < n_cached:
                    logits = self._forward(nxt, cache)                 # one token, position cache.length
        for _ in range(max_new_tokens - n_cached):
            ctx = idx[:, -max_len:]
            logits, _ = self(ctx)
            nxt = self._sample(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
