"""fasttfm.hf_masks: HF's mask requests -> Routes, checked against HF's own dense masks.

For each request HF's masking_utils can make (causal, sliding, bidirectional, bidirectional
sliding, packed; with padding; fresh, decode, chunked prefill, DynamicCache sliding layers,
StaticCache with its device-tensor offset, static sliding layers, cross-attention), the Route's
``dense()`` is HF's sdpa_mask, and fasttfm.attention with the Route's arguments equals attention
with that dense mask (fp32, GQA, fresh random inputs, forward and gradients). Patterns the kernels
do not take get HF's dense mask with a reason that attention_forward counts."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttfm import hf  # noqa: E402
from fasttfm.hf_masks import Route, mask_interface, masking_utils  # noqa: E402
from fasttfm.ops.attention import attention  # noqa: E402

B, HQ, HKV, D = 2, 4, 2, 16
mu = masking_utils()


def padding(lengths, total, left):
    """(B, total) bool padding mask: row b has lengths[b] tokens, at the right or left end."""
    idx = torch.arange(total)[None, :]
    n = torch.tensor(lengths)[:, None]
    return idx >= total - n if left else idx < n


def _sliding(w):
    return mu.sliding_window_causal_mask_function(w)


def _packed(q_len):
    ids = torch.stack([torch.arange(q_len) // 4, (torch.arange(q_len) >= 3).long() + (torch.arange(q_len) >= 7)])
    return ids


# name -> (mask_function, q_length, kv_length, q_offset, kv_offset, attention_mask)
CASES = {
    "causal": (mu.causal_mask_function, 9, 9, 0, 0, None),
    "causal-rightpad": (mu.causal_mask_function, 9, 9, 0, 0, padding([9, 6], 9, left=False)),
    "causal-leftpad": (mu.causal_mask_function, 9, 9, 0, 0, padding([9, 5], 9, left=True)),
    "causal-holes": (mu.causal_mask_function, 9, 9, 0, 0, torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1]] * 2).bool()),
    "sliding": (_sliding(4), 11, 11, 0, 0, None),
    "sliding-leftpad": (_sliding(4), 11, 11, 0, 0, padding([11, 6], 11, left=True)),
    "decode-leftpad": (mu.causal_mask_function, 1, 12, 11, 0, padding([12, 7], 12, left=True)),
    "chunked-prefill": (mu.causal_mask_function, 5, 12, 7, 0, padding([12, 9], 12, left=True)),
    # StaticCache: kv_length = max_cache_len, q_offset its cumulative length (a device tensor)
    "static-prefill": (mu.causal_mask_function, 6, 16, torch.tensor(0), 0, padding([6, 4], 6, left=True)),
    "static-decode": (mu.causal_mask_function, 1, 16, torch.tensor(8), 0, padding([9, 5], 9, left=True)),
    # DynamicCache sliding layer, full: kv_offset = seen - W + 1, kv_length = W - 1 + q
    "sliding-dynamic-decode": (_sliding(4), 1, 4, 10, 7, padding([11, 3], 11, left=True)),
    "sliding-dynamic-chunk": (_sliding(4), 3, 6, 10, 7, padding([13, 4], 13, left=True)),
    # StaticSlidingWindowLayer not yet full: kv_length = W (static size), q_offset an int
    "sliding-static-early": (_sliding(6), 1, 6, 2, 0, padding([3, 2], 3, left=True)),
    "bidirectional-pad": (mu.bidirectional_mask_function, 9, 9, 0, 0, padding([9, 4], 9, left=False)),
    "bidirectional-sliding": (mu.sliding_window_bidirectional_mask_function(3), 11, 11, 0, 0,
                              padding([11, 8], 11, left=False)),
    "cross-attention": (mu.bidirectional_mask_function, 5, 9, 0, 0, padding([9, 6], 9, left=False)),
    "packed": (mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(_packed(10))), 10, 10,
               0, 0, None),
    "packed-sliding": (mu.and_masks(_sliding(3), mu.packed_sequence_mask_function(_packed(10))), 10, 10, 0, 0,
                       None),
}


def request(case):
    fn, q_len, kv_len, q_off, kv_off, am = CASES[case]
    return dict(batch_size=B, q_length=q_len, kv_length=kv_len, q_offset=q_off, kv_offset=kv_off,
                mask_function=fn, attention_mask=am, allow_is_causal_skip=True, dtype=torch.float32,
                device=torch.device("cpu"), config=None, use_vmap=False,
                local_size=None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_route_equals_hf_dense_mask(case):
    req = request(case)
    route = mask_interface(**req)
    assert isinstance(route, Route), route
    hf_mask = mu.sdpa_mask(**{**req, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})
    assert torch.equal(route.dense(), hf_mask)
    q_len, kv_len = req["q_length"], req["kv_length"]
    q = torch.randn(B, q_len, HQ, D, dtype=torch.float64).float().requires_grad_(True)
    k = torch.randn(B, kv_len, HKV, D, dtype=torch.float64).float().requires_grad_(True)
    v = torch.randn(B, kv_len, HKV, D, dtype=torch.float64).float().requires_grad_(True)
    out = attention(q, k, v, layout="bnhd", **route.kernel_kwargs())
    # reference: explicit scores in float64 with HF's mask; rows with no visible key give 0
    q64, k64, v64 = (t.detach().double().transpose(1, 2) for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(HQ // HKV, 1), v64.repeat_interleave(HQ // HKV, 1)
    s = (q64 @ k64.transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(~hf_mask, float("-inf"))
    ref = (torch.softmax(s, -1).nan_to_num(0.0) @ v64).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # gradients against the same math in autograd
    dout = torch.randn_like(out)
    out.backward(dout)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    kk, vv = (t.transpose(1, 2).repeat_interleave(HQ // HKV, 1) for t in (kr, vr))
    sr = (qr.transpose(1, 2) @ kk.transpose(-1, -2)) * D ** -0.5
    visible = hf_mask.any(-1, keepdim=True)
    p = torch.softmax(sr.masked_fill(~hf_mask, float("-inf")).masked_fill(~visible, 0.0), -1) * visible
    (p @ vv).transpose(1, 2).backward(dout)
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_route_alignment_is_device_side_for_a_static_cache():
    """StaticCache's offset tensor becomes seqused_k = offset + Sq (no .item()); the offset is read
    when the mask is made (the cache advances it in place before the attention call)."""
    offset = torch.tensor(8)
    route = mask_interface(**{**request("static-decode"), "q_offset": offset})
    offset.add_(1)  # what StaticLayer.update does between mask creation and attention
    assert route.seqused_k.dtype == torch.int32 and route.seqused_k.tolist() == [9, 9]
    assert route.dense()[0, 0, 0].nonzero().flatten().tolist() == list(range(9))


@pytest.mark.parametrize("name,fn,reason", [
    ("or_masks", mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function), "or_masks"),
    ("chunked", mu.chunked_causal_mask_function(4, torch.zeros(B, dtype=torch.long)), "chunked"),
    ("model's own", mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 2), "model's own"),
])
def test_unrecognised_patterns_stay_dense_and_are_reported(name, fn, reason):
    req = {**request("causal-leftpad"), "mask_function": fn}
    mask = mask_interface(**req)
    assert isinstance(mask, torch.Tensor) and reason in mask._fasttfm_reason
    hf_mask = mu.sdpa_mask(**{**req, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})
    assert torch.equal(mask, hf_mask)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(B, HQ, 9, D), torch.randn(B, HKV, 9, D), torch.randn(B, HKV, 9, D)
    out, _ = hf.attention_forward(module, q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=hf_mask, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    (counted,) = hf.fallback_counts(module)
    assert counted.startswith("dense mask: ") and reason in counted


def test_route_mismatch_falls_back_with_the_reason():
    """A Route made for other sizes (a model slicing k/v after the mask) never reaches the kernel."""
    route = mask_interface(**request("causal-leftpad"))
    module = torch.nn.Module()
    q, k, v = torch.randn(B, HQ, 9, D), torch.randn(B, HKV, 7, D), torch.randn(B, HKV, 7, D)
    with pytest.raises(RuntimeError):  # HF's sdpa with a (B,1,9,9) mask on 7 keys: shapes disagree
        hf.attention_forward(module, q, k, v, route)
    (counted,) = hf.fallback_counts(module)
    assert "the mask was made for Sq=9, Skv=9" in counted


def test_a_route_used_as_a_tensor_becomes_the_dense_mask():
    """Models that index, convert or combine the mask before attention get HF's dense mask (and
    keep the exact dense path, counted with the reason); shape/dtype/ndim need no dense mask."""
    req = request("sliding-leftpad")
    route = mask_interface(**req)
    dense = route.dense()
    assert route.shape == dense.shape and route.dtype == dense.dtype and route.ndim == 4 == route.dim()
    assert route.contiguous() is route and route.size(-1) == 11
    for got, want in ((route[:, :, :, :5], dense[:, :, :, :5]), (route.to(torch.float32), dense.float()),
                      (torch.where(route, 0.0, -1.0), torch.where(dense, 0.0, -1.0)), (~route, ~dense),
                      (route & dense, dense), (dense | route, dense)):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    sliced = route[:, :, :, :]
    assert "used the mask as a tensor (indexing)" in sliced._fasttfm_reason
    module = torch.nn.Module()
    q, k, v = torch.randn(B, HQ, 11, D), torch.randn(B, HKV, 11, D), torch.randn(B, HKV, 11, D)
    out, _ = hf.attention_forward(module, q, k, v, sliced)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2).nan_to_num(0.0))
    (counted,) = hf.fallback_counts(module)
    assert "used the mask as a tensor (indexing)" in counted
