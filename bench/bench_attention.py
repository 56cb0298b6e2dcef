"""Attention benchmark: fasttfm vs PyTorch SDPA (and FlexAttention / flash-attn when present).

    python bench/bench_attention.py [--dtype bf16] [--d 64 128] [--mode fwd fwd_bwd] [--out results.csv]
    python bench/bench_attention.py --masks causal causal+softcap causal+alibi causal+dropout
    python bench/bench_attention.py --masks pad causal_pad     (padded batch: key_padding_mask vs varlen)
    python bench/bench_attention.py --decode [--cache 1024 4096 16384 65536] [--batch 1 16]

FLOPs (ANCHORS.md convention): forward 4 * B * H * D * visible(q, k) pairs, backward 2.5x forward;
visible pairs are counted exactly from the mask (causal/window/chunk), so masked work is not
credited. On a GPU: ``triton.testing.do_bench`` medians with 20/80% quantiles; on the CPU
``torch.utils.benchmark`` (labelled CPU; fasttfm's CPU path is the reference path, not a kernel).
Providers that are not installed, or that refuse a shape, are listed as skipped with the reason.

Providers (each its own row): ``fasttfm``; ``torch_sdpa`` (SDPA's own dispatch); SDPA with one
backend forced through ``torch.nn.attention.sdpa_kernel``: ``sdpa_flash`` (FlashAttention-2 in
torch), ``sdpa_cudnn`` (cuDNN, the FA3-class kernel on Hopper), ``sdpa_efficient`` (xformers'
kernel), ``sdpa_math`` (only up to --math-max tokens: it materializes N x N); ``flex`` (FlexAttention
under torch.compile with the block mask of the case: causal, window, chunk, document mask for
``doc4``, GQA through enable_gqa; the first call's compile time is the ``compile_s`` column, apart
from the timed runs); ``flash_attn`` when installed. SDPA rows join only where SDPA expresses the
mask without a dense attn_mask (none, causal). The forced SDPA backends and FlexAttention are GPU
providers: on a CPU machine they are reported as skipped with that reason. ``peak_mem_mb``: peak
CUDA memory above the inputs while the provider runs (NaN on the CPU). ``--gqa G``: Hkv = H / G.
Mask ``doc4``: four equal documents packed in each sequence (fasttfm: varlen cu_seqlens; flex:
a document mask; flash_attn: its varlen function). After the rows a summary table puts each
fasttfm row beside the fastest other provider of the same case and prints the ratio
(other ms / fasttfm ms; > 1 means fasttfm is faster).

Padded batches (masks ``pad`` and ``causal_pad``): sequence i of the batch holds
n - (n / 2) * (i + 1) / B valid tokens (from 1 - 1/(2B) of n down to half; B = 1 on the CPU: half),
right-padded. ``fasttfm`` runs the padded (B, H, n, D) batch with ``key_padding_mask`` (padded kv
tiles skipped inside the kernel), ``fasttfm_unpadded`` the same tokens packed beforehand
(varlen ``cu_seqlens``; the unpad/pad copies are not timed: its best case), ``torch_sdpa`` SDPA
with the equivalent (B, 1, 1, n) boolean mask (a dense-mask path). FLOPs count the useful work only:
visible pairs of valid queries and keys.

Score modifiers (``+softcap`` 30.0, ``+alibi`` per-head slopes, ``+dropout`` p = 0.1) are rows of
their own; SDPA joins only where it has the feature (dropout). ``--decode``: one new token per
sequence against a KV cache (Hq 32, Hkv 8: GQA 4), fasttfm.attention_with_kvcache (split-K), the
same through a paged cache (``fasttfm_paged``, 256-token pages in shuffled order), SDPA on the
valid cache prefix, FlexAttention decoding (compiled, GPU only) and flash-attn's paged
``flash_attn_with_kvcache`` when installed; reported as tokens/s (batch / time) and GB/s of K/V
cache read (2 * B * L * Hkv * D * bytes / time; HBM3 peak 3.35 TB/s on H100).
"""
import argparse
import csv
import datetime
import math
import os
import platform
import sys
import time

import torch

