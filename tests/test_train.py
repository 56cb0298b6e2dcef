"""The GPT model, data pipeline and training loop (fasttfm/model.py, data.py, train.py).

Tiny models and a few steps each, so the file runs in about a minute on two busy cores.
"""
import csv
import os

import pytest
import torch

import fasttfm
from fasttfm import _ext
from fasttfm.data import DataCursor, PackedWindows, Tokenizer, load_corpus
from fasttfm.model import GPT, GPTConfig, attention_available
from fasttfm.train import CheckpointError, load_checkpoint, preset, save_checkpoint, train

HAVE_ATTENTION, ATTENTION_ERROR = attention_available()
needs_attention = pytest.mark.skipif(
    not HAVE_ATTENTION, reason=f"fasttfm.ops.attention does not import ({ATTENTION_ERROR}): "
                               "the fasttfm-kernel model cannot be built")
KERNELS = "fasttfm" if HAVE_ATTENTION else "torch"


def tiny(tmp_path, name="run", **overrides):
    # one thread: tiny ops on 2 busy cores run several times faster without OpenMP hand-offs
    kw = dict(out_dir=str(tmp_path / name), quiet=True, sample_tokens=0, tensorboard=False, threads=1)
    kw.update(overrides)
    return preset("tiny", **kw)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- data ----------------------------------------------------------------------------------------
def test_tokenizers_roundtrip_and_state():
    text = "Hello, wörld!\nline two"
    char = Tokenizer.build("char", [text])
    assert char.vocab_size == len(set(text))
    ids = char.encode(text)
    assert ids.dtype == torch.int64 and char.decode(ids) == text
    again = Tokenizer.from_state(char.state_dict())
    assert torch.equal(again.encode(text), ids)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        char.encode("xyz")
    byte = Tokenizer.build("byte", [text])
    assert byte.vocab_size == 256 and byte.decode(byte.encode(text)) == text


def test_corpus_split_and_wikitext_dir(tmp_path):
    corpus = load_corpus("shakespeare")
    assert corpus["train"].startswith("First Citizen:") and len(corpus["valid"]) > 100_000
    assert load_corpus("shakespeare") == corpus                       # deterministic split
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 10)
    c = load_corpus(str(f), val_fraction=0.2)
    assert len(c["train"]) == 80 and c["train"] + c["valid"] == "abcdefghij" * 10
    d = tmp_path / "wikitext-2"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"wiki.{split}.tokens").write_text(f" = {split} = \n text of {split} \n" * 20)
    c = load_corpus(str(d))
    assert sorted(c) == ["test", "train", "valid"] and "text of valid" in c["valid"]
    (d / "wiki.valid.tokens").unlink()
    with pytest.raises(ValueError, match="needs train and valid"):
        load_corpus(str(d))
    with pytest.raises(FileNotFoundError, match="neither a bundled corpus"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_packed_windows_and_cursor():
    tokens = torch.arange(101)
    w = PackedWindows(tokens, seq_len=10)
    assert w.n == 10
    x, y = w.batch(torch.tensor([0, 3]))
    assert torch.equal(x[1], torch.arange(30, 40)) and torch.equal(y[1], torch.arange(31, 41))
    a, b = DataCursor(w.n, seed=5), DataCursor(w.n, seed=5)
    first = torch.cat([a.take(4), a.take(4)])
    assert sorted(first.tolist()) == sorted(set(first.tolist()))     # no repeats inside an epoch
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.take(4), b.take(4)) and a.epoch == 1          # remainder 2 < 4 skipped
    with pytest.raises(ValueError, match="fewer than seq_len"):
        PackedWindows(torch.arange(5), seq_len=10, name="valid")


