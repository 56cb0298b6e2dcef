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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fasttfm")
    parser.add_argument("command", choices=["info", "aot"], help="what to run")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "aot":
        from .aot import main as aot_main

        return aot_main(rest)
    return 2
