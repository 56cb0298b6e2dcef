"""fasttfm.attention_with_kvcache: split-K decode kernels (interpreter here, compiled on a GPU
runner), the CPU path, the in-place append, the custom op and input checks.

Reference: float64 attention over each sequence's valid prefix, with a dense mask written from the
definition (tests/test_attention.py's ``dense_mask``) and FlashAttention's relative oracle. Cache
rows past the valid length are poisoned with NaN, so any read of them shows.
"""
import pytest
import torch

from fasttfm.ops import attention_decode as AD
from tests.oracle import assert_close_oracle
from tests.test_attention import BF16, F16, F32, alibi_bias, dense_mask, device_of, mode_ctx, ref_attention


def decode_ref(q, kc, vc, lens, scale, causal, window, softcap, slopes, pads=None, kmask=None):
    """Per batch: (B, Sq, Hq, D) out and (B, Hq, Sq) lse over cache[pads[b]:lens[b]] (pads: left padding,
    default none) in q's dtype; kmask bool (B, S_max): keys at cache positions where it is False are
    removed from the visible set (positions unchanged)."""
    outs, lses = [], []
    for i, end in enumerate(lens):
        lp = pads[i] if pads is not None else 0
        n = end - lp
        qq = q[i:i + 1].transpose(1, 2)
        kk, vv = (t[i:i + 1, lp:end].transpose(1, 2) for t in (kc, vc))
        mask = dense_mask(q.shape[1], n, causal, window)
        if kmask is not None:
            mask = mask & kmask[i, lp:end][None, :]
        bias = None if slopes is None else alibi_bias(slopes[i:i + 1] if slopes.dim() == 2 else slopes, q.shape[1], n)
        o, l_ = ref_attention(qq, kk, vv, mask, scale, softcap, bias)
        outs.append(o.transpose(1, 2))
        lses.append(l_)
    return torch.cat(outs), torch.cat(lses)


# (dtype, B, Hq, Hkv, Sq, S_max, lens (before append), Snew, causal, window, softcap, alibi, num_splits)
CASES = [
    (F16, 2, 4, 4, 1, 300, [0, 170], 1, False, (-1, -1), 0.0, None, 0),     # MHA, first token in batch 0
    (BF16, 1, 8, 2, 1, 517, [400], 1, False, (-1, -1), 0.0, None, 5),        # GQA 4, split-K
    (F16, 2, 8, 1, 3, 260, [100, 7], 3, True, (-1, -1), 0.0, None, 3),      # MQA, 3 new tokens causal
    (F32, 1, 4, 2, 2, 200, [150], 2, True, (40, -1), 0.0, None, 4),          # sliding window
    (F16, 2, 4, 2, 1, 180, [120, 33], 1, False, (-1, -1), 5.0, "bh", 2),     # softcap + ALiBi
    (F16, 1, 2, 2, 1, 140, [139], 0, False, (-1, -1), 0.0, "h", 3),          # no append, full cache
    (F16, 1, 32, 1, 4, 128, [60], 4, True, (-1, -1), 0.0, None, 2),        # 128 rows per kv head: 2 row blocks
]


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "").replace(" ", "") for x in c))
def test_decode_matches_reference(mode, case):
    dtype, b, hq, hkv, sq, s_max, lens, n_new, causal, window, cap, alibi, splits = case
    dev = device_of(mode)
    d = 64
    scale = d ** -0.5
    kc = torch.full((b, s_max, hkv, d), float("nan"), dtype=dtype)
    vc = torch.full((b, s_max, hkv, d), float("nan"), dtype=dtype)
    for i, n in enumerate(lens):
        kc[i, :n] = torch.randn(n, hkv, d).to(dtype)
        vc[i, :n] = torch.randn(n, hkv, d).to(dtype)
    q = (torch.randn(b, sq, hq, d) * (3.0 if cap else 1.0)).to(dtype)
    k_new = torch.randn(b, n_new, hkv, d).to(dtype) if n_new else None
    v_new = torch.randn(b, n_new, hkv, d).to(dtype) if n_new else None
    slopes = None
    if alibi:
        slopes = torch.rand(b, hq) * 0.3 + 0.02 if alibi == "bh" else 2.0 ** -(torch.arange(hq) + 1.0)
    # expected caches after the append
    kx, vx = kc.clone(), vc.clone()
    for i, n in enumerate(lens):
        if n_new:
            kx[i, n:n + n_new], vx[i, n:n + n_new] = k_new[i], v_new[i]
    total = [n + n_new for n in lens]
    r64 = decode_ref(q.double(), kx.double(), vx.double(), total, scale, causal, window, cap, slopes)
    rlp = decode_ref(q, kx, vx, total, scale, causal, window, cap, slopes)
    kd, vd = kc.to(dev), vc.to(dev)
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    with torch.no_grad(), mode_ctx(mode, dtype):
        out, lse = AD.attention_with_kvcache(
            q.to(dev), kd, vd, seq, None if k_new is None else k_new.to(dev), None if v_new is None else v_new.to(dev),
            causal=causal, window=window, softcap=cap, alibi_slopes=None if slopes is None else slopes.to(dev),
            num_splits=splits, return_lse=True)
    assert torch.equal(kd.cpu().nan_to_num(7.0), kx.nan_to_num(7.0)) and torch.equal(vd.cpu().nan_to_num(7.0),
                                                                                     vx.nan_to_num(7.0))
    assert torch.equal(seq.cpu(), torch.tensor(lens, dtype=torch.int32))  # the caller advances it
    assert_close_oracle(out, r64[0], rlp[0], name="out")
    assert_close_oracle(lse, r64[1], decode_ref(q.float(), kx.float(), vx.float(), total, scale, causal, window,
                                                cap, slopes)[1], floor=1e-4, name="lse")


