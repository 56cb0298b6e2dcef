"""fasttfm.flash_attn_interface: flash-attn 2.8's functions (dense, packed, varlen) and the
bert_padding helpers, against float64 references written from flash-attn's documented semantics.

The grid has the *shape* of flash-attn's tests/test_flash_attn.py (kvpacked x mha_type x head dim x
(seqlen_q, seqlen_k) x causal x local x alibi x softcap x dropout x deterministic), cut to a
representative subset at sizes the Triton interpreter affords, each case in cpu, emu (the kernels'
own source through the interpreter) and cuda (skipped without a GPU). Dropout cases build the
reference from the dropout pattern flash_attn_func returns (return_attn_probs), so they also prove
that pattern is the one the kernels applied.
"""
import itertools

import pytest
import torch

from fasttfm import bert_padding as BP
from fasttfm import flash_attn_interface as FI
from tests.oracle import assert_close_oracle
from tests.test_attention import BF16, F16, F32, alibi_bias, dense_mask, device_of, grad_floor, mode_ctx, ref_attention


def fa_ref(q, k, v, scale, causal, window, softcap, slopes, keep=None, p=0.0):
    """flash-attn's semantics on (B, S, H, D) tensors in their own dtype: (out (B, Sq, H, D), lse, probs)."""
    sq, sk = q.shape[1], k.shape[1]
    mask = dense_mask(sq, sk, causal, window)
    bias = None if slopes is None else alibi_bias(slopes, sq, sk)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    o, lse = ref_attention(qh, kh, vh, mask, scale, softcap, bias, drop=None if keep is None else (keep, p))
    return o.transpose(1, 2), lse


