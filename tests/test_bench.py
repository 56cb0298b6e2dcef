"""Benchmarks of the CPU-capable paths as pytest-benchmark cases, plus smoke tests of bench/suite.py.

In the normal suite (``make test``) each ``bench`` case runs its function once, as a correctness
smoke test (pytest-benchmark's disabled mode), so the file stays fast. To time them:

    pytest --benchmark-only tests/test_bench.py                      # timings, grouped by op
    pytest --benchmark-only tests/test_bench.py --benchmark-autosave # save, then compare runs:
    pytest-benchmark compare --group-by=group

fasttfm and torch providers of one op share a benchmark group, so the table compares them side by
side. On a machine without a GPU these are CPU timings of fasttfm's CPU paths; with a GPU the
``cuda`` cases time the real kernels (skipped without one, failures under FASTTFM_REQUIRE_GPU=1).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as TF

import fasttfm
from tests.oracle import require_gpu

DEVICES = ["cpu", "cuda"]


@pytest.fixture
def bench(request, benchmark):
    """pytest-benchmark's fixture, timing only under --benchmark-only / --benchmark-enable."""
    cfg = request.config
    timed = cfg.getoption("benchmark_only", False) or cfg.getoption("benchmark_enable", False)
    if not timed or cfg.getoption("benchmark_disable", False):
        benchmark.disabled = True
    return benchmark


