"""Attention benchmark: fasttfm vs PyTorch SDPA (and FlexAttention / flash-attn when present).

    python bench/bench_attention.py [--dtype bf16] [--d 64 128] [--mode fwd fwd_bwd] [--out results.csv]
    python bench/bench_attention.py --masks causal causal+softcap causal+alibi causal+dropout
    python bench/bench_attention.py --decode [--cache 1024 4096 16384 65536] [--batch 1 16]

FLOPs (ANCHORS.md convention): forward 4 * B * H * D * visible(q, k) pairs, backward 2.5x forward;
visible pairs are counted exactly from the mask (causal/window/chunk), so masked work is not
credited. On a GPU: ``triton.testing.do_bench`` medians with 20/80% quantiles; on the CPU
``torch.utils.benchmark`` (labelled CPU; fasttfm's CPU path is the reference path, not a kernel).
Providers that are not installed are listed as skipped.

Score modifiers (``+softcap`` 30.0, ``+alibi`` per-head slopes, ``+dropout`` p = 0.1) are rows of
their own; SDPA joins only where it has the feature (dropout). ``--decode``: one new token per
sequence against a KV cache (Hq 32, Hkv 8: GQA 4), fasttfm.attention_with_kvcache (split-K) vs SDPA on
the valid cache prefix; reported as tokens/s (batch / time) and GB/s of K/V cache read
(2 * B * L * Hkv * D * bytes / time; HBM3 peak 3.35 TB/s on H100).
"""
import argparse
import csv
import datetime
import platform
import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from fasttfm.ops.attention import attention  # noqa: E402
from fasttfm.ops.attention_decode import attention_with_kvcache  # noqa: E402


