"""Training throughput of the small GPT (fasttfm/model.py): tokens/s and peak memory per provider.

``python bench/bench_train.py [--preset cpu|gpu|tiny] [--seqlens 64 128] [--steps N] [--quick] [--out DIR]``
(or ``python -m fasttfm bench train``).

Providers, on the same preset, batch and initial weights: ``fasttfm`` (GPT(kernels="fasttfm"):
fasttfm attention + norms), ``torch`` (GPT(kernels="torch"): F.scaled_dot_product_attention +
torch.nn norms), and both under ``torch.compile`` (``+compile``). One step = forward + loss +
backward + AdamW step (+ autocast as the preset says: bf16 on a GPU, fp32 on the CPU), on random
token ids of the corpus' vocabulary size (65, char-level Shakespeare) so data loading is not timed.

tokens/s = batch_size * seq_len / median step time. The TFLOP/s column is the usual model-FLOPs
estimate per token, 6 * params + 6 * n_layer * d_model * seq_len (the attention term is PaLM's
12 * L * d * T halved for the causal mask), times tokens/s; frac_peak divides it by the GEMM peak
measured at the start (bf16 on a GPU, fp32 on the CPU). ``--dtype`` does not apply: the preset's
autocast setting does. The CPU default is one thread (steadier on a shared machine). Peak memory
(GPU only) is the allocator's high-water mark over one step above what was allocated before it
(parameters and optimizer state are not counted; activations and gradients are).
On the CPU the rows say CPU; torch.compile is skipped with ``--quick`` there (inductor's C++
compile takes minutes on a small CPU) and tried otherwise.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

if not __package__:  # run as a script (python bench/bench_train.py): the checkout's root on the path (PEP 366)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from .common import Row, add_common_args, device_info, measure_peaks, peak_memory_mb, write_results  # noqa: E402
from fasttfm.model import GPT, attention_available  # noqa: E402
from fasttfm.train import preset  # noqa: E402

VOCAB = 65  # tiny Shakespeare, char-level


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(cfg, kernels, compile_, device, seq_len):
    """A closure running one optimizer step, its model's parameter count and the model config."""
    mcfg = replace(cfg.model_config(VOCAB), max_seq_len=max(seq_len, cfg.max_seq_len), dropout=0.0)
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg, kernels=kernels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device == "cuda")
    fwd = torch.compile(model) if compile_ else model
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device == "cuda" else "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    g = torch.Generator().manual_seed(cfg.seed)
    batches = [torch.randint(0, VOCAB, (cfg.batch_size, seq_len + 1), generator=g).to(device) for _ in range(4)]
    k = [0]

    def step():
        b = batches[k[0] % len(batches)]
        k[0] += 1
        ctx = torch.autocast(device, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            _, loss = fwd(b[:, :-1], b[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model.num_params(), mcfg, amp


def time_steps(step, device, warmup, steps):
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def model_flops_per_token(n_params, mcfg, seq_len):
    return 6 * n_params + 6 * mcfg.n_layer * mcfg.d_model * seq_len


def run(args):
    device = args.device
    name = args.preset or ("gpu" if device == "cuda" else "cpu")
    cfg = preset(name, device=device)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    seqlens = [int(s) for s in str(args.seqlens).replace(",", " ").split()] if args.seqlens else [cfg.max_seq_len]
    warmup, steps = (2, 5) if args.quick else (5, args.steps)
    if device == "cpu" and args.threads != 0:
        torch.set_num_threads(args.threads or 1)
    info = device_info(device)
    peaks = args.peaks or measure_peaks(device, quick=args.quick)
    info.update({f"peak_{k}": v for k, v in peaks.items()})
    label = "cuda" if device == "cuda" else "CPU"
    print(f"{info['device']}: train preset {name!r} (d_model {cfg.d_model}, {cfg.n_layer} layers, batch {cfg.batch_size}, "
          f"amp {cfg.amp}); {steps} timed steps after {warmup} warm-up" + (" [CPU]" if device == "cpu" else ""))
    providers, skipped = [("torch", "torch", False)], []
    ok, err = attention_available()
    if ok:
        providers.insert(0, ("fasttfm", "fasttfm", False))
    else:
        skipped.append(f"train fasttfm: fasttfm.ops.attention unavailable ({err})")
    if device == "cuda" or not args.quick:
        providers += [(p + "+compile", p, True) for p, _, _ in list(providers)]
    else:
        skipped.append("train torch.compile (fasttfm+compile, torch+compile): skipped on the CPU with --quick "
                       "(inductor's C++ compile takes minutes here); run without --quick to include it")
    rows = []
    for seq_len in seqlens:
        for prov, kernels, compile_ in providers:
            case = f"preset={name} batch={cfg.batch_size} seqlen={seq_len}"
            try:
                step, n_params, mcfg, amp = make_step(cfg, kernels, compile_, device, seq_len)
                ms, lo, hi = time_steps(step, device, warmup, steps)
                mem = peak_memory_mb(step, device)
            except Exception as exc:  # a provider that fails here is reported, never dropped silently
                skipped.append(f"train {prov} seqlen={seq_len}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                print(f"skipped: train {prov} seqlen={seq_len}: {exc!r}"[:300])
                continue
            tokens = cfg.batch_size * seq_len
            tok_s = tokens / (ms * 1e-3)
            tflops = model_flops_per_token(n_params, mcfg, seq_len) * tok_s / 1e12
            row = Row("train", prov, case, amp if amp != "none" else "float32", "fwd+bwd+step", label, ms, lo, hi,
                      float("nan"), tflops, tflops / peaks["gemm_tflops"], mem,
                      f"{tok_s:.0f} tok/s; {n_params / 1e6:.2f}M params")
            rows.append(row)
            print(f"train {prov:16s} seqlen={seq_len:<5d} {ms:8.2f} ms/step  {tok_s:9.0f} tok/s  {tflops:7.3f} TFLOP/s  "
                  f"{tflops / peaks['gemm_tflops']:5.1%} of GEMM  peak {mem:.1f} MB" + ("  [CPU]" if device == "cpu" else ""))
    write_results(rows, info, args.out, f"train_{device}", skipped)
    for s in skipped:
        print("skipped:", s)
    return rows


def build_parser():
    p = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--preset", choices=["cpu", "gpu", "tiny"], default=None,
                   help="model/batch preset (default: gpu on a GPU, cpu otherwise)")
    p.add_argument("--seqlens", default=None, help="sequence lengths, e.g. 64,128 (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="timed steps (5 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1: steadier on a shared machine; 0: torch's default)")
    p.set_defaults(peaks=None)
    return p


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
