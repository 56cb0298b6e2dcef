"""gpu-check phase ``tests``: every ``cuda`` parametrization of tests/ on the real GPU.

``FASTTFM_REQUIRE_GPU=1`` (a missing GPU fails instead of skipping), pytest-xdist over the CPU
cores when it is installed (Triton compiles in each worker; they share Triton's cache), and
pytest-timeout per test when installed. A plugin in the controller appends one record per test
outcome to the run's records file as results arrive, so a killed run keeps what finished.
"""
import argparse
import importlib.util
import os
import shlex
import subprocess
import sys

from ._common import left, record

__all__ = ["pytest_command", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_command(python, extra=(), workers=None):
    cmd = [python, "-m", "pytest", os.path.join(ROOT, "tests"), "-k", "cuda", "-q", "-rfE", "-p", "no:cacheprovider",
           "--continue-on-collection-errors",
           "-p", "fasttfm.gpu_check._plugin"]
    if importlib.util.find_spec("pytest_benchmark") is not None:
        cmd.append("--benchmark-disable")
    if importlib.util.find_spec("xdist") is not None:
        n = workers or max(1, min(12, (os.cpu_count() or 2) - 2))
        cmd += ["-n", str(n)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "240"]
    return cmd + list(extra)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasttfm.gpu_check.tests")
    p.add_argument("--pytest-args", default="")
    args = p.parse_args(argv)
    cmd = pytest_command(sys.executable, shlex.split(args.pytest_args))
    env = dict(os.environ, FASTTFM_REQUIRE_GPU="1")
    record("tests", case="command", status="info", command=" ".join(cmd), seconds_left=round(left(), 1))
    if not os.path.isdir(os.path.join(ROOT, "tests")):
        record("tests", case="tests/", status="skipped", why="no tests/ next to the package (an installed fasttfm)")
        return 0
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    record("tests", case="pytest exit", status="ok" if rc == 0 else "failed", rc=rc)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
