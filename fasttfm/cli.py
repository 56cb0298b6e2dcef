"""``python -m fasttfm <command>``: info, aot (static report), and the commands later issues add."""
import argparse
import sys

__all__ = ["main", "info"]


def info() -> int:
    """Print versions, the GPU (or its absence) and which compiled parts are built."""
    import platform

    import torch

    from . import __version__
    from ._cuda_home import find_cuda_home, nvcc_version
    from ._env import emulate_enabled
    from ._ext import _build_info, built_parts, load_errors

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fasttfm      {__version__}")
    print(f"python       {platform.python_version()} ({platform.machine()})")
    print(f"torch        {torch.__version__} (built for CUDA {torch.version.cuda})")
    print(f"triton       {triton_version}")
    home = find_cuda_home()
    print(f"CUDA toolkit {home or 'not found'}" + (f" (nvcc {nvcc_version()})" if home else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            print(f"GPU {i}        {torch.cuda.get_device_name(i)} (sm_{cc[0]}{cc[1]})")
    else:
        print("GPU          none (CUDA tensors unavailable; CPU paths and emulation only)")
    parts = built_parts()
    broken = load_errors()
    build = _build_info()
    module = {"cuda": "_C", "cpu": "_C", "emulator": "_C_emu"}
    # a part the build did not include reads "missing" even when the extension holding it fails to load
    included = {"cuda": build.get("cuda", True), "cpu": True, "emulator": build.get("emulator", True)}
    print("extension    " + ", ".join(f"{k}: {_part_state(v, module[k] in broken and included[k])}"
                                      for k, v in parts.items()))
    for part, why in broken.items():
        print(f"  LOAD ERROR fasttfm.{part}: {why}")
    if build:
        archs = ", ".join(f"sm_{a}" for a in build.get("archs", [])) or "none (CPU-only build)"
        print(f"archs        {archs} (FASTTFM_CUDA_ARCHS at build time)")
    print(f"emulation    {'on' if emulate_enabled() else 'off'} (FASTTFM_EMULATE)")
    return 0


def _part_state(built, broken):
    return "built" if built else ("load error" if broken else "missing")


def demo(compare_steps: int = 20) -> int:
    """Train the small CPU preset on tiny Shakespeare with fasttfm's kernels, then the same model with
    PyTorch's own ops over the first ``compare_steps`` steps: both loss curves side by side, the
    validation loss/perplexity, tokens/s and a sample. Exit status 1 if the two curves disagree."""
    import time
    from dataclasses import replace

    from .model import attention_available
    from .train import preset, train

    t0 = time.perf_counter()
    cfg = preset("cpu", out_dir="runs/demo")
    ok, err = attention_available()
    if not ok:
        print(f"fasttfm.ops.attention is not available ({err}): the demo runs torch ops only")
        cfg = replace(cfg, kernels="torch")
    threads, rates = _pick_threads(cfg)
    cfg = replace(cfg, threads=threads)
    print(f"CPU threads: {threads} (" + ", ".join(f"{n}: {r:.0f} tok/s" for n, r in rates.items()) +
          " over 3 timed steps; on a busy machine one thread often wins)")
    print(f"[1/2] {cfg.max_steps} steps with kernels={cfg.kernels} (fasttfm.nn norms + fasttfm attention; on the CPU "
          f"the ops run their CPU paths, on a GPU the Triton/CUDA kernels)")
    ours = train(cfg)
    steps = min(compare_steps, cfg.max_steps)
    print(f"[2/2] the same model and batches with torch ops (torch.nn.LayerNorm, F.scaled_dot_product_attention), "
          f"steps 1..{steps}")
    ref = train(replace(cfg, kernels="torch", stop_at=steps, save=False, sample_tokens=0, eval_interval=-1,
                        quiet=True))
    print(f"\n{'step':>5}  {cfg.kernels + ' loss':>13}  {'torch loss':>11}  {'|diff|':>8}")
    diffs = []
    for step in range(1, steps + 1):
        a, b = ours["losses"][step], ref["losses"][step]
        diffs.append(abs(a - b))
        print(f"{step:>5}  {a:>13.6f}  {b:>11.6f}  {diffs[-1]:>8.1e}")
    tol = 1e-4
    agree = max(diffs) <= tol
    print(f"max |diff| over {steps} steps: {max(diffs):.1e} ({'agree' if agree else 'DISAGREE'}, tolerance {tol:g})")
    step, val_loss, ppl = ours["val"][-1]
    first = ours["losses"][1]
    print(f"\n{cfg.kernels}: train loss {first:.3f} (step 1) -> {ours['losses'][step]:.3f} (step {step}); "
          f"val loss {val_loss:.4f}, val perplexity {ppl:.2f}")
    print(f"throughput: {cfg.kernels} {ours['tok_per_s']:.0f} tok/s, torch ops {ref['tok_per_s']:.0f} tok/s "
          f"(CPU, {threads} thread{'s' if threads > 1 else ''})")
    print(f"logs and checkpoint: {cfg.out_dir}/ (log.csv, tb/, ckpt.pt); total {time.perf_counter() - t0:.0f} s")
    print("\nsample:\n" + ours["sample"])
    return 0 if agree else 1


def _pick_threads(cfg):
    """The faster of torch's default CPU thread count and one thread, timed on a few steps."""
    from dataclasses import replace

    import torch

    from .train import train

    default = torch.get_num_threads()
    rates = {}
    for n in sorted({default, 1}, reverse=True):
        res = train(replace(cfg, threads=n, stop_at=4, save=False, quiet=True, eval_interval=-1, sample_tokens=0))
        rates[n] = res["tok_per_s"]
    return max(rates, key=rates.get), rates


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser, --help included
        return train_command(argv[1:])
    if argv[:1] == ["bench"]:  # bench/suite.py's parser, --help included
        return bench(argv[1:])
    if argv[:1] == ["aot"]:  # its own parser, --help included
        from .aot import main as aot_main

        return aot_main(argv[1:])
    if argv[:1] == ["gpu-check"]:  # its own parser, --help included
        from .gpu_check import main as gpu_check_main

        return gpu_check_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fasttfm")
    parser.add_argument("command", choices=["info", "aot", "demo", "train", "bench", "gpu-check"], help="what to run")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        return demo()
    if args.command == "train":
        return train_command(rest)
    if args.command == "aot":
        from .aot import main as aot_main

        return aot_main(rest)
    if args.command == "bench":
        return bench(rest)
    return 2


def _train_parser():
    from dataclasses import fields

    from .train import PRESETS, TrainConfig

    p = argparse.ArgumentParser(prog="python -m fasttfm train",
                                description="Train the fasttfm GPT (fasttfm/train.py). Options override the preset; "
                                            "with --resume they override the checkpoint's configuration. Under "
                                            "torchrun, each process trains a slice of the global batch (DDP).")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset (default: cpu)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default=None, metavar="PATH",
                           help="resume from OUT_DIR/ckpt.pt, or from PATH")
        elif f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=f.type, default=None, help=f"(default {f.default!r})")
    return p