def appended(kc, vc, lens, k_new, v_new):
    """Copies of the caches with k_new/v_new written at lens[b] .. lens[b] + Snew - 1 (the expected append)."""
    kx, vx = kc.clone(), vc.clone()
    for i, n in enumerate(lens):
        kx[i, n:n + k_new.shape[1]], vx[i, n:n + v_new.shape[1]] = k_new[i], v_new[i]
    return kx, vx


# (dtype, B, Hq, Hkv, Sq, S_max, lens (before append), Snew, causal, window, num_splits, leftpad, paged)
KPM_CASES = [
    (F16, 3, 4, 2, 1, 200, [150, 0, 90], 1, False, (-1, -1), 3, None, False),   # GQA decode, split-K
    (BF16, 2, 4, 4, 3, 160, [100, 40], 3, True, (-1, -1), 1, None, False),     # 3 new tokens, causal
    (F32, 2, 2, 1, 2, 130, [120, 77], 2, True, (30, -1), 2, [5, 0], False),     # window + left padding
    (BF16, 2, 4, 2, 1, 128, [100, 64], 1, False, (-1, -1), 2, None, True),      # paged cache (page 16)
]


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("case", KPM_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "").replace(" ", "")
                                                                     for x in c))
def test_decode_key_padding_mask(mode, case):
    """key_padding_mask removes keys at masked cache positions (holes, a masked prefix as from HF's
    left padding, a fully masked batch entry: output 0 / LSE -inf), positions unchanged; the masked
    keys are poisoned with NaN so a read of a masked key that is not discarded shows."""
    dtype, b, hq, hkv, sq, s_max, lens, n_new, causal, window, splits, pads, paged = case
    dev = device_of(mode)
    d, scale = 32, 32 ** -0.5
    total = [n + n_new for n in lens]
    kmask = torch.rand(b, s_max) > 0.3
    kmask[0, :37] = False                                    # a masked prefix (more than one kv tile)
    kmask[-1] = False if b > 2 else kmask[-1]                # a batch entry that sees nothing
    kc, vc = torch.randn(b, s_max, hkv, d).to(dtype), torch.randn(b, s_max, hkv, d).to(dtype)
    q = torch.randn(b, sq, hq, d).to(dtype)
    k_new, v_new = torch.randn(b, n_new, hkv, d).to(dtype), torch.randn(b, n_new, hkv, d).to(dtype)
    kx, vx = appended(kc, vc, lens, k_new, v_new)
    r64 = decode_ref(q.double(), kx.double(), vx.double(), total, scale, causal, window, 0.0, None, pads, kmask)
    rlp = decode_ref(q, kx, vx, total, scale, causal, window, 0.0, None, pads, kmask)
    poison = ~kmask[:, :, None, None]
    kc, vc = kc.masked_fill(poison, float("nan")), vc.masked_fill(poison, float("nan"))  # appended rows stay finite
    block_table = None
    if paged:  # pages of 16 positions in a shuffled pool
        ps, npg = 16, s_max // 16
        perm = torch.randperm(b * npg)
        block_table = perm.reshape(b, npg).to(torch.int32)
        pool_k, pool_v = torch.empty(b * npg, ps, hkv, d, dtype=dtype), torch.empty(b * npg, ps, hkv, d, dtype=dtype)
        pool_k[perm] = kc.reshape(b * npg, ps, hkv, d)
        pool_v[perm] = vc.reshape(b * npg, ps, hkv, d)
        kc, vc = pool_k, pool_v
    with torch.no_grad(), mode_ctx(mode, dtype):
        out, lse = AD.attention_with_kvcache(
            q.to(dev), kc.to(dev), vc.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev), k_new.to(dev),
            v_new.to(dev), causal=causal, window=window, num_splits=splits, return_lse=True,
            cache_leftpad=None if pads is None else torch.tensor(pads, dtype=torch.int32, device=dev),
            block_table=None if block_table is None else block_table.to(dev), key_padding_mask=kmask.to(dev))
    assert torch.isfinite(out).all()
    assert_close_oracle(out, r64[0].nan_to_num(0.0), rlp[0].nan_to_num(0.0), name="out")
    assert_close_oracle(lse, r64[1], decode_ref(q.float(), kx.float(), vx.float(), total, scale, causal, window,
                                                0.0, None, pads, kmask)[1], floor=1e-4, name="lse")


