"""Build fasttfm: the Python package, ``fasttfm.kernels`` (from ``kernels/``) and two extensions.

* ``fasttfm._C``: ``csrc/bindings.cpp`` + the CPU kernels in ``csrc/cpu/``; with a CUDA toolkit
  also every ``csrc/*.cu`` compiled by nvcc for ``FASTTFM_CUDA_ARCHS`` (default ``80;90``).
* ``fasttfm._C_emu``: the same ``csrc/*.cu`` sources compiled by the host compiler against the
  SIMT emulator (``csrc/emu/simt.h``), so CPU tensors can run the CUDA kernels' own code
  (``FASTTFM_EMULATE=1``). Needs the toolkit's headers (cuda_fp16.h), not a GPU.

Environment: ``FASTTFM_SKIP_CUDA_BUILD=1`` (CPU-only ``_C``), ``FASTTFM_SKIP_EMU_BUILD=1``,
``FASTTFM_CUDA_ARCHS="80;90"``, ``FASTTFM_DEBUG_SYMBOLS=1`` (keep host debug info), ``MAX_JOBS`` (parallel
compile jobs, honoured by ninja), and
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
# Release builds carry no host debug info: Python's CFLAGS add -g, which made _C 24 MB (5 MB of DWARF next to
# 18 MB of device code) and _C_emu 8.7 MB (0.8 MB without). -g0 also compiles faster. Device code keeps
# -lineinfo (compute-sanitizer's file:line). FASTTFM_DEBUG_SYMBOLS=1 keeps -g and the DWARF.
DEBUG = _flag("FASTTFM_DEBUG_SYMBOLS")
NO_DEBUG = [] if DEBUG else ["-g0"]
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"] + NO_DEBUG  # torch 2.14 headers need C++20
LINK_FLAGS = ["-fopenmp"] + ([] if DEBUG else ["-Wl,--strip-debug"])


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
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-Wno-unknown-pragmas"] + NO_DEBUG},  # #pragma unroll
            extra_link_args=[] if DEBUG else ["-Wl,--strip-debug"],
        ))
        print("fasttfm: fasttfm._C_emu: SIMT emulator build of csrc/*.cu", file=sys.stderr)
    else:
        print("fasttfm: fasttfm._C_emu: skipped (" + ("FASTTFM_SKIP_EMU_BUILD=1" if cuda_home else
              "needs the CUDA toolkit headers") + ")", file=sys.stderr)
    global _BUILD_INFO
    _BUILD_INFO = (build_cuda, bool(cuda_home) and not _flag("FASTTFM_SKIP_EMU_BUILD"))
    return exts


_BUILD_INFO = (False, False)


def _write_build_info(build_cuda, build_emu, folder):
    """<folder>/fasttfm/_build_info.json: what this build contains (`python -m fasttfm info`), and the torch it
    was built against (fasttfm._ext reports a mismatch instead of a bare ImportError)."""
    import json

    import platform

    import torch

    info = {"cuda": build_cuda, "archs": _archs() if build_cuda else [], "cuda_home": cuda_home, "emulator": build_emu,
            "torch": torch.__version__, "python": platform.python_version()}
    os.makedirs(os.path.join(folder, "fasttfm"), exist_ok=True)
    with open(os.path.join(folder, "fasttfm", "_build_info.json"), "w") as f:
        json.dump(info, f)


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension; writes _build_info.json only when extensions are really built (next to them:
    the source tree for --inplace, the build folder otherwise), never for sdist or egg_info."""

    def run(self):
        super().run()
        _write_build_info(*_BUILD_INFO, ROOT if self.inplace else self.build_lib)


setup(
    packages=["fasttfm", "fasttfm.ops", "fasttfm.gpu_check", "fasttfm.kernels", "fasttfm.bench"],
    package_dir={"fasttfm": "fasttfm", "fasttfm.kernels": "kernels", "fasttfm.bench": "bench"},
    package_data={"fasttfm": ["tinyshakespeare.txt", "tinyshakespeare.md"]},  # + _build_info.json from build_ext
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
