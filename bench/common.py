"""Shared benchmark plumbing (DESIGN.md conventions).

* Timing: on a GPU ``triton.testing.do_bench`` medians with 20/80% quantiles; on the CPU
  ``torch.utils.benchmark`` (median and IQR of blocked autorange), every row labelled with its
  device so CPU numbers are never read as GPU numbers.
* Inputs: several input sets rotated between calls so caches don't flatter small cases.
* Peaks measured at the start of a run: a large copy (GB/s) and, on a GPU, a large bf16 GEMM.
* Output: rows with device, versions, git commit and timestamp to CSV and JSON, plus a
  markdown table, under ``bench/results/`` (or ``--out``).
"""
import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess

import torch

__all__ = ["Row", "device_info", "time_fn", "copy_bandwidth", "gemm_tflops", "write_results", "add_common_args",
           "Rotating", "peak_memory_mb", "measure_peaks", "peers", "PEERS", "dtype_name", "default_out",
           "bandwidth_row"]


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    case: str  # e.g. "rows=4096 cols=1024"
    dtype: str
    direction: str  # fwd / bwd / fwd+bwd
    device: str
    ms: float = float("nan")
    ms_lo: float = float("nan")  # 20% quantile (GPU) or lower quartile (CPU)
    ms_hi: float = float("nan")
    gbps: float = float("nan")
    tflops: float = float("nan")
    frac_peak: float = float("nan")  # of the measured copy bandwidth (memory-bound) or GEMM peak
    peak_mem_mb: float = float("nan")
    note: str = ""


def device_info(device):
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


class Rotating:
    """Call ``make()`` n times up front; ``next()`` cycles through the input sets."""

    def __init__(self, make, n):
        self.sets = [make() for _ in range(max(1, n))]
        self.i = 0

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s


def time_fn(fn, device, min_run_time=0.3):
    """(median, lo, hi) milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return med, lo, hi
    from torch.utils import benchmark

    fn()  # warm-up
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m._p25 * 1e3 if hasattr(m, "_p25") else m.median * 1e3, m._p75 * 1e3 if hasattr(m, "_p75") else m.median * 1e3


def bandwidth_row(op, provider, case, dtype, direction, device, fn, nbytes, peak, memory=False):
    """Time fn() on ``device`` and return its Row for a memory-bound op: GB/s from ``nbytes`` (the minimum
    traffic: inputs read once, outputs written once), the fraction of the measured copy bandwidth ``peak``,
    peak memory when ``memory``. Rows on the CPU are labelled CPU. Prints one line."""
    ms, lo, hi = time_fn(fn, device)
    mem = peak_memory_mb(fn, device) if memory else float("nan")
    gbps = nbytes / (ms * 1e-3) / 1e9
    row = Row(op, provider, case, dtype_name(dtype), direction, "cuda" if device == "cuda" else "CPU", ms, lo, hi,
              gbps, float("nan"), gbps / peak, mem)
    print(f"{op:15s} {provider:14s} {case:30s} {row.dtype:8s} {direction:7s} {ms:8.3f} ms  {gbps:7.1f} GB/s  "
          f"{gbps / peak:5.1%} of copy" + (f"  peak {mem:8.0f} MiB" if memory else "") +
          ("  [CPU]" if device != "cuda" else ""), flush=True)
    return row


def copy_bandwidth(device, mb=256):
    """Measured copy bandwidth in GB/s (bytes read + bytes written)."""
    n = mb * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def gemm_tflops(device, n=8192):
    if device != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms, _, _ = time_fn(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_peaks(device, quick=False):
    """The device's measured peaks, once per run: copy GB/s (bytes read + written) and a large GEMM.

    On a GPU the GEMM is bf16 8192^3 (4096^3 with ``quick``); on the CPU it is fp32 1024^3 and the
    key says so (CPU bf16 GEMMs are emulated on many CPUs and would understate the peak)."""
    if device == "cuda":
        n = 4096 if quick else 8192
        return {"copy_gbps": copy_bandwidth(device, mb=256 if quick else 1024),
                "gemm_tflops": gemm_tflops(device, n=n), "gemm": f"bf16 {n}^3"}
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms, _, _ = time_fn(lambda: a @ b, device, min_run_time=0.2)
    return {"copy_gbps": copy_bandwidth(device, mb=64), "gemm_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
            "gemm": f"fp32 {n}^3 (CPU)"}


# Peers a user might compare with: name -> (import name, what it provides).
PEERS = {
    "flash_attn": ("flash_attn", "attention (FlashAttention-2/3)"),
    "flex_attention": ("torch.nn.attention.flex_attention", "attention (FlexAttention, torch.compile)"),
    "xformers": ("xformers", "attention (memory_efficient_attention)"),
    "liger_kernel": ("liger_kernel", "layer_norm, rms_norm, cross_entropy (Triton)"),
    "apex": ("apex", "layer_norm, rms_norm, softmax (CUDA)"),
    "quack": ("quack", "softmax, rms_norm, cross_entropy (CuTe DSL)"),
}


def peers():
    """{peer: (installed, note)}: which peers this environment has (they run only on a GPU)."""
    import importlib.util

    out = {}
    for name, (module, what) in PEERS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        out[name] = (found, what)
    return out


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def peak_memory_mb(fn, device):
    """Peak CUDA memory (MiB) above the baseline while fn() runs; NaN on the CPU (fn is not run there)."""
    if device != "cuda":
        return float("nan")
    from fasttfm.gpu_check._common import peak_memory_mib

    return peak_memory_mib(fn, device)


def write_results(rows, info, out_dir, stem, skipped=()):
    os.makedirs(out_dir, exist_ok=True)
    dicts = [{**dataclasses.asdict(r), **{k: v for k, v in info.items() if k != "device"}} for r in rows]
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"info": info, "skipped": list(skipped), "rows": dicts}, f, indent=1)
    if dicts:
        with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
            writer.writeheader()
            writer.writerows(dicts)
    lines = [f"# {stem} on {info['device']}", "",
             f"torch {info['torch']}, triton {info.get('triton')}, CUDA {info.get('cuda')}, commit {info.get('commit')}, "
             f"{info['timestamp']}", ""]
    lines += ["| provider | case | dtype | dir | ms (median) | GB/s | TFLOP/s | frac of peak | peak MB | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.provider} | {r.case} | {r.dtype} | {r.direction} | {r.ms:.4g} | {r.gbps:.4g} | "
                     f"{r.tflops:.4g} | {r.frac_peak:.3g} | {r.peak_mem_mb:.4g} | {r.note} |")
    if skipped:
        lines += ["", "Skipped providers/cases:"] + [f"- {s}" for s in skipped]
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def default_out():
    """bench/results/ of a source checkout; ./fasttfm-bench-results for an installed fasttfm (whose harness
    lives in site-packages/fasttfm/bench, no place for results)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(os.path.dirname(here), "setup.py")):
        return os.path.join(here, "results")
    return os.path.abspath("fasttfm-bench-results")


def add_common_args(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32,float16,bfloat16")
    parser.add_argument("--quick", action="store_true", help="a few small cases only")
    parser.add_argument("--out", default=default_out())
    return parser