@pytest.mark.parametrize("mode", ["emu", "cpu", "cuda"])
@pytest.mark.parametrize("dtype,d,dv,splits", [(BF16, 48, 32, 3), (F16, 24, 40, 1), (F32, 40, 24, 2)])
def test_decode_v_head_dim_differs(mode, dtype, d, dv, splits):
    """q/k head dim != v head dim (DeepSeek MLA: 192/128): out (B, Sq, Hq, Dv), GQA, split-K and one split,
    causal new tokens, head dims that are not powers of two (padded blocks)."""
    dev = device_of(mode)
    b, hq, hkv, sq, s_max, lens, n_new = 2, 4, 2, 2, 90, [50, 13], 2
    scale = d ** -0.5
    kc, vc = torch.randn(b, s_max, hkv, d).to(dtype), torch.randn(b, s_max, hkv, dv).to(dtype)
    q = torch.randn(b, sq, hq, d).to(dtype)
    k_new, v_new = torch.randn(b, n_new, hkv, d).to(dtype), torch.randn(b, n_new, hkv, dv).to(dtype)
    kx, vx = appended(kc, vc, lens, k_new, v_new)
    total = [n + n_new for n in lens]
    r64 = decode_ref(q.double(), kx.double(), vx.double(), total, scale, True, (-1, -1), 0.0, None)
    rlp = decode_ref(q, kx, vx, total, scale, True, (-1, -1), 0.0, None)
    with torch.no_grad(), mode_ctx(mode, dtype):
        out, lse = AD.attention_with_kvcache(q.to(dev), kc.to(dev), vc.to(dev),
                                             torch.tensor(lens, dtype=torch.int32, device=dev), k_new.to(dev),
                                             v_new.to(dev), causal=True, num_splits=splits, return_lse=True)
    assert out.shape == (b, sq, hq, dv)
    assert_close_oracle(out, r64[0], rlp[0], name="out")
    assert_close_oracle(lse, r64[1], decode_ref(q.float(), kx.float(), vx.float(), total, scale, True, (-1, -1),
                                                0.0, None)[1], floor=1e-4, name="lse")


def test_decode_key_padding_mask_opcheck_and_compile():
    """Schema/fake tensor with the mask; torch.compile(fullgraph) runs it with no graph break."""
    q, kc, vc = torch.randn(2, 1, 4, 32), torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 32)
    seq = torch.tensor([20, 33], dtype=torch.int32)
    kpm = torch.rand(2, 40) > 0.4
    torch.library.opcheck(torch.ops.fasttfm.attn_decode.default,
                          (q, kc, vc, seq, None, None, 0.2, 1 << 30, 1 << 30, 0.0, None, 0, None, None, None, kpm),
                          test_utils=("test_schema", "test_faketensor"))

    def step(q, kc, vc, seq, kpm):
        return AD.attention_with_kvcache(q, kc, vc, seq, check_seqlens=False, key_padding_mask=kpm)

    with torch.no_grad():
        ref = step(q, kc, vc, seq, kpm)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, seq, kpm)
    torch.testing.assert_close(got, ref)
    unmasked = step(q, kc, vc, seq, None)
    assert not torch.allclose(ref, unmasked)  # the mask changed the result