# -- model ---------------------------------------------------------------------------------------
def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"n_head \(4\) must divide d_model \(30\)"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match=r"n_kv_head \(3\) must divide n_head \(4\)"):
        GPTConfig(d_model=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="kernels must be one of"):
        GPT(GPTConfig(), kernels="cuda")
    model = GPT(GPTConfig(vocab_size=10, n_layer=1, n_head=2, d_model=32, max_seq_len=8), kernels="torch")
    with pytest.raises(ValueError, match="sequence length 9 is longer than max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"seq_len \(64\) is longer than max_seq_len \(32\)"):
        train(tiny(tmp_path, seq_len=64))
    if HAVE_ATTENTION:
        with pytest.raises(ValueError, match="head dim d_model/n_head = 8 must be in 16..256"):
            GPT(GPTConfig(d_model=32, n_head=4), kernels="fasttfm")


MODEL_VARIANTS = [
    dict(),
    dict(norm="rmsnorm", positions="rope", attention="sliding", window=5, n_kv_head=1),
    dict(positions="sinusoidal", attention="chunked", chunk_size=8, n_head=4, n_kv_head=2, d_model=64, bias=False),
]


def _run_steps(model, batches, lr=1e-2):
    """Losses of a few AdamW steps on fixed batches (no data pipeline: a direct check of the kernels)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tiny_batches(cfg, n, batch=2, seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = seq or cfg.max_seq_len
    return [(torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
             torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)) for _ in range(n)]


@needs_attention
@pytest.mark.parametrize("variant", range(len(MODEL_VARIANTS)))
def test_fasttfm_and_torch_kernels_same_losses(tmp_path, variant):
    kw = MODEL_VARIANTS[variant]
    results = {}
    for kernels in ("fasttfm", "torch"):
        cfg = tiny(tmp_path, name=kernels, kernels=kernels, max_steps=5, eval_interval=0, save=False, **kw)
        results[kernels] = train(cfg)
    a, b = results["fasttfm"], results["torch"]
    assert a["model"].state_dict().keys() == b["model"].state_dict().keys()
    la, lb = [a["losses"][s] for s in range(1, 6)], [b["losses"][s] for s in range(1, 6)]
    print("fasttfm", la, "\ntorch  ", lb)
    assert max(abs(p - q) for p, q in zip(la, lb)) < 1e-5, (la, lb)
    assert abs(a["val"][-1][1] - b["val"][-1][1]) < 1e-5
    # the trained models compute the same function (parameters are not compared one by one: the key
    # bias has an exactly-zero true gradient, so Adam turns rounding noise into +-lr steps there)
    x = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(a["model"](x)[0], b["model"](x)[0], atol=1e-4, rtol=1e-4)


def _as_torch_norms(model):
    # fasttfm.nn.LayerNorm/RMSNorm subclass torch's: the same parameters, torch's forward
    for m in model.modules():
        if isinstance(m, fasttfm.nn.LayerNorm):
            m.__class__ = torch.nn.LayerNorm
        elif isinstance(m, fasttfm.nn.RMSNorm):
            m.__class__ = torch.nn.RMSNorm
    return model


def _emulated_vs_reference(torch_norms):
    cfg = GPTConfig(vocab_size=40, n_layer=1, n_head=2, n_kv_head=1, d_model=32, max_seq_len=24,
                    norm="rmsnorm", positions="rope", attention="sliding", window=9)
    batches = _tiny_batches(cfg, 3, batch=2, seq=24)
    torch.manual_seed(0)
    ref = GPT(cfg, kernels="torch")
    ours = GPT(cfg, kernels="fasttfm")
    ours.load_state_dict(ref.state_dict())
    if torch_norms:
        _as_torch_norms(ours)
    ref_losses = _run_steps(ref, batches)
    with fasttfm.emulate(True):
        emu_losses = _run_steps(ours, batches)
    print("emulated", emu_losses, "\nreference", ref_losses)
    assert max(abs(p - q) for p, q in zip(emu_losses, ref_losses)) < 1e-4, (emu_losses, ref_losses)


@needs_attention
def test_emulated_attention_kernels_match_reference_losses():
    """FASTTFM_EMULATE: the Triton attention forward/backward kernels run in the interpreter inside
    3 training steps (GQA, RoPE, sliding window); norms on torch's modules."""
    _emulated_vs_reference(torch_norms=True)


@needs_attention
@pytest.mark.skipif(not _ext.built_parts()["emulator"],
                    reason="fasttfm._C_emu (the SIMT emulator build of the CUDA norm kernels) is not built here: "
                           "it needs the CUDA toolkit at build time; the attention kernels are still checked by "
                           "test_emulated_attention_kernels_match_reference_losses")
def test_emulated_all_kernels_match_reference_losses():
    """FASTTFM_EMULATE: every GPU kernel of the model (Triton attention, CUDA RMSNorm) from source."""
    _emulated_vs_reference(torch_norms=False)


# -- training loop -------------------------------------------------------------------------------
def test_loss_decreases(tmp_path):
    res = train(tiny(tmp_path, kernels=KERNELS, max_steps=25, eval_interval=0, save=False, sample_tokens=20))
    first, last = res["losses"][1], sum(res["losses"][s] for s in range(21, 26)) / 5
    assert first > 3.8 and last < first - 0.6, (first, last)
    assert res["val"][-1][1] < first - 0.4
    assert len(res["sample"]) == 20 and res["tok_per_s"] > 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_track_fp32(tmp_path, amp):
    """bf16 autocast, and fp16 autocast with a GradScaler, on the CPU: close to the fp32 losses."""
    common = dict(kernels=KERNELS, max_steps=4, eval_interval=-1, save=False)
    ref = train(tiny(tmp_path, amp="none", **common))["losses"]
    low = train(tiny(tmp_path, amp=amp, **common))["losses"]
    assert all(abs(low[s] - ref[s]) < 0.02 for s in ref), (low, ref)


def test_presets_build():
    sizes = {}
    for name in ("cpu", "gpu", "tiny"):
        cfg = preset(name)
        sizes[name] = GPT(cfg.model_config(65), kernels="torch").num_params()
    assert 0.7e6 < sizes["cpu"] < 2e6 and 10e6 < sizes["gpu"] < 12e6 and sizes["tiny"] < 50e3, sizes
    assert preset("gpu").device == "cuda" and preset("gpu").compile and preset("gpu").amp == "auto"


def test_resume_is_exact(tmp_path):
    common = dict(kernels=KERNELS, max_steps=8, eval_interval=4, dropout=0.1, grad_accum=2, grad_clip=0.5)
    full = train(tiny(tmp_path, "full", **common))
    half = train(tiny(tmp_path, "resumed", stop_at=4, **common))
    assert load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["step"] == 4
    rest = train(tiny(tmp_path, "resumed", resume="auto", **common))
    assert [half["losses"][s] for s in range(1, 5)] == [full["losses"][s] for s in range(1, 5)]
    assert [rest["losses"][s] for s in range(5, 9)] == [full["losses"][s] for s in range(5, 9)]
    assert rest["val"][-1] == full["val"][-1]
    for (name, p), q in zip(full["model"].state_dict().items(), rest["model"].state_dict().values()):
        assert torch.equal(p, q), name
    rows = read_csv(tmp_path / "resumed" / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_csv(tmp_path / "full" / "log.csv")]
    ckpt = load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))
    tok = Tokenizer.from_state(ckpt["tokenizer"])
    assert tok.vocab_size == ckpt["model_config"]["vocab_size"] == 65
    assert ckpt["data"]["pos"] > 0 and len(ckpt["rng"]) == 1