if not __package__:  # run as a script (python bench/bench_attention.py): the checkout's root on the path (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"
from fasttfm.ops.attention import attention  # noqa: E402
from fasttfm.ops.attention_decode import attention_with_kvcache  # noqa: E402
from .common import peak_memory_mb  # noqa: E402

GPU_ONLY = "GPU provider: this machine has no CUDA device"
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
DOCS = 4  # documents per sequence for the doc4 mask


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


def pad_lengths(b, n):
    """Valid tokens per sequence of a padded batch: n - (n // 2) * (i + 1) // b for i < b."""
    return [n - (n // 2) * (i + 1) // b for i in range(b)]


def padded_providers(causal, lens, skipped):
    """{name: fn(q, k, v)} for a right-padded batch with valid lengths ``lens`` (see module docstring)."""
    def kpm_of(q):
        return torch.arange(q.shape[2], device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]

    out = {"fasttfm": lambda q, k, v: attention(q, k, v, causal=causal, key_padding_mask=kpm_of(q)),
           "fasttfm_unpadded": _Unpadded(causal, lens),
           "torch_sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
               q, k, v, attn_mask=_sdpa_pad_mask(kpm_of(q), causal), enable_gqa=k.shape[1] != q.shape[1])}
    skipped.append("sdpa backends, flex, flash_attn: padded rows compare fasttfm (mask), fasttfm varlen and SDPA")
    return out


class _Unpadded:
    """fasttfm varlen on the valid tokens, packed once per input set outside the timed runs;
    ``grad_run`` differentiates w.r.t. the packed tensors (the padded ones are not its inputs)."""

    def __init__(self, causal, lens):
        self.causal, self.lens, self.key, self.packed = causal, lens, None, None

    def _pack(self, q, k, v):
        key = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if key != self.key:
            lens = self.lens
            cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=q.device)
            pk = [torch.cat([t[i, :, :lens[i]].transpose(0, 1) for i in range(len(lens))]).detach()
                  .requires_grad_(t.requires_grad) for t in (q, k, v)]
            self.key, self.packed = key, (cu, pk)
            self.do = torch.randn_like(pk[0])
        return self.packed

    def __call__(self, q, k, v):
        cu, pk = self._pack(q, k, v)
        m = max(self.lens)
        return attention(*pk, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m, causal=self.causal)

    def grad_run(self, q, k, v, do):
        return torch.autograd.grad(self(q, k, v), self.packed[1], self.do)


def _sdpa_pad_mask(kpm, causal):
    """SDPA boolean mask (B, 1, n, n) or (B, 1, 1, n) of a key padding mask (True = attend)."""
    m = kpm[:, None, None, :]
    if causal:
        n = kpm.shape[1]
        m = m & torch.ones(n, n, dtype=torch.bool, device=kpm.device).tril()
    return m


def providers(causal, window, chunk, mods=None, dev="cpu", n=0, doc=False, math_max=2048, skipped=None):
    """{name: fn(q, k, v)} for one case; names refused up front go to ``skipped`` with the reason."""
    mods = mods or {}
    skipped = skipped if skipped is not None else []
    out = {}

    def fast(q, k, v):
        kw = dict(mods)
        if "alibi_slopes" in kw:
            kw["alibi_slopes"] = kw["alibi_slopes"](q.shape[1], q.device)
        if doc:  # (B, H, N, D) -> packed (B * N, H, D) documents of N / DOCS tokens
            cu = _doc_cu(q.shape[0], q.shape[2], q.device)
            pk = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
            return attention(*pk, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=q.shape[2] // DOCS,
                             max_seqlen_k=q.shape[2] // DOCS, causal=causal, window=window, chunk_size=chunk, **kw)
        return attention(q, k, v, causal=causal, window=window, chunk_size=chunk, **kw)

    out["fasttfm"] = fast
    sdpa_ok = window == (-1, -1) and chunk is None and not doc and set(mods) <= {"dropout_p"}
    p = mods.get("dropout_p", 0.0)
    why_not_sdpa = "SDPA has no window/chunk/document mask without a dense attn_mask, nor softcap/ALiBi"
    if sdpa_ok:
        out["torch_sdpa"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=p, enable_gqa=k.shape[1] != q.shape[1])
    for name, backend in SDPA_BACKENDS.items():
        if not sdpa_ok:
            skipped.append(f"{name}: {why_not_sdpa}")
        elif dev != "cuda":
            skipped.append(f"{name}: {GPU_ONLY}")
        elif backend == "MATH" and n > math_max:
            skipped.append(f"{name} n={n}: MATH materializes N x N scores; run only up to --math-max {math_max}")
        else:
            out[name] = _forced_sdpa(backend, causal, p)
    if mods:
        skipped.append("flex, flash_attn: score-modifier rows compare with SDPA only")
        return out
    if dev != "cuda":
        skipped.append(f"flex: {GPU_ONLY} (FlexAttention compiles Triton kernels)")
    else:
        out["flex"] = _FlexProvider(causal, window, chunk, doc)
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        def fa(q, k, v):
            if doc:
                cu = _doc_cu(q.shape[0], q.shape[2], q.device)
                pk = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
                m = q.shape[2] // DOCS
                return flash_attn_varlen_func(*pk, cu, cu, m, m, causal=causal, window_size=window)
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                   window_size=window)
        if chunk is None:
            out["flash_attn"] = fa
        else:
            skipped.append("flash_attn: no chunked mask")
    except ImportError:
        skipped.append("flash_attn: not installed")
    return out