def test_decode_key_padding_mask_checked():
    q, kc = _t(2, 1, 2, 32), _t(2, 8, 2, 32)
    seq = torch.tensor([3, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a torch.bool tensor of shape \(B=2, S_max=8\)"):
        AD.attention_with_kvcache(q, kc, kc, seq, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be a torch.bool"):
        AD.attention_with_kvcache(q, kc, kc, seq, key_padding_mask=torch.ones(2, 8))


def test_split_counts_agree_emu():
    """1, 3 and 8 splits give the same result (within fp32 rounding of the merge)."""
    q = torch.randn(1, 1, 4, 32, dtype=F16)
    kc, vc = torch.randn(1, 400, 2, 32, dtype=F16), torch.randn(1, 400, 2, 32, dtype=F16)
    seq = torch.tensor([390], dtype=torch.int32)
    outs = []
    with torch.no_grad(), mode_ctx("emu", F16):
        for s in (1, 3, 8):
            outs.append(AD.attention_with_kvcache(q, kc, vc, seq, num_splits=s).float())
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-3, rtol=2e-3)


def test_pick_num_splits():
    from kernels.attention_decode import pick_num_splits

    assert pick_num_splits(1, 8, 1, 32768, 64, 132) == 33  # batch 1, long cache: ~2 waves
    assert pick_num_splits(64, 8, 1, 32768, 64, 132) == 1   # enough programs already
    assert pick_num_splits(1, 8, 1, 100, 64, 132) == 1      # short cache: no split


def test_opcheck_and_compile():
    q = torch.randn(1, 1, 4, 32)
    kc, vc = torch.randn(1, 50, 2, 32), torch.randn(1, 50, 2, 32)
    kn, vn = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 2, 32)
    seq = torch.tensor([20], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fasttfm.attn_decode.default,
                          (q, kc, vc, seq, kn, vn, 0.2, 1 << 30, 1 << 30, 0.0, None, 0),
                          test_utils=("test_schema", "test_faketensor"))

    def step(q, kc, vc, seq, kn, vn):
        return AD.attention_with_kvcache(q, kc, vc, seq, kn, vn, check_seqlens=False)

    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        ref = step(q, kc, vc, seq, kn, vn)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, seq, kn, vn)
    torch.testing.assert_close(got, ref)
    assert torch.equal(kc2, kc) and torch.equal(kc2[0, 20], kn[0, 0])


def _t(*shape, dtype=F16):
    return torch.randn(*shape, dtype=dtype)


_S = torch.tensor([3], dtype=torch.int32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), torch.tensor([7], dtype=torch.int32),
                                       _t(1, 2, 2, 32), _t(1, 2, 2, 32)), ValueError, "cache too small"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), torch.tensor([-1], dtype=torch.int32)),
     ValueError, "cache_seqlens out of range"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), _t(1, 9, 2, 32)[:, :1, 0, 0]
                                       if False else torch.tensor([3])), ValueError, "cache_seqlens must be a torch.int32"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), _S, _t(1, 9, 2, 32), _t(1, 9, 2, 32)),
     ValueError, "cache too small"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 3, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), _S), ValueError, "multiple of"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), _S, _t(1, 1, 2, 32)), ValueError,
     "both k_new and v_new"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32, dtype=BF16), _t(1, 8, 2, 32), _S), TypeError,
     "k_cache.dtype"),
    (lambda: AD.attention_with_kvcache(_t(1, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), _S,
                                       _t(1, 1, 2, 32).requires_grad_(), _t(1, 1, 2, 32)), RuntimeError, "inference-only"),
    (lambda: AD.attention_with_kvcache(_t(2, 1, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32), _S), ValueError, "k_cache must be"),
])
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_grad_mode_ok_without_requires_grad():
    """Grad mode on but nothing requires grad (a plain eval loop): allowed."""
    q, kc, vc = _t(1, 1, 2, 32, dtype=F32), _t(1, 8, 2, 32, dtype=F32), _t(1, 8, 2, 32, dtype=F32)
    out = AD.attention_with_kvcache(q, kc, vc, _S)
    assert out.shape == q.shape and torch.isfinite(out).all()
