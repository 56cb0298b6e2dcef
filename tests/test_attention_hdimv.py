"""fasttfm.attention with a v head dim Dv different from the q/k head dim D (DeepSeek-V3 MLA: 192/128;
FlashAttention-3 allows it): output, LSE and every gradient vs the float64 reference, in cpu and emu
modes (emu: the Triton kernels through the interpreter), every dtype, D > Dv and D < Dv, block-padded
dims (40/24: BLOCK_D 64, BLOCK_DV 32), odd lengths, causal/window/chunk, GQA, key_padding_mask,
softcap + ALiBi, varlen, sm_90's TMA forward (interpreted), the SDPA, flash-attn and HF entry points,
the fake (meta) registration and the argument checks.

Reference: ``tests/test_attention_padding.py``'s dense fp64 attention with a mask written from the
definitions (it never assumes Dv == D). Tolerances: FlashAttention's relative oracle (tests/oracle.py).
"""
import pytest
import torch

from fasttfm.ops import attention as A
from tests.oracle import assert_close_oracle, require_gpu
from tests.test_attention import grad_floor, mode_ctx, sm90_tma  # noqa: F401 (fixture)
from tests.test_attention_padding import check_masked, make_kpm, ref_attention, ref_mask

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
MODES = ["cpu", "emu", "cuda"]


def _dev(mode):
    if mode == "cuda":
        require_gpu()
        return "cuda"
    return "cpu"


def check_hdimv(mode, dtype, b, hq, hkv, nq, nk, d, dv, **kw):
    """fasttfm.attention on q/k (.., D) and v (.., Dv) vs the fp64 reference: out (.., Dv), LSE, dq, dk, dv."""
    check_masked(mode, dtype, b, hq, hkv, nq, nk, d, dv=dv, **kw)


# (dtype, B, Hq, Hkv, Nq, Nk, D, Dv, keywords)
CASES = [
    (F16, 2, 2, 2, 37, 53, 48, 32, dict(causal=True)),
    (BF16, 1, 4, 2, 53, 37, 32, 48, dict(window=(9, 5), layout="bnhd")),   # D < Dv, GQA, Nq > Nk
    (F32, 1, 2, 1, 37, 53, 40, 24, dict()),                                # both dims block-padded, MQA
    (F16, 1, 2, 2, 53, 53, 24, 40, dict(causal=True, chunk=16)),
    (BF16, 3, 2, 1, 37, 53, 48, 32, dict(causal=True, kpm="right")),       # key_padding_mask
    (F16, 2, 2, 2, 37, 37, 40, 24, dict(kpm="empty_row", window=(12, -1))),
    (F16, 1, 2, 2, 37, 53, 48, 32, dict(softcap=20.0, slopes=True)),       # score modifiers
    (BF16, 1, 2, 1, 37, 45, 192, 128, dict(causal=True)),                  # MLA's dims (BLOCK_D 256)
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c[:8]))
def test_hdimv_vs_reference(mode, case):
    dtype, b, hq, hkv, nq, nk, d, dv, kw = case
    kw = dict(kw)
    if "kpm" in kw:
        kw["kpm"] = make_kpm(kw["kpm"], b, nk)
    if kw.pop("slopes", False):
        kw["slopes"] = torch.rand(hq, dtype=torch.float32) * 0.3
    check_hdimv(mode, dtype, b, hq, hkv, nq, nk, d, dv, **kw)


@pytest.mark.parametrize("case", [
    (F16, 2, 16, 2, 300, 300, 192, 128, dict(causal=True)),                # DeepSeek-V3 MLA dims, GQA
    (BF16, 1, 4, 4, 257, 513, 192, 128, dict(window=(100, 0))),
    (BF16, 2, 4, 2, 200, 333, 192, 128, dict(kpm="random", causal=True)),  # masked configs
    (F16, 1, 4, 2, 200, 200, 192, 128, dict(softcap=30.0, slopes=True)),   # modified configs
    (F16, 1, 4, 2, 129, 257, 64, 256, dict()),                             # D < Dv, bucket 256
    (F32, 1, 2, 1, 130, 70, 96, 40, dict(causal=True)),
], ids=["mla-causal-gqa", "mla-window", "mla-kpm", "mla-softcap-alibi", "d64v256", "fp32-d96v40"])
def test_hdimv_cuda_real_configs(case):
    """The real kernels with the configs the launchers pick by max(D, Dv) (GPU runners; skips without CUDA)."""
    test_hdimv_vs_reference("cuda", case)


