"""Build fasttfm: the Python package, ``fasttfm.kernels`` (from ``kernels/``) and two extensions.

* ``fasttfm._C``: ``csrc/bindings.cpp`` + the CPU kernels in ``csrc/cpu/``; with a CUDA toolkit
  also every ``csrc/*.cu`` compiled by nvcc for ``FASTTFM_CUDA_ARCHS`` (default ``80;90``).
* ``fasttfm._C_emu``: the same ``csrc/*.cu`` sources compiled by the host compiler against the
  SIMT emulator (``csrc/emu/simt.h``), so CPU tensors can run the CUDA kernels' own code
  (``FASTTFM_EMULATE=1``). Needs the toolkit's headers (cuda_fp16.h), not a GPU.

Environment: ``FASTTFM_SKIP_CUDA_BUILD=1`` (CPU-only ``_C``), ``FASTTFM_SKIP_EMU_BUILD=1``,
``FASTTFM_CUDA_ARCHS="80;90"``, ``MAX_JOBS`` (parallel compile jobs, honoured by ninja), and
``CUDA_HOME`` (else the toolkit is found by asking nvcc; see fasttfm/_cuda_home.py).
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_home():
    spec = importlib.util.spec_from_file_location("_cuda_home", os.path.join(ROOT, "fasttfm", "_cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


cuda_home = _load_cuda_home().find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when imported: set the real toolkit first.
    os.environ["CUDA_HOME"] = cuda_home

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


CU_SOURCES = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
CPU_SOURCES = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
INCLUDES = [os.path.join(ROOT, "csrc")]
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.14 headers need C++20
LINK_FLAGS = ["-fopenmp"]


def _archs():
    archs = [a.strip() for a in os.environ.get("FASTTFM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    return [a for a in archs if a]


def _gencode(archs):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def extensions():
    exts = []
    build_cuda = bool(cuda_home) and not _flag("FASTTFM_SKIP_CUDA_BUILD")
    if build_cuda:
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + _gencode(_archs())
        exts.append(CUDAExtension(
            "fasttfm._C",
            ["csrc/bindings.cpp"] + CPU_SOURCES + CU_SOURCES,
            include_dirs=INCLUDES,
            define_macros=[("FASTTFM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags},
            extra_link_args=LINK_FLAGS,
        ))
        why = f"CUDA build for sm_{', sm_'.join(_archs())} with {cuda_home}"
    else:
        exts.append(CppExtension(
            "fasttfm._C",
            ["csrc/bindings.cpp"] + CPU_SOURCES,
            include_dirs=INCLUDES,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        ))
        why = "CPU-only build (" + ("FASTTFM_SKIP_CUDA_BUILD=1" if cuda_home else "no CUDA toolkit found") + ")"
    print(f"fasttfm: fasttfm._C: {why}", file=sys.stderr)
    if cuda_home and not _flag("FASTTFM_SKIP_EMU_BUILD"):
        exts.append(CppExtension(
            "fasttfm._C_emu",
            ["csrc/emu/bindings_emu.cpp", "csrc/emu/kernels_emu.cpp"],
            include_dirs=INCLUDES + [os.path.join(cuda_home, "include")],
            define_macros=[("FASTTFM_EMU", "1")],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-Wno-unknown-pragmas"]},  # #pragma unroll
        ))
        print("fasttfm: fasttfm._C_emu: SIMT emulator build of csrc/*.cu", file=sys.stderr)
    else:
        print("fasttfm: fasttfm._C_emu: skipped (" + ("FASTTFM_SKIP_EMU_BUILD=1" if cuda_home else
              "needs the CUDA toolkit headers") + ")", file=sys.stderr)
    _write_build_info(build_cuda, build_emu=bool(cuda_home) and not _flag("FASTTFM_SKIP_EMU_BUILD"))
    return exts


def _write_build_info(build_cuda, build_emu):
    """fasttfm/_build_info.json: what this build contains, for `python -m fasttfm info`."""
    import json

    import platform

    import torch

    info = {"cuda": build_cuda, "archs": _archs() if build_cuda else [], "cuda_home": cuda_home, "emulator": build_emu,
            "torch": torch.__version__, "python": platform.python_version()}
    with open(os.path.join(ROOT, "fasttfm", "_build_info.json"), "w") as f:
        json.dump(info, f)


setup(
    packages=["fasttfm", "fasttfm.ops", "fasttfm.gpu_check", "fasttfm.kernels"],
    package_dir={"fasttfm": "fasttfm", "fasttfm.kernels": "kernels"},
    package_data={"fasttfm": ["data/*.txt", "data/README.md", "_build_info.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