def _doc_cu(b, n, device):
    return torch.arange(0, b * n + 1, n // DOCS, dtype=torch.int32, device=device)


def _forced_sdpa(backend, causal, p):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p,
                                                                    enable_gqa=k.shape[1] != q.shape[1])
    return fn


class _FlexProvider:
    """flex_attention under torch.compile with the case's block mask (built once per shape); the first
    call's wall time (compile + run) is kept in ``compile_s``."""

    def __init__(self, causal, window, chunk, doc):
        self.causal, self.window, self.chunk, self.doc = causal, window, chunk, doc
        self.compiled = None
        self.masks = {}
        self.compile_s = float("nan")

    def mask_mod(self, n):
        left, right = self.window
        right = 0 if self.causal else right
        chunk, doc = self.chunk, self.doc

        def mod(b, h, i, j):
            ok = (i == i)
            if left >= 0:
                ok = ok & (j >= i - left)
            if right >= 0:
                ok = ok & (j <= i + right)
            if chunk:
                ok = ok & (i // chunk == j // chunk)
            if doc:
                ok = ok & (i // (n // DOCS) == j // (n // DOCS))
            return ok
        return mod

    def __call__(self, q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = q.shape[2]
        if n not in self.masks:
            self.masks[n] = create_block_mask(self.mask_mod(n), None, None, n, n, device=q.device)
        first = self.compiled is None
        if first:
            self.compiled = torch.compile(flex_attention)
            t0 = time.perf_counter()
        out = self.compiled(q, k, v, block_mask=self.masks[n], enable_gqa=k.shape[1] != q.shape[1])
        if first:
            torch.cuda.synchronize()
            self.compile_s = time.perf_counter() - t0
        return out


def summary_table(rows, key_fields):
    """Markdown: per case, fasttfm beside the fastest other provider and the ratio other / fasttfm."""
    cases = {}
    for r in rows:
        cases.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    lines = ["| " + " | ".join(key_fields) + " | fasttfm ms | best other | its ms | ratio (other / fasttfm) |",
             "|" + "---|" * (len(key_fields) + 4)]
    for key, rs in cases.items():
        ours = [r for r in rs if r["provider"] == "fasttfm"]
        others = [r for r in rs if r["provider"] != "fasttfm" and not r["provider"].startswith("fasttfm")]
        if not ours:
            continue
        best = min(others, key=lambda r: r["ms"]) if others else None
        ratio = f"{best['ms'] / ours[0]['ms']:.2f}" if best else "n/a"
        lines.append("| " + " | ".join(str(x) for x in key) + f" | {ours[0]['ms']:.4g} | "
                     f"{best['provider'] if best else 'none'} | {best['ms'] if best else float('nan'):.4g} | {ratio} |")
    return "\n".join(lines)


def time_ms(fn):
    if torch.cuda.is_available():
        import triton

        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return m.median * 1e3, m.median * 1e3, m.median * 1e3


def main(argv=None):
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
    ap.add_argument("--gqa", type=int, default=1, help="query heads per k/v head (Hkv = H / gqa)")
    ap.add_argument("--math-max", type=int, default=2048, help="sdpa_math only up to this many tokens")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    seqlens = args.seqlens or ([512, 1024, 2048, 4096, 8192, 16384] if dev == "cuda" else [256, 512])
    masks = {"none": (False, (-1, -1), None), "causal": (True, (-1, -1), None),
             "window1k": (True, (1024, -1), None), "chunk1k": (True, (-1, -1), 1024), "doc4": (True, (-1, -1), None),
             "pad": (False, (-1, -1), None), "causal_pad": (True, (-1, -1), None)}
    mod_kw = {"softcap": dict(softcap=30.0), "dropout": dict(dropout_p=0.1),
              "alibi": dict(alibi_slopes=lambda h, dev: 2.0 ** -(8.0 * (torch.arange(h, device=dev) + 1) / h))}
    if args.decode:
        return bench_decode(args, dev, dtype)
    rows, skipped = [], []
    device = torch.cuda.get_device_name() if dev == "cuda" else f"CPU {platform.processor()}"
    for d, n, mname, mode in ((d, n, m, mo) for d in args.d for n in seqlens for m in args.masks for mo in args.mode):
        base, *mods = mname.split("+")
        causal, window, chunk = masks[base]
        doc = base == "doc4"
        mods = {k: v for m in mods for k, v in mod_kw[m].items()}
        h = 2048 // d
        hkv = max(1, h // args.gqa)
        b = max(1, 16384 // n) if dev == "cuda" else 1
        q = torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=mode != "fwd")
        k, v = (torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=mode != "fwd") for _ in range(2))
        pad = base.endswith("pad")
        pairs = b * DOCS * visible_pairs(n // DOCS, n // DOCS, causal, window, chunk) if doc else \
            sum(visible_pairs(m, m, causal, window, chunk) for m in pad_lengths(b, n)) if pad else \
            b * visible_pairs(n, n, causal, window, chunk)
        flops = 4 * h * d * pairs * (3.5 if mode == "fwd_bwd" else 1.0)
        case_skips = []
        if pad:
            provs = padded_providers(causal, pad_lengths(b, n), case_skips)
        else:
            provs = providers(causal, window, chunk, mods, dev=dev, n=n, doc=doc, math_max=args.math_max,
                              skipped=case_skips)
        skipped += [f"{s_} [d={d} n={n} {mname} {mode}]" for s_ in case_skips]
        for name, fn in provs.items():
            if mode == "fwd":
                run = lambda fn=fn: fn(q, k, v)  # noqa: E731
            else:
                do = torch.randn(b, h, n, d, device=dev, dtype=dtype)
                run = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
                if hasattr(fn, "grad_run"):
                    run = lambda fn=fn: fn.grad_run(q, k, v, do)  # noqa: E731
            try:
                if isinstance(fn, _FlexProvider) or hasattr(fn, "compile_s"):
                    run()  # compile outside the timed runs
                med, lo, hi = time_ms(run)
                mem = peak_memory_mb(run, dev)
            except Exception as exc:  # a provider that rejects the shape is reported, not dropped
                why = str(exc).splitlines()[0][:200] if str(exc) else ""
                skipped.append(f"{name} [d={d} n={n} {mname} {mode}]: {type(exc).__name__}: {why}")
                print(f"skipped {skipped[-1]}")
                continue
            row = dict(provider=name, device=device, dtype=args.dtype, d=d, seqlen=n, batch=b, heads=h, hkv=hkv,
                       mask=mname, mode=mode, ms=round(med, 4), ms_p20=round(lo, 4), ms_p80=round(hi, 4),
                       tflops=round(flops / med / 1e9, 2), peak_mem_mb=round(mem, 1) if not math.isnan(mem) else mem,
                       compile_s=round(getattr(fn, "compile_s", float("nan")), 2),
                       torch=torch.__version__, timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
            rows.append(row)
            print(row)
    report(args.out, rows, skipped, ["d", "seqlen", "mask", "mode"])
    return rows


def report(path, rows, skipped, key_fields):
    """CSV rows, then the skipped list and the fasttfm-vs-best-other table (also beside the CSV as .md)."""
    write_csv(path, rows)
    for s_ in dict.fromkeys(skipped):
        print(f"skipped: {s_}")
    table = summary_table(rows, key_fields) if rows else ""
    print(table)
    if path:
        with open(path.rsplit(".", 1)[0] + "_summary.md", "w") as f:
            f.write(table + "\n\nSkipped:\n" + "".join(f"- {s_}\n" for s_ in dict.fromkeys(skipped)))


def write_csv(path, rows):
    if path and rows:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def bench_decode(args, dev, dtype):
    """One new token per sequence (append + attend) at cache lengths L, GQA 32/8, per head dim."""
    rows, skipped = [], []
    caches = args.cache or ([1024, 4096, 16384, 65536] if dev == "cuda" else [256, 1024])
    hq, hkv, page = 32, 8, 256
    device = torch.cuda.get_device_name() if dev == "cuda" else f"CPU {platform.processor()}"
    flex = None
    if dev != "cuda":
        skipped.append(f"flex (decode): {GPU_ONLY} (FlexAttention compiles Triton kernels)")
    try:
        from flash_attn import flash_attn_with_kvcache as fa_kvcache
    except ImportError:
        fa_kvcache = None
        skipped.append("flash_attn (paged decode): not installed")
    for d, L, b in ((d, L, b) for d in args.d for L in caches for b in args.batch):
        s_max = L + 1
        kc, vc = (torch.randn(b, s_max, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
        kn, vn = (torch.randn(b, 1, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        seq = torch.full((b,), L, dtype=torch.int32, device=dev)
        bytes_read = 2 * b * (L + 1) * hkv * d * kc.element_size()
        kt, vt = kc[:, :L + 1].transpose(1, 2), vc[:, :L + 1].transpose(1, 2)  # SDPA's (B, H, S, D) views
        # the same cache in shuffled 256-token pages
        n_pages = -(-s_max // page)
        table = torch.randperm(b * n_pages, device=dev).to(torch.int32).reshape(b, n_pages)
        kp, vp = (torch.zeros(b * n_pages, page, hkv, d, device=dev, dtype=dtype) for _ in range(2))
        provs = {
            "fasttfm": lambda: attention_with_kvcache(q, kc, vc, seq, kn, vn, check_seqlens=False),
            "fasttfm_paged": lambda: attention_with_kvcache(q, kp, vp, seq, kn, vn, check_seqlens=False,
                                                            block_table=table),
            "torch_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kt, vt, enable_gqa=True),
        }
        if dev == "cuda":
            from torch.nn.attention.flex_attention import flex_attention

            flex = flex or torch.compile(flex_attention)
            provs["flex"] = lambda: flex(q.transpose(1, 2), kt, vt, enable_gqa=True)
        if fa_kvcache is not None:
            provs["flash_attn_paged"] = lambda: fa_kvcache(q, kp, vp, kn, vn, cache_seqlens=seq, block_table=table)
        for name, fn in provs.items():
            with torch.inference_mode():
                try:
                    t0 = time.perf_counter()
                    fn()  # warm-up: compiles where the provider compiles
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    med, lo, hi = time_ms(fn)
                    mem = peak_memory_mb(fn, dev)
                except Exception as exc:
                    why = str(exc).splitlines()[0][:200] if str(exc) else ""
                    skipped.append(f"{name} [decode d={d} L={L} b={b}]: {type(exc).__name__}: {why}")
                    print(f"skipped {skipped[-1]}")
                    continue
            row = dict(provider=name, device=device, dtype=args.dtype, d=d, cache_len=L, batch=b, heads=f"{hq}/{hkv}",
                       mode="decode", ms=round(med, 4), ms_p20=round(lo, 4), ms_p80=round(hi, 4),
                       tokens_per_s=round(b / (med * 1e-3), 1), cache_gbps=round(bytes_read / (med * 1e-3) / 1e9, 1),
                       peak_mem_mb=round(mem, 1) if not math.isnan(mem) else mem,
                       compile_s=round(first_s, 2) if name == "flex" else float("nan"),
                       torch=torch.__version__, timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
            rows.append(row)
            print(row)
    report(args.out, rows, skipped, ["d", "cache_len", "batch"])
    return rows


if __name__ == "__main__":
    main()
