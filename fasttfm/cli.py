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
    from ._ext import built_parts

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
    print("extension    " + ", ".join(f"{k}: {'built' if v else 'missing'}" for k, v in parts.items()))
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    if os.path.exists(path):
        with open(path) as f:
            build = json.load(f)
        archs = ", ".join(f"sm_{a}" for a in build.get("archs", [])) or "none (CPU-only build)"
        print(f"archs        {archs} (FASTTFM_CUDA_ARCHS at build time)")
    print(f"emulation    {'on' if emulate_enabled() else 'off'} (FASTTFM_EMULATE)")
    return 0


def demo() -> int:
    """LayerNorm as a drop-in: the same module state, torch vs fasttfm, CPU path and emulated kernel."""
    import time

    import torch

    from . import emulate, nn
    from ._ext import built_parts

    torch.manual_seed(0)
    x = torch.randn(64, 1024, requires_grad=True)
    ref = torch.nn.LayerNorm(1024)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = nn.LayerNorm(1024)
    ours.load_state_dict(ref.state_dict())
    y_ref = ref(x)
    gx_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    rows = [("torch.nn.LayerNorm (CPU)", y_ref, gx_ref, 0.0)]
    modes = [("fasttfm CPU path", False)]
    if built_parts()["emulator"]:
        modes.append(("fasttfm CUDA kernel, emulated on CPU", True))
    for label, emu in modes:
        with emulate(emu):
            ours(x[:2])  # warm-up: first call sets up the op dispatch
            t0 = time.perf_counter()
            y = ours(x)
            gx, = torch.autograd.grad(y.square().sum(), x)
            rows.append((label, y, gx, time.perf_counter() - t0))
    print("LayerNorm(1024) on a (64, 1024) batch; forward and d(sum y^2)/dx against torch.nn.LayerNorm:")
    for label, y, gx, dt in rows:
        print(f"  {label:40s} max|y - torch| {(y - y_ref).abs().max().item():.2e}   "
              f"max|dx - torch| {(gx - gx_ref).abs().max().item():.2e}   {dt * 1e3:8.1f} ms")
    print("(the training demo replaces this once fasttfm.train lands)")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fasttfm")
    parser.add_argument("command", choices=["info", "aot", "demo", "bench"], help="what to run")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        return demo()
    if args.command == "aot":
        from .aot import main as aot_main

        return aot_main(rest)
    if args.command == "bench":
        return bench(rest)
    return 2


def bench(argv) -> int:
    """``python -m fasttfm bench <op> [options]``: runs bench/bench_<op>.py from the checkout."""
    import importlib
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "bench")):
        print("fasttfm bench: the bench/ folder of a source checkout is needed", file=sys.stderr)
        return 2
    if not argv:
        print("usage: python -m fasttfm bench <op> [--quick] [--dtype ...] [--out DIR]", file=sys.stderr)
        return 2
    sys.path.insert(0, root)
    module = importlib.import_module(f"bench.bench_{argv[0]}")
    module.main(argv[1:])
    return 0
