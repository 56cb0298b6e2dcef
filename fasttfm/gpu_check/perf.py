"""gpu-check phase ``perf``: fasttfm against the best kernels the machine has, side by side.

Sections, in order of value (each stops at the phase deadline; what did not run is recorded):

  peaks        a 1 GiB device copy (GB/s, bytes read + written) and an 8192^3 bf16 GEMM (TFLOP/s)
  attention    bf16 d128 (fp16 and d64 in attention_more), causal/full, fwd and fwd+bwd, N = 1k..16k with B*N = 16k and
               H*D = 2048 (FlashAttention's benchmark shapes); fasttfm vs SDPA with each backend
               forced (FLASH = FlashAttention-2, CUDNN_ATTENTION = cuDNN's Hopper kernel, EFFICIENT)
  membound     LayerNorm/RMSNorm/softmax (fwd, fwd+bwd) and cross-entropy (fwd+bwd) vs torch eager:
               GB/s from the minimum bytes and % of the measured copy bandwidth
  linear_ce    fused linear + cross-entropy vs F.linear + F.cross_entropy: time and peak memory
  decode       attention_with_kvcache vs SDPA over the valid cache (tokens/s, GB/s of cache read)
  attention_more  the attention grid again for fp16 d128, bf16 d64 and fp16 d64
  compile      the memory-bound ops vs torch.compile (one shape each: compiles are slow)
  flex         FlexAttention (torch.compile'd, block masks) vs fasttfm for causal/window/chunk

Timing: medians of ``triton.testing.do_bench`` (CUDA events) with 20/80% quantiles, one process,
providers of a case timed back to back on the same inputs, gradients reset between calls.
FLOPs: attention 4*B*H*D*(visible (q, k) pairs), fwd+bwd 3.5x the forward.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from ._common import free_cuda, guarded, left, peak_memory_mib, record

__all__ = ["SECTIONS", "attention_flops", "main"]

DEV = "cuda"  # tests run the sections on the CPU at toy sizes (TOKENS, HIDDEN, SCALE) to catch plumbing bugs
TOKENS, HIDDEN, SCALE = 16384, 2048, 1
SECTIONS = ["peaks", "attention", "membound", "linear_ce", "decode", "attention_more", "compile", "flex"]
PEAKS = {}


def _time(fn, grads=()):
    if DEV != "cuda":
        return _cpu_time(fn, grads)
    import triton.testing

    med, lo, hi = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.2, 0.8],
                                          grad_to_none=list(grads) or None)
    return float(med), float(lo), float(hi)


def _cpu_time(fn, grads):
    import time

    times = []
    for _ in range(3):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def peaks():
    n = 2**28 // SCALE  # 1 GiB of fp32
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    ms, _, _ = _time(lambda: dst.copy_(src))
    PEAKS["copy_gbps"] = 2 * n * 4 / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192 // SCALE
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    ms, _, _ = _time(lambda: a @ b)
    PEAKS["gemm_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
    record("perf", section="peaks", case="peaks", status="ok", **PEAKS)


def attention_flops(b, h, n, d, causal, direction):
    pairs = n * (n + 1) // 2 if causal else n * n
    f = 4.0 * b * h * d * pairs
    return f * (3.5 if direction == "fwd+bwd" else 1.0)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    out = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["sdpa_cudnn"] = SDPBackend.CUDNN_ATTENTION
    return out


def attention_case(dtype, d, n, causal, direction):
    import fasttfm
    from torch.nn.attention import sdpa_kernel

    b, h = max(1, TOKENS // n), max(1, HIDDEN // d)
    q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=dtype, requires_grad=direction != "fwd")
               for _ in range(3))
    do = torch.randn(b, h, n, d, device=DEV, dtype=dtype)
    flops = attention_flops(b, h, n, d, causal, direction)
    provs = {"fasttfm": lambda: fasttfm.attention(q, k, v, causal=causal)}
    for name in _sdpa_backends():
        provs[name] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    backends = _sdpa_backends()
    case = dict(section="attention", dtype=str(dtype)[6:], d=d, n=n, b=b, h=h, mask="causal" if causal else "full",
                dir=direction)
    for name, fn in provs.items():
        if left() < 3:
            return
        ctx = sdpa_kernel(backends[name]) if name in backends else _null()

        def step(fn=fn):
            out = fn()
            if direction == "fwd+bwd":
                out.backward(do)

        try:
            with ctx:
                with torch.no_grad() if direction == "fwd" else _null():
                    step()
                    ms, lo, hi = _time(step, grads=(q, k, v) if direction != "fwd" else ())
        except RuntimeError as exc:
            record("perf", provider=name, status="unsupported", why=str(exc).splitlines()[0][:200], **case)
            free_cuda()
            continue
        record("perf", provider=name, status="ok", ms=ms, ms_lo=lo, ms_hi=hi, tflops=flops / (ms * 1e-3) / 1e12,
               **case)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def attention_grid(quick, combos=((torch.bfloat16, 128),)):
    seqlens = [max(64, n // SCALE) for n in ([1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384])]
    for dtype, d in combos:
        for causal in (True, False):
            for direction in ("fwd", "fwd+bwd"):
                for n in seqlens:
                    if left() < 5:
                        return record("perf", section="attention", case="rest", status="skipped",
                                      why="phase budget exhausted")
                    guarded("perf", f"attention {dtype} d{d} N{n} causal={causal} {direction}",
                            lambda: attention_case(dtype, d, n, causal, direction))
                    free_cuda()


def attention_more(quick):
    """fp16 d128, then d64 (bf16, fp16): after the memory-bound ops, linear-CE and decode."""
    attention_grid(quick, [(torch.float16, 128), (torch.bfloat16, 64), (torch.float16, 64)][: 1 if quick else 3])


def _membound_fns(op, x, w, bb, target):
    """{provider: callable(x) -> output} for one memory-bound op."""
    import fasttfm

    cols = x.shape[-1]
    if op == "layer_norm":
        return {"fasttfm": lambda a: fasttfm.layer_norm(a, (cols,), w, bb),
                "torch": lambda a: F.layer_norm(a, (cols,), w, bb)}
    if op == "rms_norm":
        return {"fasttfm": lambda a: fasttfm.rms_norm(a, (cols,), w, 1e-6),
                "torch": lambda a: F.rms_norm(a, (cols,), w, 1e-6)}
    if op == "softmax":
        return {"fasttfm": lambda a: fasttfm.softmax(a, -1), "torch": lambda a: torch.softmax(a, -1)}
    return {"fasttfm": lambda a: fasttfm.cross_entropy(a, target, label_smoothing=0.1),
            "torch": lambda a: F.cross_entropy(a, target, label_smoothing=0.1)}


def membound_case(op, rows, cols, dtype, directions, providers=("fasttfm", "torch"), compiled=False):
    x = torch.randn(rows, cols, device=DEV, dtype=dtype)
    w = torch.randn(cols, device=DEV, dtype=dtype, requires_grad=True) if op != "cross_entropy" else None
    bb = torch.randn(cols, device=DEV, dtype=dtype, requires_grad=True) if op == "layer_norm" else None
    target = torch.randint(0, cols, (rows,), device=DEV) if op == "cross_entropy" else None
    fns = _membound_fns(op, x, w, bb, target)
    if compiled:
        fns = {"torch_compile": torch.compile(fns["torch"], dynamic=False), "fasttfm": fns["fasttfm"]}
    es = x.element_size()
    for direction in directions:
        # minimum bytes: fwd reads x and writes y (CE: reads the logits); bwd reads x (or y) and dy,
        # writes dx (CE: reads the logits, writes their gradient)
        mult = {"fwd": 1 if op == "cross_entropy" else 2, "fwd+bwd": 3 if op == "cross_entropy" else 5}[direction]
        nbytes = mult * x.numel() * es
        xg = x.detach().requires_grad_(direction != "fwd")
        dy = torch.randn_like(x) if op != "cross_entropy" else None
        for name, fn in fns.items():
            if name not in providers and not (compiled and name == "torch_compile"):
                continue
            if left() < 3:
                return

            def step(fn=fn):
                y = fn(xg)
                if direction == "fwd+bwd":
                    y.backward(dy) if dy is not None else y.backward()

            with torch.no_grad() if direction == "fwd" else _null():
                step()
                ms, lo, hi = _time(step, grads=[t for t in (xg, w, bb) if t is not None and direction != "fwd"])
            gbps = nbytes / (ms * 1e-3) / 1e9
            record("perf", section="compile" if compiled else "membound", op=op, provider=name, dtype=str(dtype)[6:],
                   rows=rows, cols=cols, dir=direction, status="ok", ms=ms, ms_lo=lo, ms_hi=hi, gbps=gbps,
                   frac_copy=gbps / PEAKS["copy_gbps"] if PEAKS.get("copy_gbps") else None)


def membound(quick):
    elems = (2**24 if quick else 2**26) // SCALE
    widths = [4096] if quick else [1024, 4096, 16384, 65536]
    for op in ("layer_norm", "rms_norm", "softmax"):
        for dtype in (torch.bfloat16, torch.float32):
            for cols in widths:
                if left() < 5:
                    return
                guarded("perf", f"{op} {dtype} {cols}",
                        lambda: membound_case(op, elems // cols, cols, dtype, ("fwd", "fwd+bwd")))
                free_cuda()
    for vocab in ([32000] if quick else [32000, 131072, 262144]):
        for dtype in (torch.bfloat16, torch.float32):
            if left() < 5:
                return
            guarded("perf", f"cross_entropy {dtype} V{vocab}",
                    lambda: membound_case("cross_entropy", max(4, (2**28 if not quick else 2**24) // SCALE // vocab),
                                          vocab, dtype, ("fwd+bwd",)))
            free_cuda()


def compile_section(quick):
    for op, cols in (("layer_norm", 4096), ("rms_norm", 4096), ("softmax", 4096), ("cross_entropy", 131072)):
        if left() < 25:
            return record("perf", section="compile", case="rest", status="skipped", why="phase budget exhausted")
        rows = max(4, ((2**24 if quick else 2**26) // cols if op != "cross_entropy" else 2048) // SCALE)
        guarded("perf", f"compile {op}", lambda: membound_case(op, rows, cols, torch.bfloat16,
                                                               ("fwd", "fwd+bwd") if op != "cross_entropy"
                                                               else ("fwd+bwd",), compiled=True))
        free_cuda()


def linear_ce(quick):
    import fasttfm

    bt, hid, vocab = (4096, 2048, 32000) if quick else (16384, 4096, 131072)
    bt, vocab = max(8, bt // SCALE), max(64, vocab // SCALE)
    h = torch.randn(bt, hid, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hid, device=DEV, dtype=torch.bfloat16) * hid ** -0.5).requires_grad_()
    t = torch.randint(0, vocab, (bt,), device=DEV)
    provs = {"fasttfm": lambda: fasttfm.linear_cross_entropy(h, w, t),
             "torch": lambda: F.cross_entropy(F.linear(h, w).float(), t)}
    for name, fn in provs.items():
        free_cuda()
        peak = peak_memory_mib(lambda: fn().backward(), DEV)
        ms, lo, hi = _time(lambda: fn().backward(), grads=(h, w))
        flops = 6.0 * bt * hid * vocab
        record("perf", section="linear_ce", provider=name, status="ok", bt=bt, hidden=hid, vocab=vocab, dtype="bfloat16",
               dir="fwd+bwd", ms=ms, ms_lo=lo, ms_hi=hi, peak_mib=peak, tflops=flops / (ms * 1e-3) / 1e12)


def decode(quick):
    import fasttfm

    hq, hkv, d = 32, 8, 128
    for bsz, length in ([(16, 4096)] if quick else [(1, 16384), (16, 4096), (16, 32768), (64, 8192)]):
        bsz, length = max(1, bsz // SCALE), max(16, length // SCALE)
        if left() < 5:
            return
        kc = torch.randn(bsz, length, hkv, d, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(bsz, 1, hq, d, device=DEV, dtype=torch.bfloat16)
        lens = torch.full((bsz,), length, dtype=torch.int32, device=DEV)
        qs, ks, vs = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        provs = {"fasttfm": lambda: fasttfm.attention_with_kvcache(q, kc, vc, lens, check_seqlens=False),
                 "torch_sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)}
        nbytes = 2 * kc.numel() * kc.element_size()
        for name, fn in provs.items():
            with torch.no_grad():
                fn()
                ms, lo, hi = _time(fn)
            record("perf", section="decode", provider=name, status="ok", batch=bsz, cache=length, hq=hq, hkv=hkv, d=d,
                   dtype="bfloat16", ms=ms, ms_lo=lo, ms_hi=hi, tokens_per_s=bsz / (ms * 1e-3),
                   gbps=nbytes / (ms * 1e-3) / 1e9)
        del kc, vc
        free_cuda()


def flex(quick):
    import fasttfm
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    n, d, dtype = max(128, 4096 // SCALE), 128, torch.bfloat16
    b, h = max(1, TOKENS // n), max(1, HIDDEN // d)
    masks = {
        "causal": (dict(causal=True), lambda bi, hi, qi, ki: qi >= ki),
        f"window{n // 4}": (dict(causal=True, window=(n // 4, 0)), lambda bi, hi, qi, ki: (qi >= ki) & (qi - ki <= n // 4)),
        f"chunk{n // 4}": (dict(chunk_size=n // 4), lambda bi, hi, qi, ki: (qi // (n // 4)) == (ki // (n // 4))),
    }
    for mname, (kw, mod) in masks.items():
        if left() < 30:
            return record("perf", section="flex", case="rest", status="skipped", why="phase budget exhausted")
        bm = create_block_mask(mod, None, None, n, n, device=DEV)
        visible = int(visible_pairs(n, mod))
        q, k, v = (torch.randn(b, h, n, d, device=DEV, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        provs = {"fasttfm": lambda: fasttfm.attention(q, k, v, **kw), "flex_compiled": lambda: compiled(q, k, v,
                                                                                                         block_mask=bm)}
        for direction in ("fwd", "fwd+bwd"):
            flops = 4.0 * b * h * d * visible * (3.5 if direction == "fwd+bwd" else 1.0)
            for name, fn in provs.items():
                def step(fn=fn):
                    out = fn()
                    if direction == "fwd+bwd":
                        out.backward(do)

                with torch.no_grad() if direction == "fwd" else _null():
                    step()
                    ms, lo, hi = _time(step, grads=(q, k, v) if direction != "fwd" else ())
                record("perf", section="flex", provider=name, status="ok", mask=mname, dtype="bfloat16", d=d, n=n, b=b,
                       h=h, dir=direction, ms=ms, ms_lo=lo, ms_hi=hi, tflops=flops / (ms * 1e-3) / 1e12)
        free_cuda()


def visible_pairs(n, mod):
    i = torch.arange(n, device=DEV)[:, None]
    j = torch.arange(n, device=DEV)[None, :]
    return mod(None, None, i, j).sum().item()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasttfm.gpu_check.perf")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sections", default=",".join(SECTIONS))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if DEV == "cuda" and not torch.cuda.is_available():
        record("perf", section="all", case="all", status="skipped", why="no CUDA device")
        return 0
    torch.manual_seed(0)
    funcs = {"peaks": peaks, "attention": attention_grid, "membound": membound, "linear_ce": linear_ce,
             "decode": decode, "attention_more": attention_more, "compile": compile_section, "flex": flex}
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if left() < 5:
            record("perf", section=name, case="all", status="skipped", why="phase budget exhausted")
            continue
        fn = funcs[name]
        guarded("perf", f"section {name}", fn if name == "peaks" else (lambda fn=fn: fn(args.quick)))
        free_cuda()
    return 0


if __name__ == "__main__":
    sys.exit(main())