def test_corrupt_checkpoint_clear_error_and_previous_survives(tmp_path, monkeypatch):
    import fasttfm.checkpoint as C
    import fasttfm.train as T

    cfg = tiny(tmp_path, kernels=KERNELS, max_steps=4, stop_at=2, eval_interval=0, ckpt_interval=1)
    train(cfg)
    path, prev = tmp_path / "run" / "ckpt.pt", tmp_path / "run" / "ckpt.prev.pt"
    assert load_checkpoint(str(path))["step"] == 2 and load_checkpoint(str(prev))["step"] == 1

    # a write that dies half-way leaves the last good checkpoint in place
    state = load_checkpoint(str(path))

    def dying_write(p, envelope):
        with open(p, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(C, "_write_file", dying_write)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(dict(state, step=3), str(path))
    monkeypatch.undo()
    assert load_checkpoint(str(path))["step"] == 2 and not os.path.exists(str(path) + ".tmp")

    # truncated: clear error naming the intact previous checkpoint; resuming from that one works
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=r"ckpt\.prev\.pt \(step 1\) is intact"):
        train(T.replace(cfg, resume="auto", stop_at=0))
    res = train(T.replace(cfg, resume=str(prev), stop_at=3))
    assert sorted(res["losses"]) == [2, 3]
    assert load_checkpoint(str(path))["step"] == 3 and load_checkpoint(str(prev))["step"] == 2

    # a flipped byte inside the payload: caught by the checksum
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0x5A
    path.write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(path))
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nowhere.pt"))