def _device(param):
    if param == "cuda":
        require_gpu()
    return param


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# -- layer_norm / rms_norm: forward and forward+backward, fasttfm vs torch
NORM_SHAPE = (256, 1024)
NORM_IMPLS = {
    "layer_norm": {"fasttfm": lambda x, w, b: fasttfm.layer_norm(x, [x.shape[-1]], w, b, 1e-5),
                   "torch": lambda x, w, b: TF.layer_norm(x, [x.shape[-1]], w, b, 1e-5)},
    "rms_norm": {"fasttfm": lambda x, w, b: fasttfm.rms_norm(x, [x.shape[-1]], w, 1e-6),
                 "torch": lambda x, w, b: TF.rms_norm(x, [x.shape[-1]], w, 1e-6)},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["fasttfm", "torch"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_bench_norm(bench, op, provider, direction, device):
    device = _device(device)
    bench.group = f"{op} {direction} {NORM_SHAPE[0]}x{NORM_SHAPE[1]} float32 {device}"
    x = torch.randn(*NORM_SHAPE, device=device, requires_grad=direction != "fwd")
    w = torch.randn(NORM_SHAPE[1], device=device, requires_grad=direction != "fwd")
    b = torch.randn(NORM_SHAPE[1], device=device, requires_grad=direction != "fwd")
    dy = torch.randn(*NORM_SHAPE, device=device)
    fn = NORM_IMPLS[op][provider]

    def run():
        if direction == "fwd":
            with torch.no_grad():
                y = fn(x, w, b)
            _sync(device)
            return y, None
        y = fn(x, w, b)
        g = torch.autograd.grad(y, (x, w), dy)
        _sync(device)
        return y, g

    y, g = bench(run)
    ref = NORM_IMPLS[op]["torch"](x, w, b)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    if g is not None:
        ref_g = torch.autograd.grad(ref, (x, w), dy)
        torch.testing.assert_close(g[0], ref_g[0], atol=1e-3, rtol=1e-3)


# -- attention: fasttfm vs SDPA, causal and not
ATTN_SHAPE = (1, 4, 128, 64)  # B, H, N, D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", ["fasttfm", "torch_sdpa"])
def test_bench_attention(bench, provider, causal, direction, device):
    device = _device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B, H, N, D = ATTN_SHAPE
    bench.group = f"attention {direction} B{B} H{H} N{N} D{D} {'causal' if causal else 'full'} {dtype} {device}"
    q, k, v = (torch.randn(*ATTN_SHAPE, device=device, dtype=dtype, requires_grad=direction != "fwd") for _ in range(3))
    do = torch.randn(*ATTN_SHAPE, device=device, dtype=dtype)
    fns = {"fasttfm": lambda: fasttfm.attention(q, k, v, causal=causal),
           "torch_sdpa": lambda: TF.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    fn = fns[provider]

    def run():
        if direction == "fwd":
            with torch.no_grad():
                o = fn()
            _sync(device)
            return o, None
        o = fn()
        g = torch.autograd.grad(o, (q, k, v), do)
        _sync(device)
        return o, g

    o, g = bench(run)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    ref = TF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(o, ref, **tol)
    if g is not None:
        for a, r in zip(g, torch.autograd.grad(ref, (q, k, v), do)):
            torch.testing.assert_close(a, r, **{k_: 10 * t for k_, t in tol.items()})


# -- softmax / cross_entropy: join automatically once their ops are merged
@pytest.mark.parametrize("provider", ["fasttfm", "torch"])
def test_bench_softmax(bench, provider):
    if provider == "fasttfm" and not hasattr(fasttfm, "softmax"):
        pytest.skip("fasttfm.softmax is not in this build yet")
    bench.group = "softmax fwd 256x4096 float32 cpu"
    x = torch.randn(256, 4096)
    fn = (lambda: fasttfm.softmax(x, -1)) if provider == "fasttfm" else (lambda: torch.softmax(x, -1))
    with torch.no_grad():
        y = bench(fn)
    torch.testing.assert_close(y, torch.softmax(x, -1))


@pytest.mark.parametrize("provider", ["fasttfm", "torch"])
def test_bench_cross_entropy(bench, provider):
    if provider == "fasttfm" and not hasattr(fasttfm, "cross_entropy"):
        pytest.skip("fasttfm.cross_entropy is not in this build yet")
    bench.group = "cross_entropy fwd+bwd 256x8192 float32 cpu"
    logits = torch.randn(256, 8192, requires_grad=True)
    target = torch.randint(0, 8192, (256,))
    ce = fasttfm.cross_entropy if provider == "fasttfm" else TF.cross_entropy

    def run():
        loss = ce(logits, target)
        return loss, torch.autograd.grad(loss, logits)[0]

    loss, g = bench(run)
    ref = TF.cross_entropy(logits, target)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, torch.autograd.grad(ref, logits)[0], atol=1e-6, rtol=1e-4)


# -- one training step of the small GPT (tiny preset), fasttfm ops vs torch ops
@pytest.mark.parametrize("kernels", ["fasttfm", "torch"])
def test_bench_train_step(bench, kernels):
    from bench.bench_train import make_step
    from fasttfm.train import preset

    bench.group = "train step tiny preset cpu"
    step, n_params, _, _ = make_step(preset("tiny", device="cpu"), kernels, False, "cpu", 32)
    loss = bench(step)
    assert n_params > 0 and math.isfinite(loss.item())


# -- the suite's plumbing (no timing): discovery, normalization, summary, plots, one tiny end-to-end run
def test_suite_discovers_bench_modules():
    from bench import suite

    ops = suite.discover()
    assert {"attention", "layer_norm", "train"} <= set(ops)
    assert ops.index("attention") < ops.index("layer_norm") < ops.index("train")


def test_suite_unknown_op_lists_the_available_ones(capsys):
    from bench import suite

    assert suite.main(["nope", "--out", "/nonexistent-never-written"]) == 2
    assert "available: all, attention" in capsys.readouterr().err


def test_suite_normalizes_both_row_formats():
    from bench import suite
    from bench.common import Row

    peaks = {"copy_gbps": 10.0, "gemm_tflops": 0.1, "gemm": "fp32"}
    rec = suite.normalize_row(Row("layer_norm", "fasttfm", "rows=4 cols=1024", "float32", "fwd", "CPU", 1.0,
                                  gbps=5.0, frac_peak=0.5), peaks)
    assert (rec["x_name"], rec["x"], rec["gbps"]) == ("cols", 1024, 5.0)
    att = suite.normalize_dict("attention", dict(provider="fasttfm", device="CPU x", dtype="bf16", d="64", seqlen="128",
                                                 batch="1", heads="4", mask="causal", mode="fwd", ms="1.0",
                                                 ms_p20="0.9", ms_p80="1.1", tflops="0.0"), peaks)
    # causal 128x128: 128*129/2 visible pairs, 4*B*H*D flops each, over 1 ms
    assert att["x"] == 128 and att["device"] == "CPU"
    assert att["tflops"] == pytest.approx(4 * 4 * 64 * (128 * 129 // 2) / 1e-3 / 1e12)
    assert att["frac_peak"] == pytest.approx(att["tflops"] / 0.1)


def test_suite_train_quick_end_to_end(tmp_path, capsys, monkeypatch):
    """`fasttfm bench train --quick` on the tiny preset: peaks, rows, skipped list, summary, JSON."""
    from bench import suite

    monkeypatch.delenv("FASTTFM_REQUIRE_GPU", raising=False)  # a CPU run on purpose, GPU runners included

    rc = suite.main(["train", "--quick", "--device", "cpu", "--out", str(tmp_path), "--preset", "tiny"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "measured peaks: copy" in out and "[CPU]" in out
    assert "skipped: GPU case" in out or torch.cuda.is_available()
    data = json.loads((tmp_path / "suite_cpu.json").read_text())
    assert {r["provider"] for r in data["rows"]} >= {"torch"}
    assert all(r["device"] == "CPU" for r in data["rows"])
    assert data["info"]["peak_copy_gbps"] > 0 and data["command"].startswith("python -m fasttfm bench train")
    text = (tmp_path / "summary_cpu.md").read_text()
    assert "## train" in text and "CPU run" in text and "tok/s" in text
    for name in ("train_cpu.csv", "train_cpu.json", "suite_cpu.csv"):
        assert (tmp_path / name).exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "train_cpu_throughput.png").exists()


def test_suite_require_gpu_fails_without_one(monkeypatch, tmp_path):
    from bench import suite

    monkeypatch.setenv("FASTTFM_REQUIRE_GPU", "1")
    assert suite.main(["train", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1


def test_cli_bench_lists_ops_and_has_its_own_help(capsys):
    from fasttfm.cli import main

    assert main(["bench", "--list"]) == 0
    assert "layer_norm" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0 and "--seqlens" in capsys.readouterr().out


def test_tune_attention_runner_interpreted():
    """bench/tune_attention.py's launch thunks on the Triton interpreter at toy size: two configs of each
    kernel compute the same outputs, and the FLOP counts follow the visible pairs."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "tune_attention.py")
    spec = importlib.util.spec_from_file_location("tune_attention", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    s = tune._setup(16, 32, torch.float32, True, device="cpu", tokens=64, hidden=32)
    for kernel in ("fwd", "dkdv", "dq"):
        a = tune._runner(kernel, s, (16, 16, 4, 1), interpret=True)()
        b = tune._runner(kernel, s, (32, 16, 4, 1), interpret=True)()
        assert tune._rel(a, b) < 1e-5, kernel
    assert tune._flops("fwd", s, True, 16) == 4 * s["b"] * s["h"] * 16 * (32 * 33 // 2)
    assert all(len(c) == 4 for cands in tune.CANDIDATES.values() for c in cands)


# -- bench_attention.py's provider list: every backend a user could pick, GPU ones skipped with a reason
def test_bench_attention_providers_listed_on_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU machine's provider list (a GPU runs these providers instead)")
    from bench import bench_attention as BA

    out = tmp_path / "att.csv"
    rows = BA.main(["--dtype", "fp32", "--d", "32", "--seqlens", "64", "--masks", "causal", "doc4", "--mode", "fwd",
                    "--gqa", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert {(r["provider"], r["mask"]) for r in rows} >= {("fasttfm", "causal"), ("torch_sdpa", "causal"),
                                                        ("fasttfm", "doc4")}
    assert all(r["hkv"] == r["heads"] // 2 for r in rows)
    for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex"):
        assert f"skipped: {name}: GPU provider" in text, name
    assert "sdpa_flash: SDPA has no window/chunk/document mask" in text  # doc4 has no SDPA rows
    summary = (tmp_path / "att_summary.md").read_text()
    assert "| 32 | 64 | causal | fwd |" in summary and "torch_sdpa" in summary and "ratio" in summary
    rows = BA.main(["--decode", "--dtype", "fp32", "--d", "32", "--cache", "64", "--batch", "1",
                    "--out", str(tmp_path / "dec.csv")])
    assert {r["provider"] for r in rows} >= {"fasttfm", "fasttfm_paged", "torch_sdpa"}
    assert "skipped: flex (decode): GPU provider" in capsys.readouterr().out
