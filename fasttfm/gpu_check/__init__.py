"""``python -m fasttfm gpu-check``: one command that proves fasttfm on the GPU it runs on.

    python -m fasttfm gpu-check [--out DIR] [--budget-s 480] [--phases build,tests,grid,sanitizer,perf]

Uses the interpreter it was started with (no venv, no pip). Phases, each in its own process with
its own time budget (a hung or crashed phase costs its budget, not the run):

  build      ``setup.py build_ext --inplace`` for the visible GPU's arch only (no emulator build,
             ``MAX_JOBS=nproc``); without a GPU a CPU-only build (nothing else to prove there)
  tests      every ``cuda`` parametrization of tests/ (``FASTTFM_REQUIRE_GPU=1``, pytest-xdist)
  grid       GPU-scale correctness the interpreter could never afford (fasttfm/gpu_check/grid.py)
  sanitizer  compute-sanitizer memcheck + racecheck on one small case per kernel family
  perf       peaks, then fasttfm vs SDPA backends / FlexAttention / torch eager and compile
  report     summary.md, results.json, plots, and a compact target table on stdout

Budgets: the run's ``--budget-s`` less a reserve for the report is shared among the phases still
to run in proportion to their weights, so time one phase leaves unused goes to the next ones.
Every phase appends its records to ``records.jsonl`` as it goes and ``results.json`` is
rewritten after each phase, so a run killed from outside still returns what it finished. Without
a GPU the GPU phases are recorded as skipped with the reason and the exit status is 0.
Exit status: 0 when nothing failed (skips allowed), 1 when a phase failed or a check failed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

__all__ = ["PHASES", "WEIGHTS", "main", "allocate", "run_phase", "Run"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A source checkout (setup.py and tests/ next to the package) or an installed fasttfm (site-packages): the
# latter has no build to run and no tests/ to collect; those phases say so and the GPU phases still run.
CHECKOUT = os.path.isfile(os.path.join(ROOT, "setup.py"))
NEEDS_CHECKOUT = {
    "build": "installed fasttfm (no setup.py next to the package): the extension pip built is the one checked",
    "tests": "the tests phase collects tests/ of a source checkout, which an installed fasttfm does not ship "
             "(run gpu-check from a checkout for it); grid, sanitizer and perf run on the installed package",
}
PHASES = ["build", "tests", "grid", "sanitizer", "perf"]
# Shares of the budget (renormalised over the phases still to run when each one starts).
# The build gets a generous share (a cut build leaves nothing to check); what it does not use flows on.
# H200 runs: build 28-33 s; tests 171 s for 524 cases (run 1), ~215 s for 686 (run 3; 12 xdist workers,
# Triton compiles dominate); grid 34 s (3 shards); sanitizer ~20 s; perf 98 s (every section). With
# 480 s these shares give the tests ~240 s, the grid ~55, the sanitizer ~27 and perf ~135.
WEIGHTS = {"build": 0.20, "tests": 0.50, "grid": 0.10, "sanitizer": 0.05, "perf": 0.25}
REPORT_RESERVE_S = 10.0
GPU_PHASES = {"tests", "grid", "sanitizer", "perf"}


def allocate(phase, remaining_phases, seconds_left, weights=None):
    """Seconds for ``phase`` given the phases not yet run (``phase`` included) and the time left."""
    weights = weights or WEIGHTS
    total = sum(weights.get(p, 0.1) for p in remaining_phases)
    return max(0.0, seconds_left * weights.get(phase, 0.1) / total) if total else 0.0


def _parse_weights(spec):
    """``"tests=0.6,perf=0.2"`` -> WEIGHTS with those entries replaced (ValueError on a bad entry)."""
    out = dict(WEIGHTS)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in PHASES:
            raise ValueError(f"--weights: unknown phase {name!r}; accepted: {','.join(PHASES)}")
        out[name] = float(value)
    return out


class Run:
    """The state of one gpu-check run: output folder, deadline, records and per-phase results."""

    def __init__(self, out, budget_s, python=sys.executable):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + budget_s
        self.budget_s = budget_s
        self.python = python
        self.records_path = os.path.join(self.out, "records.jsonl")
        open(self.records_path, "w").close()
        self.phases = {}
        self.machine = {}

    def left(self):
        return self.deadline - time.time()

    def records(self, phase=None):
        out = []
        with open(self.records_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if phase is None or rec.get("phase") == phase:
                    out.append(rec)
        return out

    def save(self):
        from .report import write_results

        write_results(self)


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    if extra:
        env.update(extra)
    return env


def run_phase(run, name, cmd, budget_s, env=None, log=None):
    """Run ``cmd`` (a list) with a hard time limit; record status, seconds and the output tail.

    The child gets ``FASTTFM_GPU_CHECK_DEADLINE`` (epoch seconds, a few seconds before the kill)
    and ``FASTTFM_GPU_CHECK_RECORDS`` (the JSONL file to append to)."""
    t0 = time.time()
    soft = t0 + max(1.0, budget_s - 5.0)
    env = _env(env)
    env["FASTTFM_GPU_CHECK_DEADLINE"] = f"{soft:.3f}"
    env["FASTTFM_GPU_CHECK_RECORDS"] = run.records_path
    env["FASTTFM_GPU_CHECK_OUT"] = run.out
    print(f"[gpu-check] {name}: budget {budget_s:.0f} s: {' '.join(cmd)}", flush=True)
    logf = open(log, "w") if log else None
    status, rc = "ok", None
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT if CHECKOUT else os.getcwd(), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        tail = []
        import selectors

        # Raw chunks, never readline(): pytest's progress dots come without a newline for minutes, and a
        # blocked readline let the second H200 run's tests phase overrun its budget by 49 s.
        fd = proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        partial = ""
        while True:
            if time.time() > t0 + budget_s:
                _kill(proc)
                status = "timeout"
                break
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if proc.poll() is not None:
                    break
                continue
            text = chunk.decode("utf-8", errors="replace")
            if logf:
                logf.write(text)
                logf.flush()
            if os.environ.get("FASTTFM_GPU_CHECK_ECHO", "1") == "1":
                sys.stdout.write(text)
                sys.stdout.flush()
            lines = (partial + text).split("\n")
            partial = lines.pop()
            tail += [ln + "\n" for ln in lines]
            del tail[:-60]
        if partial:
            tail.append(partial)
        rc = proc.wait()
        if status == "ok" and rc != 0:
            status = "failed"
    except OSError as exc:
        status, tail = "failed", [f"could not start: {exc}\n"]
    finally:
        if logf:
            logf.close()
    res = {"status": status, "rc": rc, "seconds": round(time.time() - t0, 1), "budget_s": round(budget_s, 1),
           "tail": "".join(tail[-25:])}
    run.phases[name] = {**run.phases.get(name, {}), **res}
    print(f"[gpu-check] {name}: {status} in {res['seconds']:.0f} s (rc {rc})", flush=True)
    return res


def _kill(proc):
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _machine(python):
    """Versions and the GPU, asked in a child process (the parent stays free of CUDA state)."""
    code = ("import json, os, platform, torch\n"
            "d = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
            "     'gpu': None, 'cc': None, 'sms': None, 'cpus': os.cpu_count()}\n"
            "try:\n import triton; d['triton'] = triton.__version__\nexcept Exception as e: d['triton'] = None\n"
            "try:\n import numpy; d['numpy'] = numpy.__version__\nexcept Exception: pass\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    d.update(gpu=p.name, cc=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,\n"
            "             mem_gib=round(p.total_memory / 2**30, 1))\n"
            "print(json.dumps(d))\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        info = {"error": f"could not read versions: {exc}"}
    info["commit"], info["dirty"] = _commit()
    try:
        sm = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = sm.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def _commit():
    """(commit, dirty) of the checkout; FASTTFM_GPU_CHECK_COMMIT names it for a copy of the tree whose .git is
    stale or absent; an installed fasttfm gives its version (no git: site-packages may sit in another repo)."""
    named = os.environ.get("FASTTFM_GPU_CHECK_COMMIT")
    if not CHECKOUT:
        from .. import __version__

        return named or f"installed fasttfm {__version__}", False
    try:
        commit = named or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=ROOT).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return commit, bool(dirty)
    except OSError:  # no git here
        return named, None


def _build_cmd(run):
    archs = None
    if run.machine.get("cc"):
        archs = f"{run.machine['cc'][0]}{run.machine['cc'][1]}"
    env = {"FASTTFM_SKIP_EMU_BUILD": "1"}
    if archs:
        env["FASTTFM_CUDA_ARCHS"] = archs
    else:
        env["FASTTFM_SKIP_CUDA_BUILD"] = "1"
    return [run.python, "setup.py", "-q", "build_ext", "--inplace"], env, archs


def _after_build():
    # An in-place build for one arch replaces the .so files `make` built: drop make's stamp so the
    # next `make test` rebuilds for FASTTFM_CUDA_ARCHS and the emulator.
    stamp = os.path.join(ROOT, "build", ".fasttfm-built")
    if os.path.exists(stamp):
        os.remove(stamp)


def _phase_cmd(run, name, args):
    mod = {"tests": "fasttfm.gpu_check.tests", "grid": "fasttfm.gpu_check.grid",
           "sanitizer": "fasttfm.gpu_check.sanitize", "perf": "fasttfm.gpu_check.perf"}[name]
    cmd = [run.python, "-m", mod]
    if name == "perf" and args.quick:
        cmd.append("--quick")
    if name == "perf" and args.perf_sections:
        cmd += ["--sections", args.perf_sections]
    if name == "tests" and args.pytest_args:
        cmd += ["--pytest-args", args.pytest_args]
    return cmd


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fasttfm gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu") if CHECKOUT else
                   os.path.abspath("fasttfm-gpu-check"),
                   help="output folder (at most 8 files; default bench/results/gpu of a checkout, else "
                        "./fasttfm-gpu-check)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (s)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list out of {','.join(PHASES)}")
    p.add_argument("--quick", action="store_true", help="fewer benchmark cases (plumbing checks)")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments for the tests phase")
    p.add_argument("--perf-sections", default="", help="comma list of perf sections (default: all; see perf.py)")
    p.add_argument("--weights", default="", help="budget shares per phase, e.g. tests=0.6,perf=0.2 "
                   f"(default {','.join(f'{k}={v}' for k, v in WEIGHTS.items())})")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        print(f"gpu-check: --phases: unknown {bad}; accepted: {','.join(PHASES)}", file=sys.stderr)
        return 2
    try:
        weights = _parse_weights(args.weights)
    except ValueError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    run = Run(args.out, args.budget_s)
    run.command = "python -m fasttfm gpu-check " + " ".join(sys.argv[1:] if argv is None else argv)
    run.machine = _machine(run.python)
    has_gpu = bool(run.machine.get("cc"))
    print(f"[gpu-check] {run.machine}", flush=True)
    if not has_gpu:
        print("[gpu-check] no CUDA GPU visible: the GPU phases are skipped (recorded as such)", flush=True)
    run.save()
    todo = list(phases)
    for name in phases:
        budget = allocate(name, todo, run.left() - REPORT_RESERVE_S, weights)
        todo.remove(name)
        if name in NEEDS_CHECKOUT and not CHECKOUT:
            run.phases[name] = {"status": "skipped", "why": NEEDS_CHECKOUT[name]}
            print(f"[gpu-check] {name}: skipped: {NEEDS_CHECKOUT[name]}", flush=True)
        elif name in GPU_PHASES and not has_gpu:
            run.phases[name] = {"status": "skipped", "why": "no CUDA GPU visible (torch.cuda.is_available() False)"}
        elif budget < 3:
            run.phases[name] = {"status": "skipped", "why": f"budget exhausted ({budget:.0f} s left for it)"}
        elif name == "build":
            cmd, env, archs = _build_cmd(run)
            run.phases["build"] = {"archs": archs or "none (CPU-only build)"}
            run_phase(run, "build", cmd, budget, env=env, log=os.path.join(run.out, "build.log"))
            _after_build()
        else:
            log = os.path.join(run.out, "pytest.log") if name == "tests" else None
            if name == "sanitizer":
                log = os.path.join(run.out, "sanitizer.log")
            run_phase(run, name, _phase_cmd(run, name, args), budget, log=log)
        run.save()
    from .report import finish

    return finish(run)