def fa_lse(lse):
    """flash-attn reports +inf (not -inf) as the LSE of a row that sees no key."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def ref_probs(q, k, scale, causal, window, softcap, slopes):
    """(B, Hq, Sq, Sk) float64 softmax probabilities (0 where masked)."""
    g = q.shape[2] // k.shape[2]
    qh, kh = q.double().transpose(1, 2), k.double().repeat_interleave(g, 2).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if slopes is not None:
        s = s + alibi_bias(slopes, q.shape[1], k.shape[1])
    s = s.masked_fill(~dense_mask(q.shape[1], k.shape[1], causal, window), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


# (kvpacked: "func" | "kv" | "qkv", dtype, mha_type, d, (sq, sk), causal, window, alibi, softcap, dropout_p, det)
GRID = [
    ("func", F16, "mha", 64, (113, 203), False, (-1, -1), False, 0.0, 0.0, False),
    ("func", BF16, "gqa", 32, (128, 128), True, (-1, -1), False, 0.0, 0.0, True),
    ("func", F16, "mqa", 40, (1, 147), True, (-1, -1), True, 0.0, 0.0, False),
    ("func", F16, "gqa", 64, (140, 75), True, (-1, -1), False, 0.0, 0.0, False),   # Sq > Sk: empty rows
    ("func", F32, "mha", 96, (97, 97), False, (24, 5), False, 0.0, 0.0, False),   # local
    ("func", F16, "mha", 64, (64, 128), True, (16, -1), True, 30.0, 0.0, True),   # causal local + alibi + softcap
    ("func", F16, "gqa", 32, (80, 96), False, (-1, -1), False, 0.0, 0.17, False),  # dropout
    ("func", BF16, "mha", 64, (65, 65), True, (20, -1), True, 0.0, 0.3, True),     # dropout + local + alibi
    ("kv", F16, "mqa", 128, (37, 113), False, (-1, -1), True, 0.0, 0.0, False),
    ("kv", F16, "gqa", 64, (96, 64), True, (-1, -1), False, 10.0, 0.0, True),
    ("qkv", F16, "mha", 64, (100, 100), True, (-1, -1), False, 0.0, 0.0, False),
    ("qkv", BF16, "mha", 256, (33, 33), False, (8, 8), False, 0.0, 0.1, False),
    ("func", F16, "mha", 8, (45, 70), True, (-1, -1), False, 0.0, 0.0, False),     # d < 16: zero-padded
]
_HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _case_id(c):
    return "-".join(str(x).replace("torch.", "").replace(" ", "") for x in c)


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_flash_attn_output(mode, case):
    kind, dtype, mha, d, (sq, sk), causal, window, alibi, cap, p, det = case
    dev = device_of(mode)
    b = 2
    hq, hkv = _HEADS[mha]
    scale = d ** -0.5
    q, do = (torch.randn(b, sq, hq, d, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, dtype=torch.float64).to(dtype) for _ in range(2))
    if cap:
        q = (q.double() * 4).to(dtype)
    slopes = torch.rand(b, hq) * 0.3 + 0.02 if alibi else None
    kw = dict(dropout_p=p, causal=causal, window_size=window, softcap=cap, deterministic=det, return_attn_probs=True,
              alibi_slopes=None if slopes is None else slopes.to(dev))
    with mode_ctx(mode, dtype):
        if kind == "qkv":
            qkv = torch.stack([q, k, v], 2).to(dev).requires_grad_()
            out, lse, s_dmask = FI.flash_attn_qkvpacked_func(qkv, **kw)
            (dqkv,) = torch.autograd.grad(out, (qkv,), do.to(dev))
            grads = dqkv.unbind(2)
        elif kind == "kv":
            qd = q.to(dev).requires_grad_()
            kv = torch.stack([k, v], 2).to(dev).requires_grad_()
            out, lse, s_dmask = FI.flash_attn_kvpacked_func(qd, kv, **kw)
            dq, dkv = torch.autograd.grad(out, (qd, kv), do.to(dev))
            grads = (dq, *dkv.unbind(2))
        else:
            qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
            out, lse, s_dmask = FI.flash_attn_func(qd, kd, vd, **kw)
            grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dev))
    assert out.shape == (b, sq, hq, d) and lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    assert not lse.requires_grad
    keep = None
    if p == 0:
        assert s_dmask is None  # flash-attn returns no S_dmask without dropout
    else:
        s_dmask = s_dmask.cpu()
        assert s_dmask.shape == (b, hq, sq, sk)
        keep = ~s_dmask.signbit()
        probs = ref_probs(q, k, scale, causal, window, cap, slopes)
        torch.testing.assert_close(s_dmask.abs().double(), probs, atol=2e-5, rtol=1e-4)
        rate = keep[probs > 0].float().mean().item()
        assert abs(rate - (1 - p)) < 0.05, f"keep rate {rate} for dropout_p={p}"
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, l_ = fa_ref(qq, kk, vv, scale, causal, window, cap, slopes, keep, p)
        refs[name] = (o, l_, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
    if sq > sk and causal:
        assert torch.isposinf(lse[..., :sq - sk]).all()  # rows with no visible key
    assert_close_oracle(lse, fa_lse(refs["64"][1]), fa_lse(refs["64"][1].float()), floor=1e-4, name="lse")
    for i, (name, g) in enumerate(zip(("dq", "dk", "dv"), grads)):
        assert_close_oracle(g, refs["64"][2 + i], refs["lowp"][2 + i], factor=3.0, name=name,
                            floor=grad_floor(dtype, refs["64"][2:]))


# -- varlen with padding round trips -------------------------------------------------------------
# (kind, dtype, mha_type, d, seqlen_q, seqlen_k, causal, window, alibi, softcap, dropout_p)
VARLEN_GRID = [
    ("varlen", F16, "gqa", 64, 70, 90, True, (-1, -1), False, 0.0, 0.0),
    ("varlen", BF16, "mha", 32, 64, 64, False, (12, 4), True, 0.0, 0.0),
    ("varlen", F16, "mqa", 64, 50, 100, False, (-1, -1), False, 20.0, 0.2),
    ("kv", F16, "gqa", 96, 40, 81, True, (-1, -1), True, 0.0, 0.0),
    ("qkv", F32, "mha", 64, 77, 77, True, (-1, -1), False, 0.0, 0.0),
    ("qkv", F16, "mha", 48, 60, 60, False, (-1, -1), False, 0.0, 0.15),
]


def _padding_mask(b, s, lens):
    return torch.arange(s)[None, :] < torch.tensor(lens)[:, None]


@pytest.mark.parametrize("mode", ["cpu", "emu", "cuda"])
@pytest.mark.parametrize("case", VARLEN_GRID, ids=_case_id)
def test_flash_attn_varlen_output(mode, case):
    """Padded batch -> unpad_input -> varlen function -> pad_input equals dense attention per sequence;
    gradients reach the padded inputs (zero at padding)."""
    kind, dtype, mha, d, sq, sk, causal, window, alibi, cap, p = case
    dev = device_of(mode)
    b = 3
    hq, hkv = _HEADS[mha]
    scale = d ** -0.5
    lens_q = [sq, 1, sq // 2 + 3]
    lens_k = lens_q if kind == "qkv" else [sk, sk // 3, 7]
    mq, mk = _padding_mask(b, sq, lens_q), _padding_mask(b, sk, lens_k)
    q, do = (torch.randn(b, sq, hq, d, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, dtype=torch.float64).to(dtype) for _ in range(2))
    slopes = torch.rand(b, hq) * 0.3 + 0.02 if alibi else None
    kw = dict(dropout_p=p, causal=causal, window_size=window, softcap=cap, return_attn_probs=True,
              alibi_slopes=None if slopes is None else slopes.to(dev))
    with mode_ctx(mode, dtype):
        qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
        q_u, idx_q, cu_q, max_q, used_q = BP.unpad_input(qd, mq.to(dev))
        assert used_q.tolist() == lens_q and max_q == max(lens_q) and cu_q.dtype == torch.int32
        if kind == "qkv":
            qkv_u, idx_k, cu_k, max_k, _ = BP.unpad_input(torch.stack([qd, kd, vd], 2), mq.to(dev))
            out_u, lse, s_dmask = FI.flash_attn_varlen_qkvpacked_func(qkv_u, cu_q, max_q, **kw)
        elif kind == "kv":
            kv_u, idx_k, cu_k, max_k, _ = BP.unpad_input(torch.stack([kd, vd], 2), mk.to(dev))
            out_u, lse, s_dmask = FI.flash_attn_varlen_kvpacked_func(q_u, kv_u, cu_q, cu_k, max_q, max_k, **kw)
        else:
            k_u, idx_k, cu_k, max_k, _ = BP.unpad_input(kd, mk.to(dev))
            v_u = BP.index_first_axis(vd.reshape(-1, hkv, d), idx_k)
            out_u, lse, s_dmask = FI.flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, **kw)
        out = BP.pad_input(out_u, idx_q, b, sq)
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dev))
    assert lse.shape == (hq, int(cu_q[-1])) and out.shape == (b, sq, hq, d)
    outs = {n: torch.zeros(b, sq, hq, d, dtype=dt) for n, dt in (("64", torch.float64), ("lowp", dtype))}
    gref = {n: [torch.zeros(t.shape, dtype=dt) for t in (q, k, v)]
            for n, dt in (("64", torch.float64), ("lowp", dtype))}
    for i in range(b):
        nq, nk = lens_q[i], lens_k[i]
        keep = None
        if p:
            keep = ~s_dmask[i:i + 1, :, :nq, :nk].cpu().signbit()
            assert (s_dmask[i, :, nq:].cpu() == 0).all() and (s_dmask[i, :, :, nk:].cpu() == 0).all()
        for n, dt in (("64", torch.float64), ("lowp", dtype)):
            qq, kk, vv = (t[i:i + 1, :m].to(dt).requires_grad_() for t, m in ((q, nq), (k, nk), (v, nk)))
            o, l_ = fa_ref(qq, kk, vv, scale, causal, window, cap, None if slopes is None else slopes[i:i + 1],
                           keep, p)
            outs[n][i, :nq] = o[0].detach()
            gs = torch.autograd.grad(o, (qq, kk, vv), do[i:i + 1, :nq].to(dt))
            for j, m in enumerate((nq, nk, nk)):
                gref[n][j][i, :m] = gs[j][0]
            if n == "64":
                start = int(cu_q[i])
                assert_close_oracle(lse[:, start:start + nq], fa_lse(l_[0]), fa_lse(l_[0].float()), floor=1e-4,
                                    name=f"lse[{i}]")
    assert_close_oracle(out, outs["64"], outs["lowp"], name="out")
    for j, name in enumerate(("dq", "dk", "dv")):
        assert_close_oracle(grads[j], gref["64"][j], gref["lowp"][j], factor=3.0, name=name,
                            floor=grad_floor(dtype, gref["64"]))


def _paged(k, cu, page, extra=3):
    """Scatter packed (total, H, D) keys into shuffled pages: (pages (num, page, H, D), block_table)."""
    lens = (cu[1:] - cu[:-1]).tolist()
    per = max(-(-n // page) for n in lens)
    num = len(lens) * per + extra
    perm = torch.randperm(num)
    pages = torch.full((num, page, *k.shape[1:]), float("nan"), dtype=k.dtype)
    table = perm[:len(lens) * per].reshape(len(lens), per).to(torch.int32)
    for b, n in enumerate(lens):
        for t in range(n):
            pages[table[b, t // page], t % page] = k[int(cu[b]) + t]
    return pages, table


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_varlen_paged_kv_equals_packed(mode):
    """flash_attn_varlen_func with block_table (K/V in shuffled pages) equals the packed call; a block table
    with one wrong page index does not."""
    lens_q, lens_k = [5, 33, 1], [40, 33, 70]
    cu_q = torch.tensor([0, 5, 38, 39], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 73, 143], dtype=torch.int32)
    q = torch.randn(39, 4, 32, dtype=F16)
    k, v = torch.randn(143, 2, 32, dtype=F16), torch.randn(143, 2, 32, dtype=F16)
    kp, table = _paged(k, cu_k, 16)
    vp, _ = _paged(v, cu_k, 16)
    vp = torch.full_like(vp, float("nan"))
    for b, n in enumerate(lens_k):  # the same layout for v
        for t in range(n):
            vp[table[b, t // 16], t % 16] = v[int(cu_k[b]) + t]
    with mode_ctx(mode, F16):
        ref = FI.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 70, causal=True)
        got = FI.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 33, 70, causal=True, block_table=table)
        bad_table = table.clone()
        bad_table[2, 1] = table[0, 1]
        bad = FI.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 33, 70, causal=True, block_table=bad_table)
    assert torch.equal(got, ref)
    assert not torch.allclose(bad.float(), ref.float(), atol=1e-2)


# -- bert_padding ------------------------------------------------------------------------------------
def test_bert_padding_round_trip_and_grads():
    b, s, h = 4, 9, 5
    lens = [9, 0, 3, 6]
    mask = _padding_mask(b, s, lens)
    x = torch.randn(b, s, h, 2, dtype=torch.float64, requires_grad=True)
    xu, idx, cu, max_s, used = BP.unpad_input(x, mask)
    assert xu.shape == (sum(lens), h, 2) and idx.dtype == torch.int64
    assert cu.tolist() == [0] + list(itertools.accumulate(lens)) and cu.dtype == torch.int32
    assert max_s == 9 and isinstance(max_s, int) and used.tolist() == lens and used.dtype == torch.int32
    back = BP.pad_input(xu, idx, b, s)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()
    (g,) = torch.autograd.grad((back * 3).sum(), (x,))
    assert torch.equal(g, mask[..., None, None].double().expand_as(g) * 3)
    # unused_mask: packed (counted in cu_seqlens / max_seqlen) but not in seqused
    unused = torch.zeros(b, s, dtype=torch.bool)
    unused[2, 3:5] = True
    xu2, idx2, cu2, max2, used2 = BP.unpad_input(x, mask, unused)
    assert cu2[-1] == sum(lens) + 2 and used2.tolist() == lens
    assert torch.equal(idx2, torch.nonzero((mask | unused).flatten()).flatten())
    # index_first_axis: gather along the first axis, gradient scatters back
    y = torch.randn(6, 3, requires_grad=True)
    sel = torch.tensor([4, 0, 4])
    (gy,) = torch.autograd.grad(BP.index_first_axis(y, sel).sum(), (y,))
    assert torch.equal(gy[:, 0], torch.tensor([1.0, 0, 0, 0, 2, 0]))
    with pytest.raises(ValueError, match="indices"):
        BP.index_first_axis(y, torch.tensor([[1]]))


# -- return values and argument checks -------------------------------------------------------------
def test_return_values_without_dropout_and_defaults():
    q, k, v = (torch.randn(1, 20, 2, 32) for _ in range(3))
    out = FI.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor)
    o2, lse, s = FI.flash_attn_func(q, k, v, return_attn_probs=True)
    assert s is None and torch.equal(out, o2) and lse.shape == (1, 2, 20)
    # negative window sides mean unbounded (flash-attn), softcap <= 0 means off
    torch.testing.assert_close(FI.flash_attn_func(q, k, v, window_size=(-7, -3), softcap=-1.0), out)
    # causal with Sq != Sk is bottom-right aligned: the last query sees every key
    q1 = q[:, -1:]
    torch.testing.assert_close(FI.flash_attn_func(q1, k, v, causal=True), FI.flash_attn_func(q1, k, v))


def test_bad_arguments_name_themselves():
    q, k, v = (torch.randn(1, 8, 2, 32) for _ in range(3))
    with pytest.raises(ValueError, match="dropout_p"):
        FI.flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="window_size"):
        FI.flash_attn_func(q, k, v, window_size=(3,))
    with pytest.raises(ValueError, match="deterministic"):
        FI.flash_attn_func(q, k, v, deterministic="yes")
    with pytest.raises(ValueError, match="head dim"):
        FI.flash_attn_func(*(torch.randn(1, 8, 2, 320) for _ in range(3)))
    with pytest.raises(ValueError, match="qkv"):
        FI.flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 2, 32))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    qv = q[0]
    with pytest.raises(ValueError, match="page size"):
        FI.flash_attn_varlen_func(qv, q, q, cu, cu, 8, 8, block_table=torch.zeros(1, 1, dtype=torch.int32))
    pages = torch.randn(3, 16, 2, 32)
    with pytest.raises(ValueError, match="block_table must be a torch.int32"):
        FI.flash_attn_varlen_func(qv, pages, pages, cu, cu, 8, 8, block_table=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="page indices outside"):
        FI.flash_attn_varlen_func(qv, pages, pages, cu, cu, 8, 8, block_table=torch.full((1, 1), 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        FI.flash_attn_varlen_func(qv, qv, qv, cu, cu, None, 8)


def test_alias_module():
    from fasttfm import flash_attn

    assert flash_attn.flash_attn_func is FI.flash_attn_func
    assert flash_attn.flash_attn_with_kvcache is FI.flash_attn_with_kvcache
    assert flash_attn.bert_padding.unpad_input is BP.unpad_input
