"""pytest plugin for the gpu-check ``tests`` phase: one record per test outcome, as it arrives.

Loaded with ``-p fasttfm.gpu_check._plugin``; under pytest-xdist the controller receives every
worker's reports, so only the controller writes (no interleaved lines from several processes)."""
import json
import os
import time

__all__ = ["pytest_runtest_logreport"]


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTTFM_GPU_CHECK_RECORDS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed) or (
            report.when == "teardown" and report.failed):
        status = "skipped" if report.skipped else ("ok" if report.passed else "failed")
        rec = {"phase": "tests", "t": round(time.time(), 2), "case": report.nodeid, "status": status,
               "seconds": round(report.duration, 2)}
        if report.failed:
            rec["error"] = str(report.longrepr)[-1200:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            rec["why"] = str(report.longrepr[2])[:300]
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
