"""fasttfm attention: kernels (through the interpreter here, compiled on a GPU runner), the CPU path,
custom ops, torch.compile, SDPA wrapper and input checks.

Reference: float64 attention from an explicit dense (Nq, Nk) mask written from the definition
(``dense_mask``), independent of the kernels' interval/tile logic. Tolerances: FlashAttention's
relative oracle (tests/oracle.py): error <= 2x (outputs) / 3x (gradients) the error of the same
reference evaluated in the low precision, plus a floor. bf16 under the interpreter runs through
fasttfm's own interpreted launches (``kernels/_interp_bf16.py``), as a user's emulate mode does:
no test-only patch.
"""
import contextlib
import itertools

import pytest
import torch

from fasttfm._env import emulate
from fasttfm.ops import attention as A
from kernels import attention as KA, attention_bwd as KB
from tests.oracle import assert_close_oracle, poison_, require_gpu


# -- helpers ---------------------------------------------------------------------------------
def dense_mask(nq, nk, causal=False, window=(-1, -1), chunk=None):
    """(nq, nk) bool: query i sees key j (FlashAttention's bottom-right conventions)."""
    mask = torch.zeros(nq, nk, dtype=torch.bool)
    left, right = window
    if causal:
        right = 0
    for i in range(nq):
        p = i + nk - nq
        for j in range(nk):
            ok = (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
            if chunk:
                ok = ok and (p // chunk == j // chunk)  # Python floor division
            mask[i, j] = ok
    return mask


def alibi_bias(slopes, nq, nk):
    """(B or 1, H, nq, nk) ALiBi bias -slope * |i + nk - nq - j| in float64, from the definition."""
    pos = torch.arange(nq, dtype=torch.float64)[:, None] + (nk - nq)
    dist = (pos - torch.arange(nk, dtype=torch.float64)[None, :]).abs()
    sl = slopes.double() if slopes.dim() == 2 else slopes.double()[None]
    return -sl[:, :, None, None] * dist


def ref_attention(q, k, v, mask, scale, softcap=0.0, alibi=None, drop=None):
    """Dense attention on (B, Hq, N, D) tensors in their own dtype (GQA by repeat); (out, lse).
    softcap: s = c * tanh(s / c); alibi: an additive bias from ``alibi_bias`` (after the cap)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if alibi is not None:
        s = s + alibi.to(s.dtype)
    s = s.masked_fill(~mask, float("-inf"))
    s = s.to(torch.promote_types(s.dtype, torch.float32))  # softmax in >= fp32, as PyTorch's op
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if drop is not None:  # (keep mask, dropout_p): P o Z / (1 - p)
        p = p * drop[0] / (1.0 - drop[1])
    return p.to(q.dtype) @ v, lse


@contextlib.contextmanager
def mode_ctx(mode, dtype):
    """Emulation on for "emu" (every dtype, bf16 included, through the public emulate switch)."""
    with emulate(mode == "emu"):
        yield


def device_of(mode):
    if mode == "cuda":
        require_gpu()
        return "cuda"
    return "cpu"


def to_layout(t, layout):
    return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bnhd_mem" else t


def check_case(mode, dtype, b, hq, hkv, nq, nk, d, causal=False, window=(-1, -1), chunk=None, layout="bhnd",
               grads=True, softcap=0.0, slopes=None, qscale=1.0):
    dev = device_of(mode)
    scale = d ** -0.5
    q64 = torch.randn(b, hq, nq, d, dtype=torch.float64) * qscale
    k64 = torch.randn(b, hkv, nk, d, dtype=torch.float64)
    v64 = torch.randn(b, hkv, nk, d, dtype=torch.float64)
    do64 = torch.randn(b, hq, nq, d, dtype=torch.float64)
    # inputs rounded to dtype once; the references start from exactly these values
    q, k, v, do = (t.to(dtype) for t in (q64, k64, v64, do64))
    mask = dense_mask(nq, nk, causal, window, chunk)
    bias = None if slopes is None else alibi_bias(slopes, nq, nk)
    mod = dict(softcap=softcap, alibi=bias)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, lse = ref_attention(qq, kk, vv, mask, scale, **mod)
        grads_ = torch.autograd.grad(o, (qq, kk, vv), do.to(dt)) if grads else (None,) * 3
        refs[name] = (o, lse, *grads_)
    lse32 = ref_attention(q.float(), k.float(), v.float(), mask, scale, **mod)[1]

    def put(t):  # (B, H, N, D) values in the requested memory layout
        t = t.to(dev)
        if layout == "bnhd":
            return t.transpose(1, 2).contiguous()
        if layout == "strided":  # non-contiguous: a slice of a wider (B, N, H, 2D) buffer, as bhnd view
            buf = torch.randn(t.shape[0], t.shape[2], t.shape[1], 2 * t.shape[3], dtype=t.dtype, device=dev)
            view = buf[..., t.shape[3]:].transpose(1, 2)
            view.copy_(t)
            return view
        return t

    lay = "bnhd" if layout == "bnhd" else "bhnd"
    qd, kd, vd = (put(t).requires_grad_(grads) for t in (q, k, v))
    with mode_ctx(mode, dtype):
        out, lse = A.attention(qd, kd, vd, causal=causal, window=window, chunk_size=chunk, layout=lay,
                               return_lse=True, softcap=softcap,
                               alibi_slopes=None if slopes is None else slopes.to(dev))
        if grads:
            dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), put(do))
    back = (lambda t: t.transpose(1, 2)) if layout == "bnhd" else (lambda t: t)
    assert_close_oracle(back(out), refs["64"][0], refs["lowp"][0], factor=2.0, name="out")
    assert_close_oracle(lse, refs["64"][1], lse32, factor=2.0, floor=1e-4, name="lse")
    if grads:
        for i, (name, g) in enumerate((("dq", dq), ("dk", dk), ("dv", dv))):
            assert_close_oracle(back(g), refs["64"][2 + i], refs["lowp"][2 + i], factor=3.0, name=name,
                                floor=grad_floor(dtype, refs["64"][2:]))


def grad_floor(dtype, grads64):
    """Absolute floor for gradients: the dtype's floor times the problem's gradient scale (a
    gradient can be exactly 0 in the reference, e.g. dq when each row sees one key)."""
    return {F32: 1e-6, F16: 1e-4, BF16: 1e-3}[dtype] * max(1.0, *(g.abs().max().item() for g in grads64))


# -- kernels vs reference ----------------------------------------------------------------------
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# (dtype, B, Hq, Hkv, Nq, Nk, D, causal, window, chunk, layout): a representative subset of the
# cross product dtype x head dim x (Nq, Nk) x mask x GQA x layout.
CASES = [
    (F16, 1, 2, 2, 113, 203, 64, False, (-1, -1), None, "bhnd"),
    (BF16, 1, 2, 1, 113, 203, 80, True, (-1, -1), None, "bnhd"),
    (F32, 1, 2, 2, 256, 256, 32, True, (-1, -1), None, "bhnd"),
    (F16, 2, 4, 2, 300, 128, 32, True, (-1, -1), None, "bhnd"),  # Nq > Nk: rows with no key
    (F16, 1, 2, 2, 1, 257, 128, True, (-1, -1), None, "bhnd"),
    (BF16, 1, 1, 1, 256, 256, 256, False, (40, 7), None, "bhnd"),
    (F16, 1, 3, 1, 113, 203, 32, True, (50, -1), None, "strided"),
    (F16, 1, 2, 2, 200, 200, 64, False, (-1, -1), 64, "bhnd"),
    (BF16, 1, 2, 2, 113, 203, 64, True, (-1, -1), 48, "bnhd"),
    (F16, 1, 4, 2, 300, 128, 64, False, (20, 10), 32, "bhnd"),
    (F32, 1, 2, 1, 113, 203, 96, False, (0, 0), None, "bhnd"),
    (F16, 1, 2, 2, 128, 128, 160, True, (16, -1), 40, "bhnd"),
]


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_attention_matches_reference(mode, case):
    dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, layout = case
    check_case(mode, dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, layout)


# -- softcap and ALiBi (with every mask variant: a representative subset) ----------------------
# (dtype, B, Hq, Hkv, Nq, Nk, D, causal, window, chunk, layout, softcap, alibi: None / "h" / "bh")
MOD_CASES = [
    (F16, 1, 2, 2, 113, 203, 64, False, (-1, -1), None, "bhnd", 5.0, None),
    (F32, 1, 2, 1, 90, 70, 32, True, (-1, -1), None, "bhnd", 3.0, "h"),  # Nq > Nk, GQA
    (BF16, 2, 2, 2, 100, 100, 64, True, (30, -1), None, "bnhd", 0.0, "bh"),
    (F16, 1, 4, 2, 120, 150, 32, False, (20, 10), 32, "bhnd", 4.0, "h"),
    (F16, 1, 2, 2, 130, 130, 64, True, (-1, -1), 48, "strided", 2.0, "bh"),
]


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_softcap_alibi_match_reference(mode, case):
    """Kernels (fwd, dK/dV, dQ) with softcap and/or ALiBi vs the fp64 dense reference; q scaled
    up so scores reach the tanh's saturation (|s| > cap) and the softcap gradient matters."""
    dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, layout, cap, alibi = case
    slopes = None
    if alibi is not None:
        slopes = torch.rand(b, hq) * 0.5 + 0.05 if alibi == "bh" else 2.0 ** -(torch.arange(hq) + 1.0)
    check_case(mode, dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, layout, softcap=cap, slopes=slopes,
               qscale=3.0 if cap else 1.0)


def test_softcap_alibi_varlen_emu():
    """Varlen with per-sequence slopes (B, H) and softcap, fwd + bwd, interpreter vs CPU path."""
    lens_q, lens_k = [37, 20, 5], [50, 20, 40]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    q = torch.randn(cu_q[-1], 2, 32) * 2
    k, v = torch.randn(cu_k[-1], 1, 32), torch.randn(cu_k[-1], 1, 32)
    do = torch.randn_like(q)
    slopes = torch.rand(3, 2)
    res = {}
    for mode in ("cpu", "emu"):
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
        with mode_ctx(mode, F32):
            out, lse = A.attention(qd, kd, vd, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, softcap=3.0,
                                   alibi_slopes=slopes, return_lse=True)
            res[mode] = (out, lse, *torch.autograd.grad(out, (qd, kd, vd), do))
    # per sequence, against the dense reference in fp64
    for i in range(3):
        a, b_, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        m = dense_mask(int(b_ - a), int(e - c), causal=True)
        qs, ks, vs = (t.double().transpose(0, 1)[None] for t in (q[a:b_], k[c:e], v[c:e]))
        o, _ = ref_attention(qs, ks, vs, m, 32 ** -0.5, 3.0, alibi_bias(slopes[i:i + 1], int(b_ - a), int(e - c)))
        torch.testing.assert_close(res["emu"][0][a:b_].double(), o[0].transpose(0, 1), atol=1e-5, rtol=1e-4)
    for x, y in zip(res["cpu"], res["emu"]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


# -- dropout ------------------------------------------------------------------------------------
# (dtype, B, Hq, Hkv, Nq, Nk, D, causal, window, chunk, dropout_p)
DROP_CASES = [
    (F16, 1, 2, 2, 113, 150, 64, False, (-1, -1), None, 0.2),
    (F32, 2, 4, 2, 70, 90, 32, True, (-1, -1), None, 0.5),
    (BF16, 1, 2, 1, 100, 100, 64, True, (30, -1), 32, 0.1),
]


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("case", DROP_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_dropout_matches_reference_with_kernel_mask(mode, case):
    """Output and gradients vs the fp64 reference that applies the keep mask the kernel returns
    (``return_dropout_mask``: the dropout-mask kernel from the same helpers); with softcap too."""
    dtype, b, hq, hkv, nq, nk, d, causal, window, chunk, p = case
    dev = device_of(mode)
    scale = d ** -0.5
    q, do = (torch.randn(b, hq, nq, d, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, nk, d, dtype=torch.float64).to(dtype) for _ in range(2))
    qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
    with mode_ctx(mode, dtype):
        out, lse, keep = A.attention(qd, kd, vd, causal=causal, window=window, chunk_size=chunk, dropout_p=p,
                                     seed=2024, return_lse=True, return_dropout_mask=True)
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dev))
    keep = keep.cpu()
    assert keep.dtype == torch.bool and keep.shape == (b, hq, nq, nk)
    mask = dense_mask(nq, nk, causal, window, chunk)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, l_ = ref_attention(qq, kk, vv, mask, scale, drop=(keep, p))
        refs[name] = (o, l_, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
    assert_close_oracle(lse, refs["64"][1], refs["64"][1].float(), floor=1e-4, name="lse")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_oracle(grads[i], refs["64"][2 + i], refs["lowp"][2 + i], factor=3.0, name=name,
                            floor=grad_floor(dtype, refs["64"][2:]))


def test_dropout_mask_replica_and_keep_rate():
    """The CPU path's torch Philox replica equals the kernels' mask bit for bit (seeds past 2**32,
    counters past 2**32), and the keep rate is 1 - p within 5 sigma for several p."""
    from kernels.attention import dropout_mask

    for p, seed in ((0.1, 7), (0.5, 2**40 + 3), (0.9, 123456789)):
        b, h, nq, nk = 2, 3, 70, 130
        kern = dropout_mask(b, h, nq, nk, dropout_p=p, seed=seed, device="cpu", interpret=True)
        cpu = A._keep_mask(seed, p, [0, 1], h, 0, nq, 0, nk, nq, nk, False, "cpu")
        assert torch.equal(kern, cpu)
        n = kern.numel()
        rate = kern.float().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (p, rate)
    big = A.philox_keep(99, torch.arange(2**33, 2**33 + 200000, dtype=torch.int64), 0.3).float().mean().item()
    assert abs(big - 0.7) < 5 * (0.21 / 200000) ** 0.5
    # the replica against Triton's own tl.rand at 64-bit counters (through the interpreter)
    import triton
    import triton.language as tl
    from kernels._interp import interpreted

    @triton.jit
    def _rand(Out, seed, base, N: tl.constexpr):
        offs = base + tl.arange(0, N).to(tl.int64)
        tl.store(Out + tl.arange(0, N), tl.rand(seed, offs))

    out = torch.empty(256)
    interpreted(_rand)[(1,)](out, 2**35 + 11, 2**33 + 5, N=256)
    ref = A.philox_keep(2**35 + 11, torch.arange(2**33 + 5, 2**33 + 5 + 256), 0.5)
    assert torch.equal(out >= 0.5, ref)


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_dropout_seeded_reproducible_and_varlen(mode):
    """Same seed -> same bits (also via torch.manual_seed); different seeds differ; varlen packed
    problems give the same result on the CPU path and the interpreted kernels."""
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    with mode_ctx(mode, F32):
        a = A.attention(q, k, v, dropout_p=0.3, seed=5)
        b = A.attention(q, k, v, dropout_p=0.3, seed=5)
        c = A.attention(q, k, v, dropout_p=0.3, seed=6)
        torch.manual_seed(0)
        d = A.attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(0)
        e = A.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)
    lens_q, lens_k = [17, 30], [25, 9]
    cu_q = torch.tensor([0, 17, 47], dtype=torch.int32)
    cu_k = torch.tensor([0, 25, 34], dtype=torch.int32)
    qv, kv, vv = torch.randn(47, 2, 32, requires_grad=True), torch.randn(34, 1, 32), torch.randn(34, 1, 32)
    res = {}
    for m in ("cpu", mode):
        with mode_ctx(m, F32):
            o = A.attention(qv, kv, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, dropout_p=0.25, seed=11)
            res[m] = (o, *torch.autograd.grad(o.sum(), (qv,)))
    for x, y in zip(res["cpu"], res[mode]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_sdpa_and_mha_dropout():
    """SDPA with dropout_p: keep rate of the output's implied mask, and nn.MultiheadAttention-style
    modules: training applies dropout (seeded, reproducible), eval mode is a no-op."""
    from fasttfm.mha import MultiheadAttention

    q, k = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 40, 16)
    v = torch.eye(40).repeat(1, 2, 1, 1)[..., :16].contiguous()  # identity-like v exposes P columns
    torch.manual_seed(1)
    a = A.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    b = A.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    zeros = (a == 0).float().mean().item()
    assert 0.4 < zeros < 0.6, zeros
    torch.manual_seed(0)
    m = MultiheadAttention(32, 2, dropout=0.3, batch_first=True)
    x = torch.randn(2, 20, 32)
    m.train()
    torch.manual_seed(3)
    t1 = m(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    t2 = m(x, x, x, need_weights=False)[0]
    m.eval()
    e = m(x, x, x, need_weights=False)[0]
    ref = torch.nn.MultiheadAttention.forward(m, x, x, x, need_weights=False)[0]
    assert torch.equal(t1, t2) and not torch.allclose(t1, e)
    torch.testing.assert_close(e, ref, atol=1e-5, rtol=1e-4)


def varlen_ref(q, k, v, do, cu_q, cu_k, scale, **mask_kw):
    """Per-sequence dense reference on packed (total, H, D) tensors; returns out, lse, dq, dk, dv."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs = []
    for i in range(len(cu_q) - 1):
        a, b_, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        m = dense_mask(b_ - a, e - c, **mask_kw)
        o, l_ = ref_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (qq[a:b_], kk[c:e], vv[c:e])), m, scale)
        outs.append((a, b_, o[0].transpose(0, 1)))
        lse[:, a:b_] = l_[0].to(lse.dtype).detach()
    total = sum((o * do[a:b_]).sum() for a, b_, o in outs)
    dq, dk, dv = torch.autograd.grad(total, (qq, kk, vv), allow_unused=True)
    for a, b_, o in outs:
        out[a:b_] = o.detach()
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("dtype,mask_kw", [
    (F16, dict(causal=True)),
    (BF16, dict(causal=False, window=(16, 4), chunk=32)),
    (F16, dict(causal=True, window=(24, -1))),
])
def test_varlen(mode, dtype, mask_kw):
    dev = device_of(mode)
    lens_q, lens_k = [37, 0, 70, 5, 64], [50, 3, 70, 1, 90]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    hq, hkv, d = 4, 2, 64
    q, k, v, do = (torch.randn(n, h, d, dtype=torch.float64).to(dtype)
                   for n, h in ((cu_q[-1], hq), (cu_k[-1], hkv), (cu_k[-1], hkv), (cu_q[-1], hq)))
    scale = d ** -0.5
    r64 = varlen_ref(q.double(), k.double(), v.double(), do.double(), cu_q.tolist(), cu_k.tolist(), scale, **mask_kw)
    rlp = varlen_ref(q, k, v, do, cu_q.tolist(), cu_k.tolist(), scale, **mask_kw)
    r32 = varlen_ref(q.float(), k.float(), v.float(), do.float(), cu_q.tolist(), cu_k.tolist(), scale, **mask_kw)
    qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
    with mode_ctx(mode, dtype):
        out, lse = A.attention(qd, kd, vd, cu_seqlens_q=cu_q.to(dev), cu_seqlens_k=cu_k.to(dev),
                               max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), return_lse=True,
                               causal=mask_kw.get("causal", False), window=mask_kw.get("window", (-1, -1)),
                               chunk_size=mask_kw.get("chunk"))
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dev))
    assert_close_oracle(out, r64[0], rlp[0], name="out")
    assert_close_oracle(lse, r64[1], r32[1], floor=1e-4, name="lse")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_oracle(grads[i], r64[2 + i], rlp[2 + i], factor=3.0, name=name)


@pytest.fixture
def sm90_tma(monkeypatch):
    """Emulate with sm_90's tables, where use_tma picks TMA loads for aligned fp16/bf16 inputs; yields
    the list of use_tma decisions the forward launches made."""
    from fasttfm.kernels import attention as launched  # the module the ops call

    monkeypatch.setenv("FASTTFM_EMULATE_ARCH", "90")
    chosen, orig = [], launched.use_tma
    monkeypatch.setattr(launched, "use_tma", lambda *a: chosen.append(orig(*a)) or chosen[-1])
    yield chosen


@pytest.mark.parametrize("case", [
    (F16, 1, 4, 2, 113, 203, 64, dict(causal=True)),                     # GQA, Nq != Nk, tails
    (BF16, 1, 2, 2, 70, 70, 80, dict(window=(20, 5))),                   # head dim 80 < BLOCK_D
    (F16, 2, 2, 2, 90, 64, 32, dict(causal=True, chunk=16)),             # Nq > Nk: empty rows
    (F16, 1, 2, 1, 57, 75, 64, dict(layout="bnhd")),
    (F16, 1, 2, 2, 40, 130, 64, dict(layout="strided", window=(-1, 30))),
], ids=["gqa-causal", "bf16-d80-window", "chunk-empty-rows", "bnhd", "strided"])
def test_tma_forward_interpreted(case, sm90_tma):
    """sm_90's forward with K/V through TMA tensor descriptors, run by the interpreter (which
    zero-fills out-of-bounds rows and columns as TMA does), checked like every other case."""
    dtype, b, hq, hkv, nq, nk, d, kw = case
    check_case("emu", dtype, b, hq, hkv, nq, nk, d, **kw)
    assert sm90_tma and all(sm90_tma)


def test_tma_varlen_interpreted(sm90_tma):
    test_varlen("emu", F16, dict(causal=True, window=(24, -1)))
    assert sm90_tma and all(sm90_tma)


def test_use_tma_needs_sm90_16bit_and_alignment(monkeypatch):
    from fasttfm.kernels import attention as launched

    k = torch.randn(2, 3, 50, 64, dtype=F16)
    assert launched.use_tma(90, k, k, False) and not launched.use_tma(80, k, k, False)
    assert not launched.use_tma(89, k, k, False) and not launched.use_tma(90, k.float(), k.float(), False)
    wide = torch.randn(2, 3, 50, 65, dtype=F16)
    assert not launched.use_tma(90, wide[..., 1:], k, False)       # base 2 bytes off
    odd = torch.randn(2, 3, 50, 20, dtype=F16)
    assert not launched.use_tma(90, odd, odd, False)               # 40-byte rows
    one = torch.randn(1, 1, 50, 64, dtype=F16).as_strided((1, 1, 50, 64), (3, 3, 64, 1))
    assert launched.use_tma(90, one, one, False)                   # size-1 dims: stride irrelevant
    monkeypatch.setenv("FASTTFM_TMA", "0")                          # the escape hatch
    assert not launched.use_tma(90, k, k, False)


@pytest.mark.parametrize("has_null", [True, False])
def test_tma_allocator_set_once_and_never_over_a_users(has_null, monkeypatch):
    """ensure_tma_allocator sets fasttfm's scratch allocator in a context that has none, keeps a
    user's, and does not need Triton's private _NULL_ALLOCATOR (absent before Triton 3.6)."""
    import contextvars

    from triton.runtime import _allocation

    from fasttfm.kernels import attention as launched

    if not has_null:
        monkeypatch.delattr(_allocation, "_NULL_ALLOCATOR")

    def fresh():
        launched.ensure_tma_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(fresh) is launched._tma_scratch  # a thread that never set one

    def users():
        mine = lambda size, alignment, stream: None  # noqa: E731
        import triton
        triton.set_allocator(mine)
        launched.ensure_tma_allocator()
        return _allocation._allocator.get() is mine

    assert contextvars.Context().run(users)


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
def test_fully_masked_rows(mode):
    """Rows with no visible key: out 0, LSE -inf, finite zero gradients (causal with Nq > Nk, and
    a chunk whose aligned query position is negative)."""
    dev = device_of(mode)
    q = torch.randn(1, 2, 70, 32, device=dev, dtype=F16, requires_grad=True)
    k = torch.randn(1, 2, 40, 32, device=dev, dtype=F16, requires_grad=True)
    v = torch.randn(1, 2, 40, 32, device=dev, dtype=F16, requires_grad=True)
    for kw in (dict(causal=True), dict(chunk_size=16), dict(window=(3, -1), causal=True)):
        with mode_ctx(mode, F16):
            out, lse = A.attention(q, k, v, return_lse=True, **kw)
            dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
        empty = ~dense_mask(70, 40, kw.get("causal", False), kw.get("window", (-1, -1)), kw.get("chunk_size")).any(1)
        assert empty.sum() >= 30
        assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()
        assert torch.isfinite(lse[:, :, ~empty]).all()
        for g in (dq, dk, dv):
            assert torch.isfinite(g).all()
        assert (dq[:, :, empty] == 0).all()


@pytest.mark.parametrize("mode", ["emu", "cuda"])
def test_backward_is_deterministic(mode):
    dev = device_of(mode)
    q = torch.randn(1, 4, 150, 64, device=dev, dtype=F16, requires_grad=True)
    k = torch.randn(1, 2, 150, 64, device=dev, dtype=F16, requires_grad=True)
    v = torch.randn(1, 2, 150, 64, device=dev, dtype=F16, requires_grad=True)
    do = torch.randn_like(q)
    runs = []
    with mode_ctx(mode, F16):
        for _ in range(2):
            out = A.attention(q, k, v, causal=True, window=(70, -1))
            runs.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
def test_layouts_agree_without_copies(mode):
    """bnhd and a strided bhnd view give the same bits as contiguous bhnd (no copies are made)."""
    dev = device_of(mode)
    base = torch.randn(2, 90, 3, 64, device=dev, dtype=F16)  # (B, N, H, D) memory
    k = torch.randn(2, 3, 90, 64, device=dev, dtype=F16)
    v = torch.randn(2, 3, 90, 64, device=dev, dtype=F16)
    with mode_ctx(mode, F16):
        o_bnhd = A.attention(base, k.transpose(1, 2), v.transpose(1, 2), layout="bnhd", causal=True)
        o_view = A.attention(base.transpose(1, 2), k, v, causal=True)  # non-contiguous bhnd view
        o_cont = A.attention(base.transpose(1, 2).contiguous(), k, v, causal=True)
    assert o_bnhd.shape == base.shape
    assert torch.equal(o_bnhd.transpose(1, 2), o_cont) and torch.equal(o_view, o_cont)


# -- every tuning config, run directly (the interpreter cannot autotune) ----------------------------
def _all_configs():
    """Every (kernel, head-dim bucket, dtype class, config) in the sm_80, sm_86-class and sm_90 tuning lists."""
    out = set()
    for cc, d, dt in itertools.product((80, 86, 90), (64, 128, 256), (F16, F32)):
        if dt == F32 and d != 64:
            continue
        bc = KB.bwd_configs(cc, d, dt)
        out |= {("fwd", d, dt, c) for c in KA.fwd_configs(cc, d, dt)}
        out |= {("dkdv", d, dt, c) for c in bc.dkdv} | {("dq", d, dt, c) for c in bc.dq}
    return sorted(out, key=str)


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_autotune_path_interpreted(arch, monkeypatch):
    """FASTTFM_AUTOTUNE=1 under emulation takes triton.autotune's own launch path (keys, grid
    lambdas, config plumbing) over ``arch``'s full fwd, dK/dV and dQ lists: every config runs in the
    interpreter while tuning, then the chosen one's results are checked like any other case."""
    from fasttfm.kernels import attention as launched  # the module the ops call (not ``kernels.``)

    monkeypatch.setenv("FASTTFM_AUTOTUNE", "1")
    monkeypatch.setenv("FASTTFM_EMULATE_ARCH", str(arch))
    launched._AUTOTUNED.clear()
    check_case("emu", F16, 1, 2, 1, 70, 90, 64, causal=True)
    tuned = {k[0].__name__: (k[1], v) for k, v in launched._AUTOTUNED.items() if k[2]}
    bc = KB.bwd_configs(arch, 64, F16)
    expect = {"_attn_fwd": KA.fwd_configs(arch, 64, F16), "_attn_bwd_dkdv": bc.dkdv, "_attn_bwd_dq": bc.dq}
    assert {n: list(c) for n, (c, _) in tuned.items()} == expect
    for name, (cfgs, tuner) in tuned.items():
        assert set(tuner.keys) <= set(tuner.arg_names), name  # Triton ignores a misspelled key silently
        assert len(tuner.cache) == 1, name  # tuned once for this key, and a config was chosen
        assert len(cfgs) == 1 or len(tuner.configs_timings or {}) == len(cfgs), name  # each one ran
    launched._AUTOTUNED.clear()


def run_kernels(q, k, v, do, *, scale, causal, window, chunk, fwd_cfg=None, dkdv_cfg=None, dq_cfg=None,
                interpret=True, **mods):
    """Direct launcher calls on (B, H, N, D) tensors with explicit configs; (out, lse, dq, dk, dv)."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    left, right = window
    right = 0 if causal else right
    left, right = (KA.UNBOUNDED if w < 0 else w for w in (left, right))
    out, dq = poison_(torch.empty_like(q)), poison_(torch.empty_like(q))
    dk, dv = poison_(torch.empty_like(k)), poison_(torch.empty_like(v))
    lse, delta = poison_(q.new_empty(b, hq, nq, dtype=F32)), q.new_empty(b, hq, nq, dtype=F32)
    kw = dict(batch=b, seqlen_q=nq, seqlen_k=nk, win_left=left, win_right=right, chunk_size=chunk,
              interpret=interpret, **mods)
    KA.attn_fwd(q, k, v, out, lse, max_seqlen_q=nq, qk_scale=scale * KA.LOG2E, config=fwd_cfg, **kw)
    KA.attn_bwd_preprocess(out, do, delta, batch=b, seqlen_q=nq, max_seqlen_q=nq, interpret=interpret)
    KB.attn_bwd_dkdv(q, k, v, do, dk, dv, lse, delta, max_seqlen_k=nk, sm_scale=scale, config=dkdv_cfg, **kw)
    KB.attn_bwd_dq(q, k, v, do, dq, lse, delta, max_seqlen_q=nq, sm_scale=scale, config=dq_cfg, **kw)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("kind,d,dtype,cfg", _all_configs(), ids=lambda x: (
    f"bm{x.BLOCK_M}-bn{x.BLOCK_N}-w{x.num_warps}-s{x.num_stages}" if isinstance(x, tuple) else str(x).replace("torch.", "")))
def test_every_tuning_config(kind, d, dtype, cfg):
    """Each shipped config (sm_80 and sm_90 lists) runs alone through the interpreter on a causal +
    window problem with ragged lengths and GQA; backward configs get out/LSE from the reference."""
    nq, nk = (140, 170) if d < 256 else (70, 100)
    q, do = (torch.randn(1, 2, nq, d, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 1, nk, d, dtype=torch.float64).to(dtype) for _ in range(2))
    scale, window = d ** -0.5, (60, -1)
    mask = dense_mask(nq, nk, True, window)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, lse = ref_attention(qq, kk, vv, mask, scale)
        refs[name] = (o.detach(), lse, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    kw = dict(batch=1, seqlen_q=nq, seqlen_k=nk, win_left=60, win_right=0, chunk_size=None, config=cfg,
              interpret=True)
    if kind == "fwd":
        out, lse = poison_(torch.empty_like(q)), poison_(q.new_empty(1, 2, nq, dtype=F32))
        KA.attn_fwd(q, k, v, out, lse, max_seqlen_q=nq, qk_scale=scale * KA.LOG2E, **kw)
        assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
        assert_close_oracle(lse, refs["64"][1], refs["64"][1].float(), floor=1e-4, name="lse")
        return
    out, lse = refs["64"][0].to(dtype), refs["64"][1].float()
    delta = (out.float() * do.float()).sum(-1)
    if kind == "dkdv":
        dk, dv = poison_(torch.empty_like(k)), poison_(torch.empty_like(v))
        KB.attn_bwd_dkdv(q, k, v, do, dk, dv, lse, delta, max_seqlen_k=nk, sm_scale=scale, **kw)
        got = {"dk": (dk, 3), "dv": (dv, 4)}
    else:
        dq = poison_(torch.empty_like(q))
        KB.attn_bwd_dq(q, k, v, do, dq, lse, delta, max_seqlen_q=nq, sm_scale=scale, **kw)
        got = {"dq": (dq, 2)}
    for name, (g, i) in got.items():
        assert_close_oracle(g, refs["64"][i], refs["lowp"][i], factor=3.0, name=name,
                            floor=grad_floor(dtype, refs["64"][2:]))


def _mod_configs():
    """(head dim, fwd, dK/dV, dQ) configs launched when softcap/ALiBi/dropout are active."""
    out = set()
    for cc, d in itertools.product((80, 86, 90), (64, 128, 256)):
        bc = KB.bwd_configs(cc, d, F16, mods=True)
        out.add((d, KA.fwd_configs(cc, d, F16, mods=True)[0], bc.dkdv[0], bc.dq[0]))
    return sorted(out, key=str)


def _default_configs():
    """(head dim, fwd, dK/dV, dQ): the first (default) config of every plain list, every arch class."""
    out = set()
    for cc, d in itertools.product((80, 86, 90), (64, 128, 256)):
        bc = KB.bwd_configs(cc, d, F16)
        out.add((d, KA.fwd_configs(cc, d, F16)[0], bc.dkdv[0], bc.dq[0]))
    return sorted(out, key=str)


_CFG_ID = dict(ids=lambda x: f"bm{x.BLOCK_M}-bn{x.BLOCK_N}-w{x.num_warps}-s{x.num_stages}" if isinstance(x, tuple)
               else str(x))


@pytest.mark.parametrize("d,fwd,dkdv,dq", _default_configs(), **_CFG_ID)
def test_every_default_config(d, fwd, dkdv, dq):
    """Each default config (what a GPU launches without autotuning; sm_90's chosen by an H200 sweep)
    runs fwd + bwd through the interpreter on a causal + window + chunk problem with GQA, odd lengths
    and tiles cut by every mask edge, against the fp64 reference."""
    nq, nk = (150, 170) if d < 256 else (70, 90)
    q, do = (torch.randn(1, 2, nq, d, dtype=torch.float64).to(F16) for _ in range(2))
    k, v = (torch.randn(1, 1, nk, d, dtype=torch.float64).to(F16) for _ in range(2))
    scale = d ** -0.5
    for causal, window, chunk in ((True, (50, -1), None), (False, (-1, -1), 48)):
        mask = dense_mask(nq, nk, causal, window, chunk)
        refs = {}
        for name, dt in (("64", torch.float64), ("lowp", F16)):
            qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
            o, lse = ref_attention(qq, kk, vv, mask, scale)
            refs[name] = (o.detach(), lse, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
        got = run_kernels(q, k, v, do, scale=scale, causal=causal, window=window, chunk=chunk, fwd_cfg=fwd,
                          dkdv_cfg=dkdv, dq_cfg=dq)
        assert_close_oracle(got[0], refs["64"][0], refs["lowp"][0], name="out")
        for i, name in ((2, "dq"), (3, "dk"), (4, "dv")):
            assert_close_oracle(got[i], refs["64"][i], refs["lowp"][i], factor=3.0, name=name,
                                floor=grad_floor(F16, refs["64"][2:]))


@pytest.mark.parametrize("d,fwd,dkdv,dq", _mod_configs(), **_CFG_ID)
def test_every_modifier_config(d, fwd, dkdv, dq):
    """Each config shipped for modified problems runs fwd + bwd through the interpreter with softcap
    and ALiBi on a causal + window problem with GQA, against the fp64 reference."""
    nq, nk = (90, 110) if d < 256 else (40, 60)
    q, do = (torch.randn(1, 2, nq, d, dtype=torch.float64).to(F16) for _ in range(2))
    k, v = (torch.randn(1, 1, nk, d, dtype=torch.float64).to(F16) for _ in range(2))
    q = (q.float() * 3).to(F16)
    scale, slopes = d ** -0.5, torch.tensor([0.25, 0.0625])
    mask = dense_mask(nq, nk, True, (50, -1))
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", F16)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, lse = ref_attention(qq, kk, vv, mask, scale, 4.0, alibi_bias(slopes, nq, nk))
        refs[name] = (o.detach(), lse, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    got = run_kernels(q, k, v, do, scale=scale, causal=True, window=(50, -1), chunk=None, fwd_cfg=fwd,
                      dkdv_cfg=dkdv, dq_cfg=dq, softcap=4.0, alibi_slopes=slopes)
    assert_close_oracle(got[0], refs["64"][0], refs["lowp"][0], name="out")
    for i, name in ((2, "dq"), (3, "dk"), (4, "dv")):
        assert_close_oracle(got[i], refs["64"][i], refs["lowp"][i], factor=3.0, name=name,
                            floor=grad_floor(F16, refs["64"][2:]))


def dot_counter(monkeypatch):
    """{"n": tl.dot calls executed by the Triton interpreter} (reset it by assigning 0), for tests that
    count visited (q tile, kv tile) pairs."""
    from triton.runtime import interpreter

    counts = {"n": 0}
    orig = interpreter.InterpreterBuilder.create_dot

    def counting(self, *a, **kw):
        counts["n"] += 1
        return orig(self, *a, **kw)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    return counts


# -- block sparsity: fully masked tiles are never computed ---------------------------------------
@pytest.mark.parametrize("mask_kw", [dict(causal=True), dict(causal=True, window=(40, -1)),
                                     dict(window=(20, 20), chunk=64), dict(causal=True, chunk=48)])
def test_only_visible_tiles_are_computed(mask_kw, monkeypatch):
    """Count tl.dot calls in the interpreter: fwd = 2, dK/dV = 4, dQ = 3 per (q tile, kv tile) pair
    with at least one visible (q, k) pair; so work follows the visible area (e.g. a 16k sequence
    with a 1k window visits ~1/8 of causal's tiles)."""
    nq, nk, bm, bn = 200, 260, 32, 32
    counts = dot_counter(monkeypatch)
    q, do = torch.randn(1, 1, nq, 32, dtype=F16), torch.randn(1, 1, nq, 32, dtype=F16)
    k, v = torch.randn(1, 1, nk, 32, dtype=F16), torch.randn(1, 1, nk, 32, dtype=F16)
    mask = dense_mask(nq, nk, mask_kw.get("causal", False), mask_kw.get("window", (-1, -1)), mask_kw.get("chunk"))
    tiles = sum(bool(mask[i:i + bm, j:j + bn].any()) for i in range(0, nq, bm) for j in range(0, nk, bn))
    cfg = KA.AttnConfig(bm, bn, 4, 1)
    got = []
    for kind in ("fwd", "dkdv", "dq"):
        counts["n"] = 0
        kw = {f"{x}_cfg": cfg for x in ("fwd", "dkdv", "dq")}
        if kind == "fwd":
            KA.attn_fwd(q, k, v, torch.empty_like(q), q.new_empty(1, 1, nq, dtype=F32), batch=1, seqlen_q=nq,
                        seqlen_k=nk, max_seqlen_q=nq, qk_scale=1.0,
                        win_left=_w(mask_kw, 0), win_right=_w(mask_kw, 1), chunk_size=mask_kw.get("chunk"),
                        config=cfg, interpret=True)
        else:
            run_kernels(q, k, v, do, scale=0.2, causal=mask_kw.get("causal", False),
                        window=mask_kw.get("window", (-1, -1)), chunk=mask_kw.get("chunk"), **kw)
        got.append(counts["n"])
    assert got[0] == 2 * tiles
    assert got[1] == 2 * tiles + 4 * tiles + 3 * tiles  # run_kernels: fwd + dkdv + dq
    dense_tiles = -(-nq // bm) * -(-nk // bn)
    assert tiles < dense_tiles


def _w(kw, side):
    w = kw.get("window", (-1, -1))[side]
    if side == 1 and kw.get("causal"):
        w = 0
    return KA.UNBOUNDED if w < 0 else w


# -- custom ops, autograd, torch.compile --------------------------------------------------------
@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_opcheck(mode):
    q = torch.randn(1, 2, 40, 32, dtype=F16, requires_grad=True)
    k = torch.randn(1, 1, 50, 32, dtype=F16, requires_grad=True)
    v = torch.randn(1, 1, 50, 32, dtype=F16, requires_grad=True)
    args = (q, k, v, None, None, 40, 50, 0.2, 30, 0, 0, "bhnd")
    with mode_ctx(mode, F16):
        torch.library.opcheck(torch.ops.fasttfm.attn_fwd.default, args)
        out, lse = torch.ops.fasttfm.attn_fwd(*args)
        bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, None, None,
                 40, 50, 0.2, 30, 0, 0, "bhnd")
        torch.library.opcheck(torch.ops.fasttfm.attn_bwd.default, bargs)
        # softcap + ALiBi + dropout arguments (schema, fake tensors, autograd registration)
        margs = args + (3.0, torch.tensor([0.5, 0.25]), 0.2, 1234)
        torch.library.opcheck(torch.ops.fasttfm.attn_fwd.default, margs)
        torch.library.opcheck(torch.ops.fasttfm.attn_bwd.default, bargs + (3.0, torch.tensor([0.5, 0.25]), 0.2, 1234))


def test_torch_compile_fullgraph_no_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    q = torch.randn(2, 20, 4, 32, requires_grad=True)
    k = torch.randn(2, 24, 2, 32, requires_grad=True)
    v = torch.randn(2, 24, 2, 32, requires_grad=True)

    def f(q, k, v):
        out = A.attention(q * 2.0, k, v, layout="bnhd", causal=True, window=(8, -1))
        return (out.float() ** 2).sum()

    explain = torch._dynamo.explain(f)(q, k, v)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_lse_gradient_cpu_and_emu():
    """LSE is differentiable: d lse_i / d s_ij = p_ij folds into Delta."""
    q = torch.randn(1, 2, 30, 32, dtype=torch.float64)
    k = torch.randn(1, 2, 40, 32, dtype=torch.float64)
    v = torch.randn(1, 2, 40, 32, dtype=torch.float64)
    w = torch.randn(1, 2, 30, dtype=torch.float64)
    mask = dense_mask(30, 40, True)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = ref_attention(qq, kk, vv, mask, 0.2)
    lse = torch.logsumexp(((qq @ kk.transpose(-1, -2)) * 0.2).masked_fill(~mask, float("-inf")), -1)
    ref = torch.autograd.grad(o.sum() + (lse * w).sum(), (qq, kk, vv))
    for mode in ("cpu", "emu"):
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        with mode_ctx(mode, F32):
            out, lse_f = A.attention(qf, kf, vf, causal=True, softmax_scale=0.2, return_lse=True)
            got = torch.autograd.grad(out.sum() + (lse_f * w.float()).sum(), (qf, kf, vf))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["cpu", "emu"])
@pytest.mark.parametrize("causal", [False, True])
def test_only_lse_or_only_out_used(mode, causal):
    """Autograd hands the backward None for an unused output (no materialized zeros): only the LSE
    used -> dout None; only out used -> dlse None (the CPU path then takes aten's flash backward)."""
    q, k, v = (torch.randn(2, 4, 33, 32, dtype=torch.float64) for _ in range(3))
    w = torch.randn(2, 4, 33, dtype=torch.float64)
    mask = dense_mask(33, 33, causal)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o, _ = ref_attention(qq, kk, vv, mask, 0.25)
    lse = torch.logsumexp(((qq @ kk.transpose(-1, -2)) * 0.25).masked_fill(~mask, float("-inf")), -1)
    refs = [torch.autograd.grad((lse * w).sum(), (qq, kk, vv), allow_unused=True),
            torch.autograd.grad((o * o).sum(), (qq, kk, vv))]
    for which, ref in zip(("lse", "out"), refs):
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        with mode_ctx(mode, F32):
            out, lse_f = A.attention(qf, kf, vf, causal=causal, softmax_scale=0.25, return_lse=True)
            loss = (lse_f * w.float()).sum() if which == "lse" else (out * out).sum()
            got = torch.autograd.grad(loss, (qf, kf, vf))
        for a, b in zip(got, ref):
            b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=1e-3)


# -- SDPA wrapper ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["cpu", "emu"])
@pytest.mark.parametrize("L,S,is_causal,gqa", [(50, 50, True, False), (30, 70, True, True), (70, 30, True, False),
                                               (40, 60, False, True)])
def test_sdpa_matches_torch(mode, L, S, is_causal, gqa):
    hkv = 2 if gqa else 4
    q = torch.randn(2, 4, L, 32, requires_grad=True)
    k = torch.randn(2, hkv, S, 32, requires_grad=True)
    v = torch.randn(2, hkv, S, 32, requires_grad=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    with mode_ctx(mode, F32):
        out = A.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    with mode_ctx(mode, F32):
        got = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(got, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_sdpa_masks_and_errors():
    q, k, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    bool_mask = torch.rand(10, 12) > 0.3
    bool_mask[:, 0] = True
    float_mask = torch.randn(1, 2, 10, 12)
    for m in (bool_mask, float_mask):
        torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m))
    with pytest.raises(ValueError, match="dropout_p"):
        A.scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        A.scaled_dot_product_attention(q, k[:, :1], v[:, :1])


# -- input validation --------------------------------------------------------------------------
def _t(*shape, dtype=F16):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: A.attention(_t(1, 3, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), ValueError, "multiple of the number of k/v heads"),
    (lambda: A.attention(_t(1, 2, 8, 300), _t(1, 2, 8, 300), _t(1, 2, 8, 300)), ValueError, r"head dims must be in 16\.\.256 \(q/k: 300, v: 300\)"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32, dtype=BF16), _t(1, 2, 8, 32)), TypeError, "share one dtype"),
    (lambda: A.attention(_t(1, 2, 8, 32, dtype=torch.float64), _t(1, 2, 8, 32, dtype=torch.float64),
                         _t(1, 2, 8, 32, dtype=torch.float64)), TypeError, "q.dtype must be one of float16, bfloat16, float32"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), window=(-2, 0)), ValueError,
     r"window must be a pair \(left, right\) of ints >= -1"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), chunk_size=0), ValueError, "chunk_size"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), layout="nhd"), ValueError, "layout must be one of"),
    (lambda: A.attention(_t(8, 2, 32), _t(8, 2, 32), _t(8, 2, 32), cu_seqlens_q=torch.tensor([0, 8]),
                         cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "cu_seqlens_q must be a 1-D torch.int32"),
    (lambda: A.attention(_t(8, 2, 32), _t(8, 2, 32), _t(8, 2, 32), cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32),
                         cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda: A.attention(_t(8, 2, 32), _t(8, 2, 32), _t(8, 2, 32), cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32),
                         cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "packed length 8"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 64), _t(1, 2, 8, 32)), ValueError, "q and k must have the same head dim"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(2, 2, 8, 32), _t(2, 2, 8, 32)), ValueError, "batch sizes"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), softcap=-1.0), ValueError, "softcap must be"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), dropout_p=1.0), ValueError,
     r"dropout_p must be in \[0, 1\)"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), alibi_slopes=torch.ones(3)), ValueError,
     r"alibi_slopes must be a torch.float32 tensor of shape \(2,\) or \(1, 2\)"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 32), alibi_slopes=torch.ones(2, dtype=F16)),
     ValueError, "alibi_slopes must be a torch.float32"),
])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
