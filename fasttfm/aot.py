"""Static resource report: every shipped kernel compiled for sm_80 and sm_90 without a GPU.

* CUDA C++: each ``csrc/*.cu`` through ``nvcc -cubin -Xptxas -v`` per arch; registers, spill
  bytes, static shared memory from ptxas, tensor-core instructions (HMMA/HGMMA) from the SASS.
* Triton: each ``aot_cases(cc)`` entry of the kernel modules through ``triton.compile`` with
  ``GPUTarget("cuda", cc, 32)``; registers and spills from ``cuobjdump -res-usage`` on the cubin,
  shared memory from the compiled metadata, MMA instructions from the SASS.

``python -m fasttfm aot [--arch 80,90] [--only cuda|triton] [--json FILE]`` prints one row per
kernel. :func:`violations` lists spills and shared memory over the per-block limit (sm_90:
227 KiB, sm_80: 163 KiB, sm_86/sm_89: 99 KiB); tests/test_aot.py fails on any. ``--arch 86``
reports the Triton configs of the 99 KiB class (sm_86, sm_89, sm_12x): same code generation as
sm_80 but a smaller shared-memory limit, and ptxas allocates registers differently (one sm_80
config that is spill-free spilled 56 B for sm_86), so that class is compiled on its own.
"""
import dataclasses
import glob
import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile

from ._cuda_home import find_cuda_home, nvcc_path

__all__ = ["KernelReport", "cuda_reports", "triton_reports", "violations", "SMEM_LIMIT", "main"]

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA|UTCHMMA)\b")
_TMA_LOAD = re.compile(r"\bUTMALDG\b")


@dataclasses.dataclass
class KernelReport:
    source: str  # "cuda" or "triton"
    name: str
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads
    smem_bytes: int
    mma: int  # tensor-core instructions in the SASS
    expects_mma: bool = False
    tma: int = 0  # TMA loads (UTMALDG) in the SASS
    expects_tma: bool = False
    spill_ok: int = 0  # stack bytes allowed: a GPU-measured exception (kernels' MEASURED_SPILLS)

    def row(self):
        return (f"{self.source:6s} sm_{self.arch}  {self.name[:100]:100s} regs {self.registers:3d}  "
                f"spill {self.spill_bytes:5d} B  smem {self.smem_bytes / 1024:7.1f} KiB  mma {self.mma}"
                + (f"  tma {self.tma}" if self.tma or self.expects_tma else ""))


def _root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    """ptxas/cuobjdump: Triton's bundled copies first, then the toolkit's."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    home = find_cuda_home()
    path = os.path.join(home, "bin", name) if home else None
    return path if path and os.path.exists(path) else shutil.which(name)


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _sass_mma_counts(cubin_path, pattern=_MMA):
    """{mangled function name: MMA instruction count} from cuobjdump -sass (or of ``pattern``)."""
    out = subprocess.run([_tool("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True).stdout
    counts, current = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            counts[current] = 0
        elif current and pattern.search(line):
            counts[current] += 1
    return counts


def _res_usage(cubin_path):
    """{function: (registers, spill bytes, static smem)} from cuobjdump -res-usage."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True).stdout
    usage, current = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            regs = int(re.search(r"REG:(\d+)", line).group(1))
            stack = int(re.search(r"STACK:(\d+)", line).group(1)) if "STACK:" in line else 0
            shared = int(re.search(r"SHARED:(\d+)", line).group(1)) if "SHARED:" in line else 0
            usage[current] = (regs, stack, shared)
    return usage