def train_config_from_args(argv):
    """A TrainConfig from command-line options: preset (default cpu), or the checkpoint's config
    when resuming, then the options given explicitly."""
    import os
    from dataclasses import fields, replace

    from .checkpoint import CheckpointError, describe_previous, load_checkpoint
    from .train import TrainConfig, preset

    args = vars(_train_parser().parse_args(argv))
    name = args.pop("preset")
    given = {k: v for k, v in args.items() if v is not None}
    cfg = preset(name or "cpu")
    resume = given.get("resume")
    if resume and not name:
        path = os.path.join(given.get("out_dir", cfg.out_dir), "ckpt.pt") if resume == "auto" else resume
        if os.path.isfile(path):
            try:
                saved = load_checkpoint(path)["train_config"]
            except CheckpointError as exc:
                raise CheckpointError(str(exc) + describe_previous(path)) from exc
            known = {f.name for f in fields(TrainConfig)}
            saved = {k: v for k, v in saved.items() if k in known}
            cfg = replace(TrainConfig(), **dict(saved, stop_at=0, quiet=False))
    return replace(cfg, **given)


def train_command(argv) -> int:
    """``python -m fasttfm train [--preset cpu|gpu|tiny] [--option value ...]`` (see --help)."""
    import os

    from .checkpoint import CheckpointError
    from .train import train

    try:
        cfg = train_config_from_args(argv)
        res = train(cfg)
    except CheckpointError as exc:
        print(f"fasttfm train: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0 and not cfg.quiet:
        if res["val"]:
            step, loss, ppl = res["val"][-1]
            print(f"final: step {step} | val loss {loss:.4f} | val ppl {ppl:.2f} | {res['tok_per_s']:.0f} tok/s")
        if res["sample"]:
            print("sample:\n" + res["sample"])
    return 0


def bench(argv) -> int:
    """``python -m fasttfm bench all|<op>[,<op>...] [--quick] [--dtype ...] [--seqlens ...] [--out DIR]``:
    runs the bench_<op> modules of ``fasttfm.bench`` (bench/ of a checkout, shipped in the wheel) through
    its suite (peaks, skipped cases, summary, plots)."""
    if not argv:
        print("usage: python -m fasttfm bench all|<op>[,<op>...] [--quick] [--dtype ...] [--seqlens ...] [--out DIR]"
              " (--list: the ops)", file=sys.stderr)
        return 2
    from .bench.suite import main as suite_main

    return suite_main(argv)
