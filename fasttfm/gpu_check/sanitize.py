"""gpu-check phase ``sanitizer``: compute-sanitizer memcheck and racecheck, one small case per kernel family.

``python -m fasttfm.gpu_check.sanitize`` runs the driver below twice under compute-sanitizer
(``--tool memcheck``, then ``--tool racecheck``), each with a share of the phase's time. The driver
(``--cases``) runs each family forward and backward on small odd shapes: LayerNorm/RMSNorm
(vector, scalar odd-width and wide-row paths), softmax (last dim, strided dim, scaled/masked),
cross-entropy, fused linear cross-entropy, attention fwd/bwd (dense, varlen) and decode.
Where the tool is missing or refuses the device (gVisor: "Device not supported") the phase says
so and is recorded as skipped, not passed.
"""
import os
import shutil
import subprocess
import sys
import time

import torch

from ._common import left, record

__all__ = ["sanitizer_path", "run_cases", "main"]


def sanitizer_path():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from .._cuda_home import find_cuda_home

    home = find_cuda_home()
    for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
        path = os.path.join(home or "", rel)
        if home and os.path.isfile(path):
            return path
    return None


def run_cases(dev="cuda"):
    """One small case per kernel family, forward and backward (run under the sanitizer)."""
    import fasttfm

    torch.manual_seed(0)
    families = []

    def fam(name, fn):
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        families.append(name)
        print(f"sanitize case ok: {name}", flush=True)

    def norm(cols, dtype):
        x = torch.randn(37, cols, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(cols, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(cols, device=dev, dtype=dtype, requires_grad=True)
        fasttfm.layer_norm(x, (cols,), w, b).sum().backward()
        fasttfm.rms_norm(x, (cols,), w).sum().backward()

    fam("layer_norm/rms_norm vector", lambda: norm(1024, torch.bfloat16))
    fam("layer_norm/rms_norm scalar odd width", lambda: norm(1001, torch.float16))
    fam("layer_norm/rms_norm wide rows", lambda: norm(20000, torch.float32))

    def softmax():
        x = torch.randn(19, 3000, device=dev, dtype=torch.bfloat16, requires_grad=True)
        fasttfm.softmax(x, -1).sum().backward()
        y = torch.randn(7, 33, 5, device=dev, dtype=torch.float16, requires_grad=True)
        fasttfm.softmax(y, 1).sum().backward()
        s = torch.randn(2, 3, 50, 77, device=dev, dtype=torch.float16, requires_grad=True)
        m = torch.rand(2, 1, 50, 77, device=dev) > 0.3
        fasttfm.scaled_masked_softmax(s, m, scale=0.5).sum().backward()
        fasttfm.scaled_masked_softmax(s, None, scale=0.5, causal=True).sum().backward()

    fam("softmax", softmax)

    def ce():
        x = torch.randn(67, 5003, device=dev, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, 5003, (67,), device=dev)
        t[::5] = -100
        fasttfm.cross_entropy(x, t, label_smoothing=0.1).backward()
        h = torch.randn(67, 96, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(5003, 96, device=dev, dtype=torch.bfloat16, requires_grad=True)
        fasttfm.linear_cross_entropy(h, w, t).backward()

    fam("cross_entropy + linear_cross_entropy", ce)

    def attn():
        q = torch.randn(2, 4, 193, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, 2, 193, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(2, 2, 193, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        fasttfm.attention(q, k, v, causal=True).sum().backward()
        cu = torch.tensor([0, 70, 193], dtype=torch.int32, device=dev)
        qv = torch.randn(193, 4, 128, device=dev, dtype=torch.float16, requires_grad=True)
        kv = torch.randn(193, 4, 128, device=dev, dtype=torch.float16, requires_grad=True)
        fasttfm.attention(qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=123, max_seqlen_k=123,
                          window=(33, 0)).sum().backward()

    fam("attention fwd/bwd", attn)

    def decode():
        kc = torch.randn(3, 300, 2, 64, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(3, 1, 8, 64, device=dev, dtype=torch.bfloat16)
        lens = torch.tensor([5, 299, 150], dtype=torch.int32, device=dev)
        fasttfm.attention_with_kvcache(q, kc, vc, lens, causal=True)

    fam("attention decode", decode)
    return families


def _run_tool(tool, exe, budget):
    cmd = [exe, "--tool", tool, "--error-exitcode", "17", "--print-limit", "20", sys.executable, "-m",
           "fasttfm.gpu_check.sanitize", "--cases"]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, budget))
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or "") if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        done = [ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("sanitize case ok: ")]
        return record("sanitizer", case=tool, status="timeout", seconds=round(time.time() - t0, 1),
                      families_done=done, why=f"over its {budget:.0f} s share")
    text = out.stdout + out.stderr
    print(text[-6000:], flush=True)
    done = [ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("sanitize case ok: ")]
    summary = [ln for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
    # "does not work here" only when the tool refused the device or never got the driver going: a
    # Python traceback from the cases is a failure of fasttfm, not of the tool
    refused = "Device not supported" in text or (not done and "Traceback" not in text
                                                 and out.returncode not in (0, 17))
    if refused:
        last = text.strip().splitlines()[-1][:300] if text.strip() else "no output"
        return record("sanitizer", case=tool, status="skipped", why="compute-sanitizer does not work here: " + last)
    status = "ok" if out.returncode == 0 else ("failed" if out.returncode == 17 else "error")
    return record("sanitizer", case=tool, status=status, rc=out.returncode, seconds=round(time.time() - t0, 1),
                  families_done=done, summary=summary[-3:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--cases" in argv:
        run_cases()
        return 0
    if not torch.cuda.is_available():
        record("sanitizer", case="all", status="skipped", why="no CUDA device")
        return 0
    exe = sanitizer_path()
    if not exe:
        record("sanitizer", case="all", status="skipped", why="compute-sanitizer not found (PATH, CUDA toolkit)")
        return 0
    bad = 0
    tools = ["memcheck", "racecheck"]
    for i, tool in enumerate(tools):
        share = left() / (len(tools) - i)
        rec = _run_tool(tool, exe, share - 2)
        bad += rec["status"] in ("failed", "error")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
