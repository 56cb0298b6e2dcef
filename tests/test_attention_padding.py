"""fasttfm.attention with per-sequence masks: ``key_padding_mask``, ``seqused_k`` and ``segment_ids``
(alone, together, and with causal/window/chunk/softcap/ALiBi/dropout/GQA), forward and every
gradient, in cpu and emu modes (the Triton kernels through the interpreter), plus the SDPA and
nn.MultiheadAttention entry points that route padding masks to the kernels.

Reference: float64 attention with a dense (B, Nq, Nk) mask written from the definitions below
(per-element loops, independent of the kernels' interval/tile logic and of the op layer's
helpers). Tolerances: FlashAttention's relative oracle (tests/oracle.py).
"""
import pytest
import torch

from fasttfm.ops import attention as A
from tests.oracle import assert_close_oracle, require_gpu
from tests.test_attention import dot_counter, grad_floor, mode_ctx, sm90_tma  # noqa: F401 (fixture)
from tests.test_attention import ref_attention as ref_attention_dense

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# -- reference, from the definitions -------------------------------------------------------------
def ref_mask(b, nq, nk, causal=False, window=(-1, -1), chunk=None, kpm=None, seqused=None, seg=None):
    """(B, nq, nk) bool: query i of batch row r sees key j. Alignment bottom-right relative to
    used = seqused[r] (else nk); keys j >= used, keys with kpm False and keys in another run of
    equal segment ids are invisible."""
    left, right = window
    if causal:
        right = 0
    mask = torch.zeros(b, nq, nk, dtype=torch.bool)
    for r in range(b):
        used = nk if seqused is None else int(seqused[r])
        ids = None if seg is None else seg[r].tolist()
        run = None
        if ids is not None:  # run index of each token: a new run wherever the id changes
            run = [0]
            for t in range(1, len(ids)):
                run.append(run[-1] + (ids[t] != ids[t - 1]))
        for i in range(nq):
            p = i + used - nq
            for j in range(nk):
                ok = j < used and (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
                if chunk:
                    ok = ok and p // chunk == j // chunk
                if kpm is not None:
                    ok = ok and bool(kpm[r, j])
                if run is not None:
                    ok = ok and run[i] == run[j]
                mask[r, i, j] = ok
    return mask


def ref_alibi(slopes, b, nq, nk, seqused=None):
    """(B, H, nq, nk) float64 bias -slope * |i + used - nq - j|."""
    used = torch.full((b,), nk) if seqused is None else seqused.long()
    pos = torch.arange(nq, dtype=torch.float64)[None, :, None] + (used[:, None, None] - nq)
    dist = (pos - torch.arange(nk, dtype=torch.float64)[None, None, :]).abs()
    sl = slopes.double() if slopes.dim() == 2 else slopes.double()[None].expand(b, -1)
    return -sl[:, :, None, None] * dist[:, None]


def ref_attention(q, k, v, mask, scale, softcap=0.0, bias=None, drop=None):
    """Dense attention on (B, Hq, N, D) tensors in their own dtype; mask (B, nq, nk) per batch row; (out, lse)."""
    return ref_attention_dense(q, k, v, mask[:, None], scale, softcap, bias, drop)


def make_kpm(kind, b, nk):
    """Bool (B, nk) key padding masks: left/right padding with ragged lengths, random holes, and
    one row with no valid key at all ("empty_row")."""
    lens = torch.randint(1, nk + 1, (b,))
    lens[0] = nk if b > 1 else lens[0]  # one unpadded row
    j = torch.arange(nk)[None, :]
    if kind == "right":
        return j < lens[:, None]
    if kind == "left":
        return j >= (nk - lens)[:, None]
    if kind == "random":
        m = torch.rand(b, nk) < 0.6
        m[:, 0] |= ~m.any(-1)
        return m
    if kind == "empty_row":
        m = j < lens[:, None]
        m[-1] = False
        return m
    raise ValueError(kind)


def make_segments(b, n, lengths=None):
    """int64 (B, n) segment ids: random run lengths (or the given ``lengths`` for every row), ids
    reused in different runs (0, 1, 0, ...) so runs, not id values, define the sequences."""
    rows = []
    for _ in range(b):
        ids, cur = [], 0
        while len(ids) < n:
            run = lengths[cur] if lengths else int(torch.randint(1, max(2, n // 3), (1,)))
            ids += [cur % 2] * run
            cur += 1
        rows.append(ids[:n])
    return torch.tensor(rows)


def check_masked(mode, dtype, b, hq, hkv, nq, nk, d, causal=False, window=(-1, -1), chunk=None, kpm=None,
                 seqused=None, seg=None, softcap=0.0, slopes=None, layout="bhnd", qscale=1.0, dv=None):
    """Output, LSE and every gradient of fasttfm.attention with masks vs the fp64 reference; ``dv``: v's head
    dim when it differs from q/k's ``d`` (out and dO then have ``dv``)."""
    dv = d if dv is None else dv
    if mode == "cuda":
        require_gpu()
    dev = "cuda" if mode == "cuda" else "cpu"
    scale = d ** -0.5
    q = (torch.randn(b, hq, nq, d, dtype=torch.float64) * qscale).to(dtype)
    do = torch.randn(b, hq, nq, dv, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(b, hkv, nk, e, dtype=torch.float64).to(dtype) for e in (d, dv))
    mask = ref_mask(b, nq, nk, causal, window, chunk, kpm, seqused, seg)
    bias = None if slopes is None else ref_alibi(slopes, b, nq, nk, seqused)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, lse = ref_attention(qq, kk, vv, mask, scale, softcap, bias)
        refs[name] = (o, lse, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    lse32 = ref_attention(q.float(), k.float(), v.float(), mask, scale, softcap, bias)[1]

    def put(t):
        t = t.to(dev)
        return t.transpose(1, 2).contiguous() if layout == "bnhd" else t

    back = (lambda t: t.transpose(1, 2)) if layout == "bnhd" else (lambda t: t)
    qd, kd, vd = (put(t).requires_grad_() for t in (q, k, v))
    extra = dict(key_padding_mask=None if kpm is None else kpm.to(dev),
                 seqused_k=None if seqused is None else seqused.to(dev),
                 segment_ids=None if seg is None else seg.to(dev))
    with mode_ctx(mode, dtype):
        out, lse = A.attention(qd, kd, vd, causal=causal, window=window, chunk_size=chunk, layout=layout,
                               return_lse=True, softcap=softcap,
                               alibi_slopes=None if slopes is None else slopes.to(dev), **extra)
        dq, dk, dvv = torch.autograd.grad(out, (qd, kd, vd), put(do))
    assert out.shape == put(do).shape and dvv.shape == vd.shape and dk.shape == kd.shape
    assert_close_oracle(back(out), refs["64"][0], refs["lowp"][0], name="out")
    assert_close_oracle(lse, refs["64"][1], lse32, floor=1e-4, name="lse")
    for i, (name, g) in enumerate((("dq", dq), ("dk", dk), ("dv", dvv))):
        assert_close_oracle(back(g), refs["64"][2 + i], refs["lowp"][2 + i], factor=3.0, name=name,
                            floor=grad_floor(dtype, refs["64"][2:]))
    return mask, back(out), lse, back(dk), back(dvv)


# -- key padding ------------------------------------------------------------------------------------
# (dtype, B, Hq, Hkv, Nq, Nk, D, causal, window, chunk, padding kind, layout)
KPAD_CASES = [
    (F16, 3, 2, 2, 37, 53, 32, False, (-1, -1), None, "right", "bhnd"),
    (BF16, 3, 2, 1, 53, 53, 32, True, (-1, -1), None, "left", "bnhd"),
    (F32, 2, 2, 2, 37, 70, 32, True, (20, -1), None, "random", "bhnd"),
    (F16, 2, 4, 2, 40, 40, 64, False, (9, 5), 16, "empty_row", "bhnd"),
    (BF16, 2, 2, 2, 1, 53, 32, True, (-1, -1), None, "left", "bhnd"),  # decode-like: one query row
]


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("case", KPAD_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_key_padding_mask(mode, case):
    dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, kind, layout = case
    kpm = make_kpm(kind, b, nk)
    mask, out, lse, dk, dv = check_masked(mode, dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, kpm=kpm,
                                          layout=layout)
    # padded keys get exactly zero gradients; rows that see nothing give exactly 0 and LSE -inf
    assert (dk.cpu()[~kpm[:, None].expand(-1, hkv, -1)] == 0).all()
    assert (dv.cpu()[~kpm[:, None].expand(-1, hkv, -1)] == 0).all()
    empty = ~mask.any(-1)
    assert (out.cpu()[empty[:, None].expand(-1, hq, -1)] == 0).all()
    assert torch.isneginf(lse.cpu()[empty[:, None].expand(-1, hq, -1)]).all()
    if kind == "empty_row":
        assert empty[-1].all()


# -- seqused_k ----------------------------------------------------------------------------------------
# (dtype, B, Hq, Hkv, Nq, Nk, D, causal, window, chunk)
SEQUSED_CASES = [
    (F16, 3, 2, 1, 5, 53, 32, True, (-1, -1), None),   # decode / chunked prefill over a static cache
    (BF16, 2, 2, 2, 37, 70, 32, True, (16, -1), None),
    (F32, 3, 2, 2, 37, 53, 32, False, (-1, -1), 16),
]


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("case", SEQUSED_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_seqused_k(mode, case):
    dtype, b, hq, hkv, nq, nk, d, causal, window, chunk = case
    seqused = torch.randint(0, nk + 1, (b,), dtype=torch.int32)
    seqused[0] = nk
    seqused[-1] = min(nk, nq // 2)  # fewer keys than queries: early rows see nothing under causal
    _, _, _, dk, dv = check_masked(mode, dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, seqused=seqused)
    for r in range(b):  # keys past seqused_k get exactly zero gradients (written, not left unset)
        assert (dk[r, :, int(seqused[r]):].cpu() == 0).all() and (dv[r, :, int(seqused[r]):].cpu() == 0).all()


# -- segments (packed sequences) -----------------------------------------------------------------------
# (dtype, B, Hq, Hkv, N, D, causal, window, run lengths or None for random)
SEG_CASES = [
    (F16, 2, 2, 2, 53, 32, True, (-1, -1), None),
    (BF16, 2, 2, 1, 37, 32, False, (-1, -1), None),
    (F32, 1, 2, 2, 70, 32, True, (12, -1), None),
    (F16, 2, 2, 2, 45, 64, False, (6, 6), None),
    # runs longer than a tile next to a short one: tiles fully inside one run skip the elementwise
    # mask, tiles across a boundary must not (32-row interpreter tiles)
    (F16, 1, 2, 2, 130, 32, False, (-1, -1), [10, 60, 60]),
    (BF16, 1, 2, 1, 130, 32, True, (-1, -1), [70, 5, 55]),
]


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("case", SEG_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_segment_ids(mode, case):
    dtype, b, hq, hkv, n, d, causal, window, lengths = case
    check_masked(mode, dtype, b, hq, hkv, n, n, d, causal, window, seg=make_segments(b, n, lengths))


# -- all together, with the score modifiers ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_masks_combined_with_modifiers(mode, dtype):
    """key_padding_mask + seqused_k + segment_ids + causal + softcap + ALiBi (B, H) + GQA at once."""
    b, n = 2, 45
    kpm = make_kpm("random", b, n)
    seqused = torch.tensor([n, 30], dtype=torch.int32)
    slopes = torch.rand(b, 4) * 0.3 + 0.05
    check_masked(mode, dtype, b, 4, 2, n, n, 32, True, (-1, -1), None, kpm=kpm, seqused=seqused,
                 seg=make_segments(b, n), softcap=4.0, slopes=slopes, qscale=3.0)


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_masks_with_dropout(mode):
    """Dropout with a key padding mask: the keep mask the kernels report, applied in the fp64
    reference, gives the same output and gradients (masked keys stay at exactly 0)."""
    b, hq, n, d, p = 2, 2, 37, 32, 0.3
    kpm = make_kpm("left", b, n)
    q, k, v, do = (torch.randn(b, hq, n, d, dtype=torch.float64).to(F16) for _ in range(4))
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    with mode_ctx(mode, F16):
        out, keep = A.attention(qd, kd, vd, causal=True, dropout_p=p, seed=77, key_padding_mask=kpm,
                                return_dropout_mask=True)
        grads = torch.autograd.grad(out, (qd, kd, vd), do)
    mask = ref_mask(b, n, n, True, kpm=kpm)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", F16)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, _ = ref_attention(qq, kk, vv, mask, d ** -0.5, drop=(keep, p))
        refs[name] = (o, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_oracle(grads[i], refs["64"][1 + i], refs["lowp"][1 + i], factor=3.0, name=name,
                            floor=grad_floor(F16, refs["64"][1:]))


# -- op-layer helpers and argument checks -----------------------------------------------------------
def test_segment_and_key_bounds_helpers():
    """Run start/end per token and first/last valid key per row, against Python loops."""
    seg = make_segments(3, 41)
    got = A.segment_bounds(seg)
    for r in range(3):
        ids = seg[r].tolist()
        for i in range(41):
            lo = i
            while lo > 0 and ids[lo - 1] == ids[i]:
                lo -= 1
            hi = i
            while hi < 40 and ids[hi + 1] == ids[i]:
                hi += 1
            assert (int(got[r, 0, i]), int(got[r, 1, i])) == (lo, hi)
    kpm = make_kpm("random", 4, 29)
    kpm[2] = False
    kb = A.key_bounds(kpm)
    for r in range(4):
        idx = kpm[r].nonzero().flatten().tolist()
        assert kb[r].tolist() == ([idx[0], idx[-1]] if idx else [29, -1])


@pytest.mark.parametrize("kw,match", [
    (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)),
     r"key_padding_mask must be a torch.bool tensor of shape \(B, Nk\) = \(2, 12\)"),
    (dict(key_padding_mask=torch.ones(2, 12)), "key_padding_mask must be a torch.bool"),
    (dict(seqused_k=torch.ones(2, dtype=torch.int64)), r"seqused_k must be a torch.int32 tensor of shape \(B,\)"),
    (dict(seqused_k=torch.tensor([3, 13], dtype=torch.int32)), r"seqused_k values must be in 0..Nk = 0..12"),
    (dict(segment_ids=torch.zeros(2, 12)), r"segment_ids must be an integer tensor of shape \(B, N\) = \(2, 10\)"),
    (dict(segment_ids=torch.zeros(2, 10, dtype=torch.long)), "segment_ids need Nq == Nk"),
])
def test_mask_argument_errors(kw, match):
    q, k, v = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    with pytest.raises(ValueError, match=match):
        A.attention(q, k, v, **kw)


def test_mask_arguments_refuse_varlen():  # (seqused_k is allowed: test_varlen_seqused_k)
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="key_padding_mask need the dense layouts"):
        A.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, key_padding_mask=torch.ones(2, 10, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_opcheck_with_masks(mode):
    """Schema, fake tensors and autograd registration with the trailing mask arguments."""
    q = torch.randn(2, 2, 20, 32, dtype=F16, requires_grad=True)
    k = torch.randn(2, 1, 20, 32, dtype=F16, requires_grad=True)
    v = torch.randn(2, 1, 20, 32, dtype=F16, requires_grad=True)
    masks = (make_kpm("left", 2, 20), torch.tensor([20, 13], dtype=torch.int32), make_segments(2, 20))
    args = (q, k, v, None, None, 20, 20, 0.2, A.UNBOUNDED, 0, 0, "bhnd", 0.0, None, 0.0, 0) + masks
    with mode_ctx(mode, F16):
        torch.library.opcheck(torch.ops.fasttfm.attn_fwd.default, args)
        out, lse = torch.ops.fasttfm.attn_fwd(*args)
        bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, None,
                 None, 20, 20, 0.2, A.UNBOUNDED, 0, 0, "bhnd", 0.0, None, 0.0, 0) + masks
        torch.library.opcheck(torch.ops.fasttfm.attn_bwd.default, bargs)


def test_torch_compile_fullgraph_with_masks():
    """No graph break and no host sync: masks are device tensors, bounds computed with torch ops."""
    import torch._dynamo

    torch._dynamo.reset()
    b, n = 2, 24
    q, k, v = (torch.randn(b, n, 2, 32, requires_grad=True) for _ in range(3))
    kpm, seqused, seg = make_kpm("left", b, n), torch.tensor([n, 17], dtype=torch.int32), make_segments(b, n)

    def f(q, k, v, kpm, seqused, seg):
        out = A.attention(q * 2.0, k, v, layout="bnhd", causal=True, key_padding_mask=kpm, seqused_k=seqused,
                          segment_ids=seg)
        return (out.float() ** 2).sum()

    explain = torch._dynamo.explain(f)(q, k, v, kpm, seqused, seg)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, kpm, seqused, seg)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v, kpm, seqused, seg)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    for a, b_ in zip(grads, grads_e):
        torch.testing.assert_close(a, b_)


# -- tile skipping: fully padded kv tiles are never loaded -----------------------------------------
@pytest.mark.parametrize("kind", ["left", "right", "seqused"])
def test_padded_tiles_are_skipped(kind, monkeypatch):
    """Count tl.dot calls in the interpreter (fwd 2, dK/dV 4, dQ 3 per visited (q tile, kv tile)
    pair): with left/right key padding or seqused_k, exactly the pairs holding a visible (q, k)
    pair are visited, so leading/trailing padded kv tiles cost nothing in any kernel."""
    from fasttfm._env import emulate

    b, n, bm, bn = 2, 160, 32, 32  # SMOKE configs under the interpreter: 32 x 32 tiles
    counts = dot_counter(monkeypatch)
    lens = torch.tensor([100, 37])
    j = torch.arange(n)[None, :]
    kw, kpm, seqused = {}, None, None
    if kind == "left":
        kpm = kw["key_padding_mask"] = j >= (n - lens)[:, None]
    elif kind == "right":
        kpm = kw["key_padding_mask"] = j < lens[:, None]
    else:
        seqused = kw["seqused_k"] = lens.to(torch.int32)
    mask = ref_mask(b, n, n, True, kpm=kpm, seqused=seqused)
    tiles = sum(bool(mask[r, i:i + bm, c:c + bn].any()) for r in range(b) for i in range(0, n, bm)
                for c in range(0, n, bn))
    q, k, v = (torch.randn(b, 1, n, 32, dtype=F16, requires_grad=True) for _ in range(3))
    with emulate(True):
        out = A.attention(q, k, v, causal=True, **kw)
        assert counts["n"] == 2 * tiles
        out.backward(torch.randn_like(out))
    assert counts["n"] == 9 * tiles
    assert tiles < b * (n // bm) * (n // bn + 1) // 2  # fewer than causal alone visits


@pytest.mark.parametrize("which", ["kpad", "seqused", "segments"])
def test_masks_tma_forward_interpreted(which, sm90_tma):
    """sm_90's forward (K/V through TMA tensor descriptors sized by seqused_k) with each mask."""
    b, n = 2, 53
    kw = dict(kpm=make_kpm("left", b, n)) if which == "kpad" else \
        dict(seqused=torch.tensor([n, 29], dtype=torch.int32)) if which == "seqused" else \
        dict(seg=make_segments(b, n, [20, 33]))
    check_masked("emu", F16, b, 2, 2, n, n, 64, True, **kw)
    assert sm90_tma and all(sm90_tma)


# -- users: SDPA boolean per-key masks, nn.MultiheadAttention key_padding_mask --------------------------
def _count_kernel_calls(monkeypatch):
    """Record whether fasttfm's op or torch's SDPA ran (the op layer's reference to torch's SDPA)."""
    calls = {"torch": 0}
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        calls["torch"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls, real


@pytest.mark.parametrize("mode", ["cpu", "emu"])
@pytest.mark.parametrize("shape", ["b11s", "111s", "1s", "bs_5d"])
@pytest.mark.parametrize("is_gqa", [False, True])
def test_sdpa_key_padding_mask_runs_kernel(mode, shape, is_gqa, monkeypatch):
    """Boolean per-key masks in SDPA's broadcast shapes run the kernel with key_padding_mask and match
    torch's SDPA (fp32, fwd + grads), fully masked rows included (torch gives 0 there too)."""
    b, h, L, S, e = 3, 4, 37, 53, 32
    hkv = 2 if is_gqa else h
    q = torch.randn(b, h, L, e, requires_grad=True)
    k, v = (torch.randn(b, hkv, S, e, requires_grad=True) for _ in range(2))
    kpm = make_kpm("empty_row", b, S)
    mask = {"b11s": kpm[:, None, None, :], "111s": kpm[:1, None, None, :], "1s": kpm[:1],
            "bs_5d": kpm[:, None, None, None, :]}[shape]
    if shape == "bs_5d":  # (N, G, H, L, E) queries with a (N, 1, 1, 1, S) mask
        q, k, v = (t.detach().unsqueeze(1).expand(-1, 2, -1, -1, -1).clone().requires_grad_() for t in (q, k, v))
    calls, real = _count_kernel_calls(monkeypatch)
    ref = real(q, k, v, attn_mask=mask, enable_gqa=is_gqa)
    with mode_ctx(mode, F32):
        out = A.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=is_gqa)
    assert calls["torch"] == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    with mode_ctx(mode, F32):
        got = torch.autograd.grad(out, (q, k, v), g)
    for a, b_ in zip(got, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-3)


def test_sdpa_other_masks_stay_on_torch(monkeypatch):
    """Per-query / per-head boolean masks and float masks are not key padding: torch's SDPA runs them."""
    q, k, v = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    calls, real = _count_kernel_calls(monkeypatch)
    masks = [torch.rand(10, 12) > 0.3, torch.rand(2, 2, 1, 12) > 0.3, torch.rand(2, 1, 10, 12) > 0.3,
             torch.randn(2, 1, 1, 12)]
    for i, m in enumerate(masks):
        torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, attn_mask=m), real(q, k, v, attn_mask=m))
        assert calls["torch"] == i + 1


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_varlen_seqused_k(mode, dtype):
    """Varlen (cu_seqlens) with seqused_k (FlashAttention-3 style): sequence i uses its first
    seqused_k[i] keys, bottom-right aligned to them; per sequence against the fp64 reference,
    output and every gradient; unused keys get exactly zero gradients."""
    if mode == "cuda":
        require_gpu()
    dev = "cuda" if mode == "cuda" else "cpu"
    lens_q, lens_k, used = [37, 5, 20], [53, 40, 20], [41, 40, 0]
    cu_q = torch.tensor([0, 37, 42, 62], dtype=torch.int32)
    cu_k = torch.tensor([0, 53, 93, 113], dtype=torch.int32)
    hq, hkv, d = 2, 1, 32
    q, do = (torch.randn(62, hq, d, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(113, hkv, d, dtype=torch.float64).to(dtype) for _ in range(2))
    qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
    with mode_ctx(mode, dtype):
        out = A.attention(qd, kd, vd, cu_seqlens_q=cu_q.to(dev), cu_seqlens_k=cu_k.to(dev), causal=True,
                          seqused_k=torch.tensor(used, dtype=torch.int32, device=dev))
        got = (out, *torch.autograd.grad(out, (qd, kd, vd), do.to(dev)))
    for i in range(3):
        qs, ks, vs, dos = (t[a:a + n].transpose(0, 1)[None] for t, a, n in
                           ((q, cu_q[i], lens_q[i]), (k, cu_k[i], lens_k[i]), (v, cu_k[i], lens_k[i]),
                            (do, cu_q[i], lens_q[i])))
        mask = ref_mask(1, lens_q[i], lens_k[i], True, seqused=torch.tensor([used[i]]))
        refs = {}
        for name, dt in (("64", torch.float64), ("lowp", dtype)):
            qq, kk, vv = (t.to(dt).requires_grad_() for t in (qs, ks, vs))
            o, _ = ref_attention(qq, kk, vv, mask, d ** -0.5)
            refs[name] = (o, *torch.autograd.grad(o, (qq, kk, vv), dos.to(dt)))
        sl = [slice(int(cu_q[i]), int(cu_q[i]) + lens_q[i])] * 2 + [slice(int(cu_k[i]), int(cu_k[i]) + lens_k[i])] * 2
        for j, name in enumerate(("out", "dq", "dk", "dv")):
            assert_close_oracle(got[j][sl[j]].transpose(0, 1)[None], refs["64"][j], refs["lowp"][j],
                                factor=2.0 if j == 0 else 3.0, name=f"{name}[{i}]",
                                floor=None if j == 0 else grad_floor(dtype, refs["64"][1:]))
        assert (got[2][int(cu_k[i]) + used[i]:int(cu_k[i + 1])].cpu() == 0).all()


@pytest.mark.parametrize("mode", ["cpu", "emu"])
@pytest.mark.parametrize("causal", [False, True])
def test_bench_padded_rows_compute_the_same(mode, causal):
    """bench_attention's padded-batch providers (kernel with key_padding_mask, varlen on packed tokens,
    SDPA with a boolean mask) give the same outputs on the valid query rows: the rows compare like
    with like."""
    from bench import bench_attention as BA

    b, h, n, d = 3, 2, 40, 32
    lens = BA.pad_lengths(b, n)
    assert lens == [n - (n // 2) * (i + 1) // b for i in range(b)] and min(lens) == n // 2
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    provs = BA.padded_providers(causal, lens, [])
    with mode_ctx(mode, F32):
        outs = {name: fn(q, k, v) for name, fn in provs.items()}
    packed = outs.pop("fasttfm_unpadded")
    starts = [sum(lens[:i]) for i in range(b)]
    for i, m in enumerate(lens):
        want = packed[starts[i]:starts[i] + m].transpose(0, 1)
        for name, o in outs.items():
            torch.testing.assert_close(o[i, :, :m], want, atol=1e-5, rtol=1e-4, msg=name)