@pytest.mark.parametrize("case", [
    (F16, 1, 2, 2, 37, 53, 48, 32, dict(causal=True)),
    (BF16, 2, 4, 2, 53, 37, 32, 48, dict(window=(9, 5))),
], ids=["d48v32-causal", "d32v48-gqa-window"])
def test_hdimv_tma_forward_interpreted(case, sm90_tma):
    """sm_90's forward loads V through a tensor descriptor of its own (n_k, Dv) shape: run by the
    interpreter (zero-fill past the dims, as TMA), checked like every other case."""
    dtype, b, hq, hkv, nq, nk, d, dv, kw = case
    check_hdimv("emu", dtype, b, hq, hkv, nq, nk, d, dv, **kw)
    assert sm90_tma and all(sm90_tma)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,d,dv,causal", [(F16, 48, 32, True), (BF16, 32, 48, False), (F32, 40, 24, True)])
def test_hdimv_varlen(mode, dtype, d, dv, causal):
    """Packed sequences (thd, GQA): each sequence vs its own fp64 reference; LSE (Hq, total_q)."""
    dev = _dev(mode)
    lq, lk = [37, 5, 20], [53, 5, 11]
    hq, hkv = 4, 2
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lq), hq, d, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(lk), hkv, d, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(lk), hkv, dv, dtype=torch.float64).to(dtype)
    do = torch.randn(sum(lq), hq, dv, dtype=torch.float64).to(dtype)
    qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
    with mode_ctx(mode, dtype):
        out, lse = A.attention(qd, kd, vd, causal=causal, cu_seqlens_q=cu_q.to(dev), cu_seqlens_k=cu_k.to(dev),
                               return_lse=True)
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dev))
    assert out.shape == (sum(lq), hq, dv)
    for i in range(len(lq)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        seq = [t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks), (do, qs))]
        mask = ref_mask(1, lq[i], lk[i], causal)
        refs = {}
        for name, dt in (("64", torch.float64), ("lowp", dtype)):
            qq, kk, vv = (t.to(dt).requires_grad_() for t in seq[:3])
            o, l_ = ref_attention(qq, kk, vv, mask, d ** -0.5)
            refs[name] = (o, l_, *torch.autograd.grad(o, (qq, kk, vv), seq[3].to(dt)))
        l32 = ref_attention(*(t.float() for t in seq[:3]), mask, d ** -0.5)[1]
        mine = [out[qs], grads[0][qs], grads[1][ks], grads[2][ks]]
        assert_close_oracle(mine[0].transpose(0, 1)[None], refs["64"][0], refs["lowp"][0], name=f"out[{i}]")
        assert_close_oracle(lse[:, qs][None], refs["64"][1], l32, floor=1e-4, name=f"lse[{i}]")
        for j, name in enumerate(("dq", "dk", "dv")):
            assert_close_oracle(mine[1 + j].transpose(0, 1)[None], refs["64"][2 + j], refs["lowp"][2 + j],
                                factor=3.0, name=f"{name}[{i}]", floor=grad_floor(dtype, refs["64"][2:]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_hdimv_sdpa_matches_torch(mode, dtype, monkeypatch):
    """fasttfm.scaled_dot_product_attention with E != Ev (SDPA allows it) runs the kernels (no fallback)
    and matches torch's SDPA: top-left is_causal with L != S, GQA, the default scale E ** -0.5."""
    dev = _dev(mode)
    b, hq, hkv, L, S, e, ev = 2, 4, 2, 37, 53, 48, 24
    q = torch.randn(b, hq, L, e, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, S, e, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, S, ev, dtype=torch.float64).to(dtype)
    do = torch.randn(b, hq, L, ev, dtype=torch.float64).to(dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o = sdpa(qq, kk, vv, is_causal=True, enable_gqa=True)
        refs[name] = (o, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    qd, kd, vd = (t.to(dev).requires_grad_() for t in (q, k, v))
    called, orig = [], A.flash_sdpa
    monkeypatch.setattr(A, "flash_sdpa", lambda *a, **kw: called.append(1) or orig(*a, **kw))
    with mode_ctx(mode, dtype):
        out = A.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dev))
    assert called, "E != Ev must run fasttfm's kernels"
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
    for i, (name, g) in enumerate(zip(("dq", "dk", "dv"), grads)):
        assert_close_oracle(g, refs["64"][1 + i], refs["lowp"][1 + i], factor=3.0, name=name,
                            floor=grad_floor(dtype, refs["64"][1:]))


@pytest.mark.parametrize("mode", ["cpu", "emu"])
@pytest.mark.parametrize("d,dv", [(48, 8), (8, 40)])
def test_hdimv_flash_attn_func(mode, d, dv):
    """flash_attn_func pads q/k and v to 16 separately (a zero column changes no dot product) and
    returns out with v's head dim: vs the fp64 reference, forward and gradients."""
    from fasttfm import flash_attn_interface as FI

    b, n, m, hq, hkv = 2, 37, 53, 4, 2
    q = torch.randn(b, n, hq, d, dtype=torch.float64).to(F16)
    k = torch.randn(b, m, hkv, d, dtype=torch.float64).to(F16)
    v = torch.randn(b, m, hkv, dv, dtype=torch.float64).to(F16)
    do = torch.randn(b, n, hq, dv, dtype=torch.float64).to(F16)
    mask = ref_mask(b, n, m, True)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", F16)):
        qq, kk, vv = (t.to(dt).transpose(1, 2).requires_grad_() for t in (q, k, v))
        o, _ = ref_attention(qq, kk, vv, mask, d ** -0.5)
        refs[name] = (o.transpose(1, 2), *(g.transpose(1, 2) for g in
                                           torch.autograd.grad(o, (qq, kk, vv), do.to(dt).transpose(1, 2))))
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    with mode_ctx(mode, F16):
        out = FI.flash_attn_func(qd, kd, vd, causal=True)
        grads = torch.autograd.grad(out, (qd, kd, vd), do)
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], name="out")
    for i, (name, g) in enumerate(zip(("dq", "dk", "dv"), grads)):
        assert_close_oracle(g, refs["64"][1 + i], refs["lowp"][1 + i], factor=3.0, name=name,
                            floor=grad_floor(F16, refs["64"][1:]))