def cuda_reports(archs=(80, 90), sources=None):
    """Compile csrc/*.cu per arch and report every kernel ptxas emitted."""
    nvcc = nvcc_path()
    if not nvcc:
        raise RuntimeError("fasttfm aot: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    csrc = os.path.join(_root(), "csrc")
    sources = sources or sorted(glob.glob(os.path.join(csrc, "*.cu")))
    if not sources:  # an installed wheel has no csrc/: say so instead of reporting on nothing
        raise RuntimeError(f"fasttfm aot: no CUDA sources under {csrc} (an installed wheel does not ship "
                           "csrc/): run it from a source checkout or an unpacked sdist")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            for arch in archs:
                cubin = os.path.join(tmp, f"{os.path.basename(src)}.{arch}.cubin")
                cmd = [nvcc, "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-cubin",
                       f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-I", csrc, src, "-o", cubin]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed for {src} sm_{arch}:\n{proc.stderr[-4000:]}")
                reports += _parse_ptxas(proc.stderr, arch, _sass_mma_counts(cubin), os.path.basename(src))
    return reports


def _parse_ptxas(log, arch, mma, source_file):
    entries, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_\d+'", line)
        if m:
            current = m.group(1)
            entries[current] = {"regs": 0, "spill": 0, "smem": 0}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            entries.setdefault(current, {"regs": 0, "spill": 0, "smem": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            entries[current]["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entries[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            entries[current]["smem"] = int(s.group(1)) if s else 0
    names = {k: _short(v) for k, v in _demangle(list(entries)).items()}
    return [KernelReport("cuda", f"{source_file}: {names[k]}", arch, v["regs"], v["spill"], v["smem"], mma.get(k, 0))
            for k, v in entries.items()]


def _short(demangled):
    """'void ftfm::(anonymous namespace)::k<float, 4>(Params)' -> 'k<float, 4>'."""
    name = re.sub(r"^void |ftfm::|\(anonymous namespace\)::", "", demangled)
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def kernel_modules():
    """Names of the fasttfm.kernels modules that expose aot_cases (every Triton kernel file)."""
    import pkgutil

    import fasttfm.kernels as pkg

    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"fasttfm.kernels.{info.name}")  # an import error is a real failure
        if hasattr(module, "aot_cases"):
            names.append(info.name)
    return sorted(names)


def _compile_triton_case(mod_name, arch, index):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = importlib.import_module(f"fasttfm.kernels.{mod_name}").aot_cases(arch)[index]
    src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        usage = _res_usage(cubin)
        regs, stack, _ = next(iter(usage.values())) if usage else (0, 0, 0)
        mma = sum(_sass_mma_counts(cubin).values())
        tma = sum(_sass_mma_counts(cubin, _TMA_LOAD).values())
    return KernelReport("triton", f"{mod_name}: {case.name}", arch, regs, stack, int(k.metadata.shared), mma,
                        case.tensor_core, tma, case.tma, case.spill_ok)


def triton_reports(archs=(80, 90), modules=None, jobs=None):
    """Compile every aot_cases(cc) entry of the Triton kernel modules (``jobs`` processes, default
    MAX_JOBS or the CPU count)."""
    import concurrent.futures
    import multiprocessing

    work = []
    for mod_name in modules or kernel_modules():
        mod = importlib.import_module(f"fasttfm.kernels.{mod_name}")
        for arch in archs:
            work += [(mod_name, arch, i) for i in range(len(mod.aot_cases(arch)))]
    jobs = jobs or int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    if jobs <= 1:
        return [_compile_triton_case(*w) for w in work]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no state inherited from the caller
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_triton_case, *zip(*work))) if work else []


def violations(reports):
    """Human-readable problems: spills, shared memory over the limit, missing tensor-core use."""
    bad = []
    for r in reports:
        if r.spill_bytes > r.spill_ok:
            bad.append(f"{r.name} sm_{r.arch}: {r.spill_bytes} B of spills/stack"
                       + (f" (over the {r.spill_ok} B measured allowance)" if r.spill_ok else ""))
        if r.smem_bytes > SMEM_LIMIT.get(r.arch, 48 * 1024):
            bad.append(f"{r.name} sm_{r.arch}: {r.smem_bytes} B shared memory > {SMEM_LIMIT[r.arch]} B")
        if r.expects_mma and r.mma == 0:
            bad.append(f"{r.name} sm_{r.arch}: no tensor-core instructions")
        if r.expects_tma and r.tma == 0:
            bad.append(f"{r.name} sm_{r.arch}: no TMA loads (UTMALDG)")
    return bad


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fasttfm aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--only", choices=["cuda", "triton"], default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    reports = []
    if args.only in (None, "cuda"):
        reports += cuda_reports(archs)
    if args.only in (None, "triton"):
        reports += triton_reports(archs)
    for r in reports:
        print(r.row())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    bad = violations(reports)
    print(f"{len(reports)} kernels, {len(bad)} problems")
    for b in bad:
        print("  PROBLEM:", b)
    return 1 if bad else 0
