"""bf16 in emulate mode through the PUBLIC API, with no test-only patch (issue 16 item 2).

Triton's interpreter alone computes on raw bf16 bits (a (1, 2, 8, 16) SDPA gave |out| ~8e8).
fasttfm's interpreted launches make bf16 arithmetic correct for the duration of each launch
(``kernels/_interp_bf16.py``). These tests call ``fasttfm.attention`` /
``fasttfm.scaled_dot_product_attention`` / ``fasttfm.attention_with_kvcache`` exactly as a user
would, with ``fasttfm.emulate(True)`` or ``FASTTFM_EMULATE=1``, so every Triton kernel runs in
bf16 (forward, backward preprocess, dK/dV, dQ, decode partial + combine) and is compared with a
float64 reference through FlashAttention's relative oracle. They also check that the fix is not
left installed after the launch.
"""
import contextlib

import pytest
import torch

import fasttfm
from tests.oracle import assert_close_oracle
from tests.test_attention import dense_mask, grad_floor, ref_attention

BF16 = torch.bfloat16


@pytest.fixture(params=["context", "env"])
def emulated(request, monkeypatch):
    """Emulation switched on the two public ways: ``fasttfm.emulate(True)`` or FASTTFM_EMULATE=1."""
    if request.param == "env":
        monkeypatch.setenv("FASTTFM_EMULATE", "1")
        fasttfm.set_emulate(None)  # this thread follows the environment
        assert fasttfm.emulate_enabled()
        yield contextlib.nullcontext
    else:
        yield lambda: fasttfm.emulate(True)


def _interpreter_methods():
    from triton.runtime import interpreter as ti

    return ({n: ti.InterpreterBuilder.__dict__[n] for n in ("create_dot", "cast_impl", "binary_op", "unary_op")},
            {n: ti.ReduceOps.__dict__[n] for n in ("sum", "min_max")})


@pytest.fixture(autouse=True)
def _fix_not_left_installed():
    """The interpreter's methods are the same objects after fasttfm's launches as before."""
    before = _interpreter_methods()
    yield
    assert _interpreter_methods() == before, "the bf16 fix must not outlive fasttfm's launch"


# (B, Hq, Hkv, Nq, Nk, D, kwargs): GQA + causal bottom-right, sliding window + softcap, full.
CASES = [
    (1, 4, 2, 70, 90, 64, dict(causal=True)),
    (1, 2, 2, 65, 65, 32, dict(window=(20, 5), softcap=8.0)),
    (2, 2, 1, 33, 47, 48, dict()),
]


@pytest.mark.parametrize("case", CASES, ids=["gqa-causal", "window-softcap", "full-d48"])
def test_attention_bf16_emulated_public(case, emulated):
    b, hq, hkv, nq, nk, d, kw = case
    q64, do64 = torch.randn(b, hq, nq, d, dtype=torch.float64), torch.randn(b, hq, nq, d, dtype=torch.float64)
    k64, v64 = (torch.randn(b, hkv, nk, d, dtype=torch.float64) for _ in range(2))
    q, k, v, do = (t.to(BF16) for t in (q64, k64, v64, do64))
    mask = dense_mask(nq, nk, kw.get("causal", False), kw.get("window", (-1, -1)))
    scale = d ** -0.5
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", BF16)):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        o, lse = ref_attention(qq, kk, vv, mask, scale, softcap=kw.get("softcap", 0.0))
        refs[name] = (o, lse, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt)))
    lse32 = ref_attention(q.float(), k.float(), v.float(), mask, scale, softcap=kw.get("softcap", 0.0))[1]

    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    with emulated():
        out, lse = fasttfm.attention(qd, kd, vd, return_lse=True, **kw)
        dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), do)
    assert out.dtype == BF16 and dq.dtype == BF16
    assert_close_oracle(out, refs["64"][0], refs["lowp"][0], factor=2.0, name="out")
    assert_close_oracle(lse, refs["64"][1], lse32, factor=2.0, floor=1e-4, name="lse")
    floor = grad_floor(BF16, refs["64"][2:])
    for i, (name, g) in enumerate((("dq", dq), ("dk", dk), ("dv", dv))):
        assert_close_oracle(g, refs["64"][2 + i], refs["lowp"][2 + i], factor=3.0, floor=floor, name=name)


def test_sdpa_bf16_emulated_issue_repro(emulated):
    """The reported case: a (1, 2, 8, 16) bf16 SDPA under emulation (was |out| ~8e8)."""
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64) for _ in range(3))
    ref64 = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    lowp = torch.nn.functional.scaled_dot_product_attention(*(t.to(BF16) for t in (q, k, v)))
    with emulated():
        out = fasttfm.scaled_dot_product_attention(*(t.to(BF16) for t in (q, k, v)))
    assert_close_oracle(out, ref64, lowp, factor=2.0, name="sdpa out")


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_bf16_emulated_public(splits, emulated):
    """attention_with_kvcache in bf16: append 2 new tokens, causal, GQA; split-K runs the combine."""
    b, hq, hkv, d, s_max, lens, n_new = 2, 4, 2, 64, 160, [120, 9], 2
    kc = torch.full((b, s_max, hkv, d), float("nan"), dtype=BF16)
    vc = kc.clone()
    for i, n in enumerate(lens):
        kc[i, :n], vc[i, :n] = torch.randn(n, hkv, d).to(BF16), torch.randn(n, hkv, d).to(BF16)
    q = torch.randn(b, n_new, hq, d).to(BF16)
    kn, vn = torch.randn(b, n_new, hkv, d).to(BF16), torch.randn(b, n_new, hkv, d).to(BF16)
    scale = d ** -0.5

    def ref(dt):
        outs, lses = [], []
        for i, n in enumerate(lens):
            kk = torch.cat([kc[i, :n], kn[i]]).to(dt).transpose(0, 1)[None]
            vv = torch.cat([vc[i, :n], vn[i]]).to(dt).transpose(0, 1)[None]
            o, l_ = ref_attention(q[i:i + 1].to(dt).transpose(1, 2), kk, vv, dense_mask(n_new, n + n_new, True), scale)
            outs.append(o.transpose(1, 2))
            lses.append(l_)
        return torch.cat(outs), torch.cat(lses)

    r64, rlp, r32 = ref(torch.float64), ref(BF16), ref(torch.float32)
    seq = torch.tensor(lens, dtype=torch.int32)
    with torch.no_grad(), emulated():
        out, lse = fasttfm.attention_with_kvcache(q, kc, vc, seq, kn, vn, causal=True, num_splits=splits,
                                                  return_lse=True)
    for i, n in enumerate(lens):  # the append wrote the new rows in bf16, bit for bit
        assert torch.equal(kc[i, n:n + n_new], kn[i]) and torch.equal(vc[i, n:n + n_new], vn[i])
    assert_close_oracle(out, r64[0], rlp[0], factor=2.0, name="decode out")
    assert_close_oracle(lse, r64[1], r32[1], factor=2.0, floor=1e-4, name="decode lse")