@pytest.mark.parametrize("mode", ["cpu", "emu"])
def test_hdimv_flash_attn_varlen_paged_equals_packed(mode):
    """flash_attn_varlen_func with block_table and v pages of their own head dim gathers the same packed
    K/V as the caller's: bit-identical to the packed call (itself checked against fp64 above)."""
    from fasttfm import flash_attn_interface as FI

    lens_k, page = [40, 33, 70], 16
    cu_q = torch.tensor([0, 5, 38, 39], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 73, 143], dtype=torch.int32)
    q, k, v = _t(39, 4, 48), _t(143, 2, 48), _t(143, 2, 32)
    per = max(-(-n // page) for n in lens_k)
    table = torch.randperm(len(lens_k) * per + 2)[:len(lens_k) * per].reshape(len(lens_k), per).to(torch.int32)
    kp = torch.full((len(lens_k) * per + 2, page, 2, 48), float("nan"), dtype=F16)
    vp = torch.full((len(lens_k) * per + 2, page, 2, 32), float("nan"), dtype=F16)
    for b, n in enumerate(lens_k):
        for t in range(n):
            kp[table[b, t // page], t % page] = k[int(cu_k[b]) + t]
            vp[table[b, t // page], t % page] = v[int(cu_k[b]) + t]
    with mode_ctx(mode, F16):
        ref = FI.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 70, causal=True)
        got = FI.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 33, 70, causal=True, block_table=table)
    assert got.shape == (39, 4, 32) and torch.equal(got, ref)


def test_hdimv_fake_registration_shapes():
    """The fake (meta) implementations give out (.., Dv) and dV shaped like v (torch.compile traces
    with them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 37, 4, 48, dtype=F16), torch.empty(2, 53, 2, 48, dtype=F16)
        v = torch.empty(2, 53, 2, 32, dtype=F16)
        out, lse = torch.ops.fasttfm.attn_fwd(q, k, v, None, None, 37, 53, 0.1, A.UNBOUNDED, 0, 0, "bnhd")
        grads = torch.ops.fasttfm.attn_bwd(torch.empty_like(out), q, k, v, out, lse, None, None, None, 37, 53, 0.1,
                                           A.UNBOUNDED, 0, 0, "bnhd")
    assert tuple(out.shape) == (2, 37, 4, 32) and tuple(lse.shape) == (2, 4, 37)
    assert [tuple(g.shape) for g in grads] == [(2, 37, 4, 48), (2, 53, 2, 48), (2, 53, 2, 32)]


def _t(*shape):
    return torch.randn(*shape, dtype=F16)


@pytest.mark.parametrize("call,match", [
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 48), _t(1, 2, 8, 32)),
     r"q and k must have the same head dim .*q \(1, 2, 8, 32\), k \(1, 2, 8, 48\), v \(1, 2, 8, 32\)"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 8)),
     r"head dims must be in 16\.\.256 \(q/k: 32, v: 8\)"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 2, 8, 300)),
     r"head dims must be in 16\.\.256 \(q/k: 32, v: 300\)"),
    (lambda: A.attention(_t(1, 2, 8, 32), _t(1, 2, 8, 32), _t(1, 1, 8, 48)),
     r"k and v must have the same shape except the head dim .*v \(1, 1, 8, 48\)"),
])
def test_hdimv_bad_shapes_name_the_tensors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
