"""fasttfm.flash_attn_interface.flash_attn_with_kvcache: append, rotary, cache_batch_idx,
cache_leftpad, int/None cache_seqlens and paged caches (block_table), in cpu, emu (the decode
kernels' own source through the interpreter) and cuda modes.

The reference is written from flash-attn's documented semantics in float64: rotary through complex
multiplication (an implementation independent of the op's), keys = cache positions
leftpad .. cache_seqlens + Snew - 1 of the cache row (or pages) the batch entry maps to, masks and
ALiBi from tests/test_attention.py. Cache rows that no batch entry may read are NaN, so a read
of a wrong page or row shows. Two tests prove the checks are sharp: a block table with one page
index wrong, and the other rotary layout, must both fail the comparison.
"""
import pytest
import torch

from fasttfm import flash_attn_interface as FI
from tests.oracle import assert_close_oracle
from tests.test_attention import BF16, F16, F32, device_of, mode_ctx
from tests.test_attention_decode import decode_ref


def rotary_ref(x, cos, sin, pos, interleaved):
    """x (B, S, H, D) rotated at positions pos (B, S) via complex multiplication, in float64."""
    rd = 2 * cos.shape[1]
    xr = x[..., :rd].double()
    if interleaved:
        pairs = xr.reshape(*xr.shape[:-1], rd // 2, 2)
    else:
        pairs = torch.stack((xr[..., :rd // 2], xr[..., rd // 2:]), -1)
    z = torch.view_as_complex(pairs.contiguous())
    w = z * torch.complex(cos.double(), sin.double())[pos][:, :, None, :]  # x * e^(i theta)
    out = torch.view_as_real(w)
    out = out.flatten(-2) if interleaved else torch.cat((out[..., 0], out[..., 1]), -1)
    return torch.cat((out, x[..., rd:].double()), -1)


def make_rotary(n, rd, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def kv_ref(q, kc, vc, lens_end, pads, scale, causal, window, softcap, slopes):
    """(B, Sq, Hq, D) out and (B, Hq, Sq) lse over logical caches kc[b, pads[b]:lens_end[b]] (q's dtype)."""
    return decode_ref(q, kc, vc, lens_end, scale, causal, window, softcap, slopes, pads=pads)


def to_pages(logical, page, perm, num_pages):
    """Scatter a logical (B, S_max, H, D) cache into (num_pages, page, H, D) pages; batch b's j-th
    page goes to page perm[b * P + j]; unused pages are NaN."""
    b, s_max = logical.shape[:2]
    p = s_max // page
    pages = torch.full((num_pages, page, *logical.shape[2:]), float("nan"), dtype=logical.dtype)
    pages[perm[:b * p]] = logical.reshape(b * p, page, *logical.shape[2:])
    return pages, perm[:b * p].reshape(b, p).to(torch.int32)


def from_pages(pages, table):
    return pages[table.long()].flatten(1, 2)


# (dtype, mha_type, d, Sq, S_max, Snew, causal, window, alibi, softcap, rotary, page, batch_idx, leftpad,
#  int_seqlens, splits)
GRID = [
    (F16, "mha", 64, 1, 160, 1, False, (-1, -1), False, 0.0, None, None, False, False, False, 0),
    (F16, "gqa", 64, 1, 160, 1, True, (-1, -1), False, 0.0, "interleaved", 16, False, False, False, 3),
    (F16, "mqa", 32, 3, 128, 3, True, (-1, -1), True, 0.0, "neox", 32, False, False, False, 2),
    (BF16, "gqa", 64, 2, 192, 2, False, (40, 0), False, 0.0, "neox-half", None, True, False, False, 0),
    (F32, "mha", 32, 1, 96, 0, False, (-1, -1), False, 0.0, None, 16, False, False, True, 0),
    (F16, "gqa", 64, 2, 200, 2, True, (-1, -1), False, 15.0, "interleaved", None, False, True, False, 2),
    (F16, "mha", 48, 4, 128, 1, False, (-1, -1), True, 0.0, "interleaved-half", 64, False, True, False, 1),
    (F16, "mqa", 64, 1, 144, 1, False, (-1, -1), False, 0.0, "neox", None, True, True, True, 4),
]
_HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _case_id(c):
    return "-".join(str(x).replace("torch.", "").replace(" ", "") for x in c)


def build(case, seed=0):
    """Inputs and expected results of one case (CPU tensors)."""
    (dtype, mha, d, sq, s_max, n_new, causal, window, alibi, cap, rotary, page, bidx, leftpad, int_lens,
     splits) = case
    g = torch.Generator().manual_seed(seed)
    b = 3
    hq, hkv = _HEADS[mha]
    rows = b + 2 if bidx else b
    lens = [s_max - n_new] * b if int_lens else \
        [int(x) for x in torch.randint(0, s_max - n_new + 1, (b,), generator=g)]
    lens[0] = s_max - n_new  # one full cache
    pads = [int(torch.randint(0, n + 1, (1,), generator=g)) if leftpad else 0 for n in lens]
    cache_idx = torch.randperm(rows, generator=g)[:b].to(torch.int32) if bidx else torch.arange(b, dtype=torch.int32)
    kc = torch.full((rows, s_max, hkv, d), float("nan"), dtype=dtype)
    vc = torch.full((rows, s_max, hkv, d), float("nan"), dtype=dtype)
    for i, n in enumerate(lens):
        r = int(cache_idx[i])
        kc[r, :n] = torch.randn(n, hkv, d, generator=g).to(dtype)
        vc[r, :n] = torch.randn(n, hkv, d, generator=g).to(dtype)
    q = (torch.randn(b, sq, hq, d, generator=g) * (3.0 if cap else 1.0)).to(dtype)
    k_new = torch.randn(b, n_new, hkv, d, generator=g).to(dtype) if n_new else None
    v_new = torch.randn(b, n_new, hkv, d, generator=g).to(dtype) if n_new else None
    slopes = torch.rand(b, hq, generator=g) * 0.3 + 0.02 if alibi else None
    cos = sin = None
    if rotary:
        rd = d // 2 if rotary.endswith("half") else d
        rd -= rd % 16
        cos, sin = make_rotary(s_max, rd, dtype)
    # -- expected: rotate, append, attend (float64 rotation rounded to dtype, as the op stores it)
    inter = bool(rotary) and rotary.startswith("interleaved")
    base = torch.tensor(lens) - torch.tensor(pads)
    qr, kr = q, k_new
    if rotary and n_new:
        kpos = base[:, None] + torch.arange(n_new)[None, :]
        kr = rotary_ref(k_new, cos, sin, kpos, inter).to(dtype)
        is_local = causal or any(0 <= w < s_max for w in window)
        qpos = (base[:, None] + (torch.arange(sq)[None, :] if is_local else 0)).expand(b, sq)
        qr = rotary_ref(q, cos, sin, qpos, inter).to(dtype)  # flash-attn rounds the rotated q to its dtype too
    kx, vx = kc[cache_idx.long()].clone(), vc[cache_idx.long()].clone()  # logical (B, S_max, ...) views
    for i, n in enumerate(lens):
        if n_new:
            kx[i, n:n + n_new], vx[i, n:n + n_new] = kr[i], v_new[i]
    ends = [n + n_new for n in lens]
    scale = d ** -0.5
    r64 = kv_ref(qr.double(), kx.double(), vx.double(), ends, pads, scale, causal, window, cap, slopes)
    rlp = kv_ref(qr.to(dtype), kx, vx, ends, pads, scale, causal, window, cap, slopes)
    return dict(q=q, kc=kc, vc=vc, k_new=k_new, v_new=v_new, lens=lens, pads=pads, cache_idx=cache_idx,
                slopes=slopes, cos=cos, sin=sin, inter=inter, kx=kx, vx=vx, r64=r64, rlp=rlp)


def run(case, x, dev, mode, block_table_fn=None, interleaved=None):
    (dtype, mha, d, sq, s_max, n_new, causal, window, alibi, cap, rotary, page, bidx, leftpad, int_lens,
     splits) = case
    b = x["q"].shape[0]
    kc, vc, table = x["kc"], x["vc"], None
    if page:
        logical_k, logical_v = x["kc"][x["cache_idx"].long()], x["vc"][x["cache_idx"].long()]
        num_pages = b * (s_max // page) + 3
        perm = torch.randperm(num_pages)
        kc, table = to_pages(logical_k, page, perm, num_pages)
        vc, _ = to_pages(logical_v, page, perm, num_pages)
        if block_table_fn is not None:
            table = block_table_fn(table)
    kd, vd = kc.to(dev), vc.to(dev)
    seqlens = x["lens"][0] if int_lens else torch.tensor(x["lens"], dtype=torch.int32, device=dev)
    put = (lambda t: None if t is None else t.to(dev))
    with mode_ctx(mode, dtype):
        out, lse = FI.flash_attn_with_kvcache(
            put(x["q"]), kd, vd, put(x["k_new"]), put(x["v_new"]), rotary_cos=put(x["cos"]), rotary_sin=put(x["sin"]),
            cache_seqlens=seqlens, cache_batch_idx=put(x["cache_idx"]) if bidx and not page else None,
            cache_leftpad=torch.tensor(x["pads"], dtype=torch.int32, device=dev) if leftpad else None,
            block_table=put(table), causal=causal, window_size=window, softcap=cap,
            rotary_interleaved=x["inter"] if interleaved is None else interleaved,
            alibi_slopes=put(x["slopes"]), num_splits=splits, return_softmax_lse=True)
    if page:
        kd, vd = from_pages(kd.cpu(), table), from_pages(vd.cpu(), table)
    elif bidx:
        kd, vd = kd.cpu()[x["cache_idx"].long()], vd.cpu()[x["cache_idx"].long()]
    return out, lse, kd.cpu(), vd.cpu()


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_kvcache_matches_reference(mode, case):
    dev = device_of(mode)
    x = build(case, seed=int(torch.randint(0, 2**31, (1,))))
    out, lse, kd, vd = run(case, x, dev, mode)
    # the append (rotated keys, values as given) landed where the cache positions say
    assert torch.equal(kd.nan_to_num(7.0), x["kx"].nan_to_num(7.0)), "k_cache after the append"
    assert torch.equal(vd.nan_to_num(7.0), x["vx"].nan_to_num(7.0)), "v_cache after the append"
    assert_close_oracle(out, x["r64"][0], x["rlp"][0], name="out")
    ref_lse = x["r64"][1].masked_fill(x["r64"][1] == float("-inf"), float("inf"))  # flash-attn: +inf, no keys
    assert_close_oracle(lse, ref_lse, ref_lse.float(), floor=1e-4, name="lse")


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("splits", [1, 3])
def test_kvcache_empty_rows(mode, splits):
    """A sequence with no valid key (empty cache, nothing appended): output 0 and LSE +inf, as flash-attn;
    the other sequence is unaffected."""
    dev = device_of(mode)
    q = torch.randn(2, 1, 4, 32, dtype=F16)
    kc, vc = torch.randn(2, 96, 2, 32, dtype=F16), torch.randn(2, 96, 2, 32, dtype=F16)
    seq = torch.tensor([0, 50], dtype=torch.int32)
    with mode_ctx(mode, F16):
        out, lse = FI.flash_attn_with_kvcache(q.to(dev), kc.to(dev), vc.to(dev), cache_seqlens=seq.to(dev),
                                              num_splits=splits, return_softmax_lse=True)
    assert (out[0].cpu() == 0).all() and torch.isposinf(lse[0].cpu()).all()
    r64 = kv_ref(q.double(), kc.double(), vc.double(), [0, 50], [0, 0], 32 ** -0.5, False, (-1, -1), 0.0, None)
    rlp = kv_ref(q, kc, vc, [0, 50], [0, 0], 32 ** -0.5, False, (-1, -1), 0.0, None)
    assert_close_oracle(out[1:], r64[0][1:], rlp[0][1:], name="out")


@pytest.mark.parametrize("mode", ["cpu", "emu"])
@pytest.mark.parametrize("page", [16, 48])
def test_paged_equals_contiguous(mode, page):
    """The same cache, contiguous and scattered over pages in random order: identical results."""
    case = (F16, "gqa", 64, 2, 192, 2, True, (-1, -1), False, 0.0, None, None, False, False, False, 2)
    x = build(case, seed=int(torch.randint(0, 2**31, (1,))))
    paged = case[:11] + (page,) + case[12:]
    out_c, lse_c, kc, vc = run(case, x, "cpu", mode)
    out_p, lse_p, kp, vp = run(paged, x, "cpu", mode)
    assert torch.equal(kc.nan_to_num(7.0), kp.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vp.nan_to_num(7.0))
    torch.testing.assert_close(out_p, out_c, atol=0, rtol=0)
    torch.testing.assert_close(lse_p, lse_c, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_wrong_page_index_is_detected(mode):
    """A block table with one page index wrong (another sequence's page) fails the reference check."""
    case = (F16, "mha", 32, 1, 128, 1, False, (-1, -1), False, 0.0, None, 16, False, False, True, 0)
    x = build(case, seed=1)

    def corrupt(table):
        t = table.clone()
        t[0, 2] = table[1, 2]  # batch 0 reads batch 1's third page
        return t

    out, lse, _, _ = run(case, x, "cpu", mode, block_table_fn=corrupt)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_oracle(out, x["r64"][0], x["rlp"][0], name="out")


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_wrong_rotary_layout_is_detected(mode):
    """The other rotary layout (GPT-NeoX halves instead of interleaved pairs) fails the reference check."""
    case = (F16, "mha", 64, 2, 96, 2, True, (-1, -1), False, 0.0, "interleaved", None, False, False, False, 0)
    x = build(case, seed=2)
    out, _, kd, _ = run(case, x, "cpu", mode, interleaved=False)
    assert not torch.equal(kd.nan_to_num(7.0), x["kx"].nan_to_num(7.0))
    with pytest.raises(AssertionError, match="max error"):
        assert_close_oracle(out, x["r64"][0], x["rlp"][0], name="out")


def test_seqlens_none_means_full_cache_and_no_grad():
    q = torch.randn(2, 1, 2, 32, requires_grad=True)
    kc, vc = torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 32)
    out = FI.flash_attn_with_kvcache(q, kc, vc)
    ref = FI.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.full((2,), 40, dtype=torch.int32))
    assert torch.equal(out, ref) and not out.requires_grad
    full = FI.flash_attn_func(q.detach(), kc, vc)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_kvcache_bad_arguments():
    q = torch.randn(2, 1, 2, 32)
    kc, vc = torch.randn(6, 16, 2, 32), torch.randn(6, 16, 2, 32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    kn = torch.randn(2, 1, 2, 32)
    with pytest.raises(ValueError, match="cache_batch_idx cannot be combined with block_table"):
        FI.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, block_table=table,
                                   cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="page size"):
        FI.flash_attn_with_kvcache(q, kc[:, :8], vc[:, :8], cache_seqlens=3, block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 9"):
        FI.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3,
                                   block_table=torch.tensor([[0, 1], [9, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table must be a torch.int32"):
        FI.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, block_table=table.long())
    cos, sin = make_rotary(32, 16, torch.float32)
    with pytest.raises(ValueError, match="rotary_cos/rotary_sin need the new k"):
        FI.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, block_table=table, rotary_cos=cos, rotary_sin=sin)
    with pytest.raises(ValueError, match="rotary_dim"):
        c2, s2 = make_rotary(32, 8, torch.float32)
        FI.flash_attn_with_kvcache(q, kc, vc, kn, kn, cache_seqlens=3, block_table=table, rotary_cos=c2, rotary_sin=s2)
    with pytest.raises(ValueError, match="cache_leftpad out of range"):
        FI.flash_attn_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=3,
                                   cache_leftpad=torch.tensor([4, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_batch_idx out of range"):
        FI.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3, cache_batch_idx=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="need cache_seqlens"):
        FI.flash_attn_with_kvcache(q, kc[:2], vc[:2], kn, kn)
    with pytest.raises(ValueError, match="num_splits"):
        FI.flash_attn_with_kvcache(q, kc[:2], vc[:2], cache_seqlens=3, num_splits=-1)
