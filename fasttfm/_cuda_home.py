"""Find the real CUDA toolkit without importing torch (used by setup.py, the CLI and tests).

Order: ``$CUDA_HOME`` / ``$CUDA_PATH`` when they hold ``bin/nvcc``; else ask the ``nvcc`` on
PATH where it lives (``nvcc --dryrun`` prints ``#$ TOP=<toolkit>/bin/..``). The second step
matters where ``nvcc`` is a wrapper script outside the toolkit: torch's own guess (the wrapper's
parent folder) then has no ``lib64/libcudart.so`` and linking fails.
"""
import functools
import os
import re
import shutil
import subprocess

__all__ = ["find_cuda_home", "cuda_include_dir", "nvcc_path", "nvcc_version"]


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isdir(
        os.path.join(path, "include")
    )


@functools.lru_cache(maxsize=None)
def find_cuda_home():
    """The CUDA toolkit root, or None when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if _is_toolkit(path):
            return os.path.realpath(path)
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu", "-o", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match and _is_toolkit(os.path.realpath(match.group(1).strip())):
        return os.path.realpath(match.group(1).strip())
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return guess if _is_toolkit(guess) else None


def cuda_include_dir():
    home = find_cuda_home()
    return os.path.join(home, "include") if home else None


def nvcc_path():
    home = find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


@functools.lru_cache(maxsize=None)
def nvcc_version():
    nvcc = nvcc_path()
    if not nvcc:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release ([0-9.]+)", out)
    return match.group(1) if match else None
