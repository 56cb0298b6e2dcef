"""fasttfm.mha.MultiheadAttention against torch.nn.MultiheadAttention (same weights, same state_dict)."""
import pytest
import torch
from torch import nn

from fasttfm._env import emulate
from fasttfm.mha import MultiheadAttention


def _pair(**kw):
    torch_mha = nn.MultiheadAttention(**kw)
    ours = MultiheadAttention(**kw)
    ours.load_state_dict(torch_mha.state_dict())
    assert list(ours.state_dict()) == list(torch_mha.state_dict())
    return torch_mha, ours


@pytest.mark.parametrize("emu", [False, True])
@pytest.mark.parametrize("batch_first,kdim", [(True, None), (False, None), (True, 24)])
@pytest.mark.parametrize("masks", ["none", "causal", "kpm", "attn_bool", "both"])
def test_mha_matches_torch(emu, batch_first, kdim, masks):
    e, h, n, L = 64, 4, 2, 20
    S = L if masks in ("causal",) else 23
    torch_mha, ours = _pair(embed_dim=e, num_heads=h, batch_first=batch_first, kdim=kdim, vdim=kdim)
    shape = (lambda t: (n, t, e)) if batch_first else (lambda t: (t, n, e))
    kv_e = kdim or e
    q = torch.randn(*shape(L), requires_grad=True)
    kv = torch.randn(*(shape(S)[:-1] + (kv_e,)))
    if masks == "causal" and kdim is None:
        kv = q
    kw = dict(need_weights=False)
    if masks == "causal":
        kw.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(L), is_causal=True)
    if masks in ("kpm", "both"):
        kpm = torch.zeros(n, S, dtype=torch.bool)
        kpm[0, -5:] = True
        kw["key_padding_mask"] = kpm
    if masks in ("attn_bool", "both"):
        am = torch.rand(L, S) > 0.7
        am[:, 0] = False
        kw["attn_mask"] = am
    ref, _ = torch_mha(q, kv, kv, **kw)
    with emulate(emu):
        out, w = ours(q, kv, kv, **kw)
    assert w is None
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, [q, *torch_mha.parameters()], g, allow_unused=True)
    with emulate(emu):
        out_g = torch.autograd.grad(out, [q, *ours.parameters()], g, allow_unused=True)
    for a, b in zip(out_g, ref_g):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_mha_need_weights_falls_back_to_torch():
    torch_mha, ours = _pair(embed_dim=32, num_heads=2, batch_first=True)
    x = torch.randn(2, 7, 32)
    ref = torch_mha(x, x, x)
    out = ours(x, x, x)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("emu", [False, True])
@pytest.mark.parametrize("kind", ["left", "right", "all_padded", "causal_hint", "float"])
def test_mha_key_padding_mask_kernel_path(emu, kind, monkeypatch):
    """Boolean key_padding_mask (True = ignore) runs fasttfm's kernel with the inverted mask, no dense
    mask (torch's SDPA is never called), and matches torch's module (training mode, as in torch a
    fully padded row gives 0 before the output projection); a float (additive) mask and
    attn_mask combinations stay on the merged-mask path."""
    import torch.nn.functional as F

    e, h, n, L = 64, 4, 3, 21
    torch_mha, ours = _pair(embed_dim=e, num_heads=h, batch_first=True)
    q = torch.randn(n, L, e, requires_grad=True)
    lens = torch.tensor([L, 13, 4])
    j = torch.arange(L)[None, :]
    kpm = j >= lens[:, None] if kind != "left" else j < (L - lens)[:, None]
    if kind == "all_padded":
        kpm[-1] = True
    kw = dict(need_weights=False, key_padding_mask=kpm)
    if kind == "causal_hint":  # boolean like the padding mask (True = masked)
        kw.update(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True)
    if kind == "float":
        kw["key_padding_mask"] = torch.zeros(n, L).masked_fill(kpm, float("-inf"))
    ref, _ = torch_mha(q, q, q, **kw)
    calls = {"sdpa": 0}
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.__setitem__("sdpa", calls["sdpa"] + 1)
                        or real(*a, **k))
    with emulate(emu):
        out, _ = ours(q, q, q, **kw)
    assert calls["sdpa"] == (1 if kind == "float" else 0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, [q, *torch_mha.parameters()], g)
    with emulate(emu):
        out_g = torch.autograd.grad(out, [q, *ours.parameters()], g)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
