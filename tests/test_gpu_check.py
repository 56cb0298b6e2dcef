"""``python -m fasttfm gpu-check`` on a machine without a GPU: plumbing, budgets, records, report.

The GPU phases' own code runs here too, on CPU tensors at toy sizes (fasttfm's CPU paths stand in
for the kernels), so a typo in a benchmark or a wrong keyword fails here, not in the few minutes
a GPU is lent. The grid's oracle is checked both ways: it passes the CPU paths and fails a
planted 5% error.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fasttfm import gpu_check
from fasttfm.gpu_check import grid, perf, report, sanitize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def records_env(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    path.write_text("")
    monkeypatch.setenv("FASTTFM_GPU_CHECK_RECORDS", str(path))
    monkeypatch.setenv("FASTTFM_GPU_CHECK_DEADLINE", str(time.time() + 600))

    def read():
        return [json.loads(line) for line in path.read_text().splitlines()]

    return read


def test_allocate_shares_leftover_time():
    phases = list(gpu_check.PHASES)
    first = gpu_check.allocate("build", phases, 470)
    assert first == pytest.approx(470 * gpu_check.WEIGHTS["build"] / sum(gpu_check.WEIGHTS.values()))
    # a later phase gets the time earlier ones left: with 400 s left for tests..perf, tests gets its share of 400
    rest = phases[1:]
    assert gpu_check.allocate("tests", rest, 400) == pytest.approx(
        400 * gpu_check.WEIGHTS["tests"] / sum(gpu_check.WEIGHTS[p] for p in rest))
    assert gpu_check.allocate("perf", ["perf"], 123) == pytest.approx(123)
    assert gpu_check.allocate("perf", ["perf"], -5) == 0


def test_run_phase_kills_at_budget_and_keeps_records(tmp_path):
    run = gpu_check.Run(tmp_path / "out", budget_s=60, python=sys.executable)
    code = ("import os, json, time\n"
            "open(os.environ['FASTTFM_GPU_CHECK_RECORDS'], 'a').write(json.dumps({'phase': 'x', 'case': 'a', "
            "'status': 'ok', 'deadline': os.environ['FASTTFM_GPU_CHECK_DEADLINE']}) + '\\n')\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    t0 = time.time()
    res = gpu_check.run_phase(run, "x", [sys.executable, "-c", code], budget_s=3)
    took = time.time() - t0
    assert res["status"] == "timeout"
    assert took < 15, took
    assert "started" in res["tail"]
    recs = run.records("x")
    assert [r["case"] for r in recs] == ["a"]
    # the child was told a soft deadline inside its budget
    assert float(recs[0]["deadline"]) <= t0 + 3 + 1
    run.save()
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["phases"]["x"]["status"] == "timeout"


def test_run_phase_reports_failure_exit(tmp_path):
    run = gpu_check.Run(tmp_path / "out", budget_s=60, python=sys.executable)
    res = gpu_check.run_phase(run, "y", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], budget_s=20)
    assert res["status"] == "failed" and res["rc"] == 3 and "boom" in res["tail"]


def test_cli_without_gpu_skips_gpu_phases_and_exits_0(tmp_path):
    """The whole command on this machine (build left out: `make test` built already): GPU phases are
    recorded as skipped with the reason, the report files exist, and there are at most 8 of them."""
    out = tmp_path / "gc"
    env = dict(os.environ, FASTTFM_GPU_CHECK_ECHO="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "fasttfm", "gpu-check", "--out", str(out), "--budget-s", "60",
                           "--phases", "tests,grid,sanitizer,perf"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU phases skipped" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    for phase in ("tests", "grid", "sanitizer", "perf"):
        assert data["phases"][phase]["status"] == "skipped"
        assert "no CUDA GPU" in data["phases"][phase]["why"]
    assert (out / "summary.md").read_text().startswith("# gpu-check on a machine without a GPU")
    assert len(os.listdir(out)) <= 8
    assert len(proc.stdout) < 10000


def test_unknown_phase_is_refused(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--phases", "tests,bogus"]) == 2


def test_perf_sections_run_on_cpu_at_toy_sizes(records_env, monkeypatch):
    """Every perf section except compile/flex (torch.compile on the CPU takes minutes) on CPU tensors."""
    monkeypatch.setattr(perf, "DEV", "cpu")
    monkeypatch.setattr(perf, "SCALE", 256)
    monkeypatch.setattr(perf, "TOKENS", 128)
    monkeypatch.setattr(perf, "HIDDEN", 64)
    assert perf.main(["--quick", "--sections", "peaks,attention,membound,linear_ce,decode"]) == 0
    recs = records_env()
    errors = [r for r in recs if r.get("status") == "error"]
    assert not errors, errors
    ok = [r for r in recs if r.get("status") == "ok"]
    sections = {r.get("section") for r in ok}
    assert {"peaks", "attention", "membound", "linear_ce", "decode"} <= sections
    # both sides of every comparison ran, so the target table has numbers
    table = {t[0]: t for t in report.evaluate_targets(recs)}
    assert table["attention fwd vs SDPA FLASH (FA2)"][5] > 0
    assert table["memory-bound ops vs torch eager"][5] > 0
    assert table["fused linear-CE time / unfused"][5] == 1
    assert table["decode tokens/s vs SDPA"][5] > 0
    # SDPA backends that need CUDA are recorded as unsupported, not dropped
    assert any(r.get("status") == "unsupported" and r.get("provider") == "sdpa_efficient" for r in recs)


def test_attention_flops_count_visible_pairs():
    assert perf.attention_flops(1, 1, 4, 1, False, "fwd") == 4 * 16
    assert perf.attention_flops(1, 1, 4, 1, True, "fwd") == 4 * 10
    assert perf.attention_flops(2, 3, 4, 5, True, "fwd+bwd") == 4 * 2 * 3 * 5 * 10 * 3.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grid_oracle_passes_cpu_paths_and_fails_planted_error(records_env, dtype, monkeypatch):
    case = dict(dtype=dtype, d=32, n=97, causal=True, window=(40, 0), hq=4, hkv=2)
    assert grid.run_attention_case(case, device="cpu")["status"] == "ok"
    var = dict(dtype=dtype, d=16, causal=True, varlen=[33, 5, 60], chunk=16)
    assert grid.run_attention_case(var, device="cpu")["status"] == "ok"
    assert grid.run_norm_case("layer_norm", 7, 300, dtype, device="cpu")["status"] == "ok"
    assert grid.run_norm_case("rms_norm", 7, 300, dtype, device="cpu")["status"] == "ok"
    assert grid.run_softmax_case(5, 333, dtype, device="cpu")["status"] == "ok"
    assert grid.run_ce_case(9, 1000, dtype, device="cpu")["status"] == "ok"
    assert grid.run_linear_ce_case(9, 32, 500, dtype, device="cpu")["status"] == "ok"
    # a 5% error in the kernel's output must fail the oracle (1% is within bf16's own rounding at peaked rows)
    import fasttfm

    real = fasttfm.softmax
    monkeypatch.setattr(fasttfm, "softmax", lambda x, dim=-1: real(x, dim) * 1.05)
    rec = grid.run_softmax_case(5, 333, dtype, device="cpu")
    assert rec["status"] == "failed" and "y" in rec["failed"]


def test_grid_reference_masks_match_definition():
    vis = grid.visible_mask(3, 5, 1, 0, None, "cpu")  # bottom-right: query i sits at key i + 2
    assert vis.tolist() == [[False, True, True, False, False], [False, False, True, True, False],
                            [False, False, False, True, True]]
    chunk = grid.visible_mask(4, 4, -1, -1, 2, "cpu")
    assert chunk.tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2


def test_determinism_and_sanitizer_cases_run_on_cpu(records_env):
    rec = grid.run_determinism(device="cpu", n=64, cols=64, rows=16, vocab=100)
    assert rec["status"] == "ok", rec
    assert sanitize.run_cases(dev="cpu") == ["layer_norm/rms_norm vector", "layer_norm/rms_norm scalar odd width",
                                             "layer_norm/rms_norm wide rows", "softmax",
                                             "cross_entropy + linear_cross_entropy", "attention fwd/bwd",
                                             "attention decode"]


def test_report_targets_from_records(tmp_path):
    recs = [
        {"phase": "perf", "section": "attention", "provider": "fasttfm", "status": "ok", "ms": 2.0, "dtype": "bf16",
         "d": 128, "n": 1024, "mask": "causal", "dir": "fwd"},
        {"phase": "perf", "section": "attention", "provider": "sdpa_flash", "status": "ok", "ms": 3.0,
         "dtype": "bf16", "d": 128, "n": 1024, "mask": "causal", "dir": "fwd"},
        {"phase": "perf", "section": "attention", "provider": "fasttfm", "status": "ok", "ms": 4.0, "dtype": "bf16",
         "d": 128, "n": 2048, "mask": "causal", "dir": "fwd"},
        {"phase": "perf", "section": "attention", "provider": "sdpa_flash", "status": "ok", "ms": 3.0,
         "dtype": "bf16", "d": 128, "n": 2048, "mask": "causal", "dir": "fwd"},
        {"phase": "perf", "section": "membound", "provider": "fasttfm", "status": "ok", "ms": 1.0, "op": "softmax",
         "dir": "fwd", "frac_copy": 0.5, "cols": 4096},
    ]
    table = {t[0]: t for t in report.evaluate_targets(recs)}
    label, goal, kind, geo, worst, n, met = table["attention fwd vs SDPA FLASH (FA2)"]
    assert n == 2 and geo == pytest.approx((1.5 * 0.75) ** 0.5) and worst == pytest.approx(0.75) and met is True
    assert table["softmax fwd, % of copy BW"][3] == pytest.approx(0.5)
    assert table["decode tokens/s vs SDPA"][6] is None
    assert "not measured" in report.target_table(recs)


def test_weights_override_and_refusals(tmp_path):
    w = gpu_check._parse_weights("tests=0.6,perf=0.2")
    assert w["tests"] == 0.6 and w["perf"] == 0.2 and w["build"] == gpu_check.WEIGHTS["build"]
    assert gpu_check.allocate("tests", ["tests", "perf"], 80, w) == pytest.approx(60)
    with pytest.raises(ValueError, match="unknown phase 'bogus'"):
        gpu_check._parse_weights("bogus=1")
    assert gpu_check.main(["--out", str(tmp_path), "--weights", "bogus=1"]) == 2


def test_run_phase_kills_on_time_while_output_has_no_newline(tmp_path):
    """A child printing progress without newlines (pytest -q's dots) must still be stopped at its budget."""
    run = gpu_check.Run(tmp_path / "out", budget_s=60, python=sys.executable)
    code = "import sys, time\nfor i in range(600):\n    sys.stdout.write('.'); sys.stdout.flush(); time.sleep(0.1)\n"
    t0 = time.time()
    res = gpu_check.run_phase(run, "dots", [sys.executable, "-c", code], budget_s=3)
    assert res["status"] == "timeout" and time.time() - t0 < 12
    assert "..." in res["tail"]


def test_sanitizer_tells_a_refused_device_from_a_crash(tmp_path, records_env):
    """A traceback from fasttfm's own cases is an error, never "compute-sanitizer does not work here"
    (the first H200 run's softmax crash must not read as a skip); a refused device is a skip."""
    runner = tmp_path / "fake-sanitizer"
    # drops the sanitizer's own 6 options and runs the driver: on this CPU machine the cases crash
    runner.write_text("#!/bin/sh\nshift 6\nexec \"$@\"\n")
    runner.chmod(0o755)
    rec = sanitize._run_tool("memcheck", str(runner), 120)
    assert rec["status"] == "error", rec
    refuser = tmp_path / "refusing-sanitizer"
    refuser.write_text("#!/bin/sh\necho '========= Device not supported'\nexit 1\n")
    refuser.chmod(0o755)
    assert sanitize._run_tool("memcheck", str(refuser), 60)["status"] == "skipped"