def test_cli_train_writes_logs_and_checkpoint(tmp_path, capsys):
    from fasttfm.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--preset", "tiny", "--out-dir", str(out), "--max-steps", "3", "--eval-interval", "3",
               "--sample-tokens", "10", "--kernels", KERNELS, "--tensorboard", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "sample:" in text and "tok/s" in text
    assert [int(r["step"]) for r in read_csv(out / "log.csv")] == [1, 2, 3]
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 3
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))


# -- KV-cache generation -------------------------------------------------------------------------
def _gen_model(attention, positions, seed=0):
    cfg = GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=24,
                    positions=positions, attention=attention, window=5)
    torch.manual_seed(seed)
    return GPT(cfg, kernels="fasttfm").eval()


@needs_attention
@pytest.mark.parametrize("attention", ["causal", "sliding"])
@pytest.mark.parametrize("positions", ["learned", "rope", "sinusoidal"])
def test_kvcache_generate_matches_uncached(monkeypatch, attention, positions):
    """GPT.generate on fasttfm.attention_with_kvcache (prefill + one token a step) gives the uncached
    loop's greedy tokens, also past max_seq_len (where it falls back to the cropped uncached loop)."""
    import fasttfm.model as fm

    calls = []
    real = fm._fasttfm_attention_with_kvcache

    def counting(*a, **kw):
        calls.append(a[0].shape[1])
        return real(*a, **kw)

    monkeypatch.setattr(fm, "_fasttfm_attention_with_kvcache", counting)
    model = _gen_model(attention, positions)
    assert model.can_use_kv_cache()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 40, (2, 7), generator=g)
    for n_new in (12, 25):                      # 7 + 12 fits max_seq_len 24; 7 + 25 needs cropping
        calls.clear()
        cached = model.generate(prompt, n_new, top_k=1)
        n_kv = len(calls)
        uncached = model.generate(prompt, n_new, top_k=1, use_cache=False)
        assert len(calls) == n_kv, "use_cache=False must not touch the KV cache"
        assert cached.shape == (2, 7 + n_new)
        assert torch.equal(cached, uncached), (cached, uncached)
        n_cached = min(n_new, 24 - 7 + 1)
        assert calls[:2] == [7, 7] and calls[2:] == [1] * (2 * (n_cached - 1))   # prefill, then 1 token/layer


@needs_attention
@pytest.mark.parametrize("attention", ["causal", "sliding"])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kvcache_step_logits_match_forward(attention, positions):
    model = _gen_model(attention, positions, seed=3)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 40, (2, 9), generator=g)
    nxt = torch.randint(0, 40, (2, 1), generator=g)
    with torch.no_grad():
        cache = model.new_kv_cache(2, 12)
        prefill = model._forward(prompt, cache)                 # first cached step: the prompt
        assert cache.length == 9 and cache.seqlens.tolist() == [9, 9]
        step = model._forward(nxt, cache)                       # then one token at position 9
        full = model(torch.cat([prompt, nxt], dim=1))[0]
    torch.testing.assert_close(prefill[:, -1], model(prompt)[0][:, -1].detach())
    torch.testing.assert_close(prefill, full[:, :9])
    torch.testing.assert_close(step[:, -1], full[:, -1])


def test_generate_uncached_paths():
    """kernels="torch" and chunked attention keep the uncached loop (and still crop to max_seq_len)."""
    cfg = GPTConfig(vocab_size=40, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    torch.manual_seed(0)
    model = GPT(cfg, kernels="torch").eval()
    assert not model.can_use_kv_cache()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, top_k=1)
    assert out.shape == (1, 23)
    if HAVE_ATTENTION:
        chunked = GPT(GPTConfig(vocab_size=40, n_layer=1, n_head=2, d_model=32, max_seq_len=16,
                                attention="chunked", chunk_size=4), kernels="fasttfm")
        assert not chunked.can_use_kv_cache()
