"""What every gpu-check phase process shares: its deadline, the records file, timing and oracles."""
import json
import os
import time
import traceback

import torch

__all__ = ["deadline", "left", "record", "rel_oracle", "guarded", "free_cuda", "peak_memory_mib"]


def deadline():
    """Epoch seconds by which this phase must have written its last record."""
    return float(os.environ.get("FASTTFM_GPU_CHECK_DEADLINE", time.time() + 3600))


def left():
    return deadline() - time.time()


def record(phase, **fields):
    """Append one record (a JSON line) to the run's records file, flushed at once."""
    rec = {"phase": phase, "t": round(time.time(), 2), **fields}
    path = os.environ.get("FASTTFM_GPU_CHECK_RECORDS")
    line = json.dumps(rec, default=_jsonable)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return rec


def _jsonable(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return str(x)


def rel_oracle(out, ref, lowp, factor=2.0, floor_rel=None):
    """FlashAttention's relative oracle on max errors: |out - ref| <= factor * |lowp - ref| + floor.

    ``ref`` is the float64 (or fp32) reference, ``lowp`` the same math in the tested dtype. Returns
    (ok, err, bound). NaN anywhere in ``out`` where ``ref`` is finite fails."""
    ref = ref.double()
    fin = torch.isfinite(ref)
    o = out.double()
    if not torch.equal(torch.isfinite(o), fin):
        return False, float("nan"), float("nan")
    if not fin.any():
        return True, 0.0, 0.0
    err = (o[fin] - ref[fin]).abs().max().item()
    base = (lowp.double()[fin] - ref[fin]).abs().max().item()
    if floor_rel is None:
        floor_rel = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(out.dtype, 1e-6)
    bound = factor * base + floor_rel * max(1.0, ref[fin].abs().max().item())
    return err <= bound, err, bound


def guarded(phase, case, fn):
    """Run one case; an exception becomes a failed record (with its message) instead of ending the phase."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as exc:
        free_cuda()
        return record(phase, case=case, status="error", error=f"OOM: {str(exc).splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none ends the phase
        free_cuda()
        return record(phase, case=case, status="error", error=f"{type(exc).__name__}: {exc}"[:600],
                      trace=traceback.format_exc()[-1500:])


def free_cuda():
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a sticky CUDA error: later cases report it themselves
            pass


def peak_memory_mib(fn, device="cuda"):
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before (MiB); NaN off CUDA
    (fn still runs). Shared with bench/common.py."""
    if device != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