def visible_pairs(nq, nk, causal, window, chunk):
    """Exact number of visible (q, k) pairs, row by row (bottom-right aligned)."""
    total = 0
    left, right = window
    right = 0 if causal else right
    for i in range(nq):
        p = i + nk - nq
        lo, hi = (0 if left < 0 else max(0, p - left)), (nk - 1 if right < 0 else min(nk - 1, p + right))
        if chunk:
            lo, hi = max(lo, (p // chunk) * chunk), min(hi, (p // chunk) * chunk + chunk - 1)
        total += max(0, hi - lo + 1)
    return total


def providers(causal, window, chunk, mods=None):
    mods = mods or {}
    out = {}

    def fast(q, k, v):
        kw = dict(mods)
        if "alibi_slopes" in kw:
            kw["alibi_slopes"] = kw["alibi_slopes"](q.shape[1], q.device)
        return attention(q, k, v, causal=causal, window=window, chunk_size=chunk, **kw)

    out["fasttfm"] = fast
    if window == (-1, -1) and chunk is None and set(mods) <= {"dropout_p"}:
        p = mods.get("dropout_p", 0.0)
        out["torch_sdpa"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=p)
    if mods:
        return out
    try:
        from flash_attn import flash_attn_func

        out["flash_attn"] = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            causal=causal, window_size=window)
    except ImportError:
        print("skipped provider flash_attn (not installed)")
    return out


def time_ms(fn):
    if torch.cuda.is_available():
        import triton

        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return m.median * 1e3, m.median * 1e3, m.median * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=None)
    ap.add_argument("--mode", nargs="+", default=["fwd", "fwd_bwd"])
    ap.add_argument("--masks", nargs="+", default=["none", "causal", "window1k", "chunk1k"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--decode", action="store_true", help="KV-cache decoding rows instead")
    ap.add_argument("--cache", type=int, nargs="+", default=None, help="decode: valid cache lengths")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="decode: batch sizes")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    seqlens = args.seqlens or ([512, 1024, 2048, 4096, 8192, 16384] if dev == "cuda" else [256, 512])
    masks = {"none": (False, (-1, -1), None), "causal": (True, (-1, -1), None),
             "window1k": (True, (1024, -1), None), "chunk1k": (True, (-1, -1), 1024)}
    mod_kw = {"softcap": dict(softcap=30.0), "dropout": dict(dropout_p=0.1),
              "alibi": dict(alibi_slopes=lambda h, dev: 2.0 ** -(8.0 * (torch.arange(h, device=dev) + 1) / h))}
    if args.decode:
        return bench_decode(args, dev, dtype)
    rows = []
    for d, n, mname, mode in ((d, n, m, mo) for d in args.d for n in seqlens for m in args.masks for mo in args.mode):
        base, *mods = mname.split("+")
        causal, window, chunk = masks[base]
        mods = {k: v for m in mods for k, v in mod_kw[m].items()}
        h = 2048 // d
        b = max(1, 16384 // n) if dev == "cuda" else 1
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=mode != "fwd") for _ in range(3))
        flops = 4 * b * h * d * visible_pairs(n, n, causal, window, chunk) * (3.5 if mode == "fwd_bwd" else 1.0)
        for name, fn in providers(causal, window, chunk, mods).items():
            if mode == "fwd":
                run = lambda fn=fn: fn(q, k, v)  # noqa: E731
            else:
                do = torch.randn(b, h, n, d, device=dev, dtype=dtype)
                run = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
            try:
                med, lo, hi = time_ms(run)
            except Exception as exc:  # a provider that rejects the shape is reported, not dropped
                print(f"skipped {name} d={d} n={n} {mname} {mode}: {exc}")
                continue
            row = dict(provider=name, device=torch.cuda.get_device_name() if dev == "cuda" else f"CPU {platform.processor()}",
                       dtype=args.dtype, d=d, seqlen=n, batch=b, heads=h, mask=mname, mode=mode, ms=round(med, 4),
                       ms_p20=round(lo, 4), ms_p80=round(hi, 4), tflops=round(flops / med / 1e9, 2),
                       torch=torch.__version__, timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
            rows.append(row)
            print(row)
    write_csv(args.out, rows)


def write_csv(path, rows):
    if path and rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def bench_decode(args, dev, dtype):
    """One new token per sequence (append + attend) at cache lengths L, GQA 32/8, per head dim."""
    rows = []
    caches = args.cache or ([1024, 4096, 16384, 65536] if dev == "cuda" else [256, 1024])
    hq, hkv = 32, 8
    for d, L, b in ((d, L, b) for d in args.d for L in caches for b in args.batch):
        s_max = L + 1
        kc, vc = (torch.randn(b, s_max, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
        kn, vn = (torch.randn(b, 1, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        seq = torch.full((b,), L, dtype=torch.int32, device=dev)
        bytes_read = 2 * b * (L + 1) * hkv * d * kc.element_size()
        kt, vt = kc[:, :L + 1].transpose(1, 2), vc[:, :L + 1].transpose(1, 2)  # SDPA's (B, H, S, D) views
        provs = {
            "fasttfm": lambda: attention_with_kvcache(q, kc, vc, seq, kn, vn, check_seqlens=False),
            "torch_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kt, vt, enable_gqa=True),
        }
        for name, fn in provs.items():
            with torch.inference_mode():
                try:
                    med, lo, hi = time_ms(fn)
                except Exception as exc:
                    print(f"skipped {name} decode d={d} L={L} b={b}: {exc}")
                    continue
            row = dict(provider=name, device=torch.cuda.get_device_name() if dev == "cuda" else f"CPU {platform.processor()}",
                       dtype=args.dtype, d=d, cache_len=L, batch=b, heads=f"{hq}/{hkv}", mode="decode",
                       ms=round(med, 4), ms_p20=round(lo, 4), ms_p80=round(hi, 4),
                       tokens_per_s=round(b / (med * 1e-3), 1), cache_gbps=round(bytes_read / (med * 1e-3) / 1e9, 1),
                       torch=torch.__version__, timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
            rows.append(row)
            print(row)
    write_csv(args.out, rows)


if __name__ == "__main__":
    main()
