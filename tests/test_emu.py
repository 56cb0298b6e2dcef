"""Tests of the SIMT emulator itself (csrc/emu/simt.h), independent of torch and of fasttfm's kernels.

tests/emu/*.cu hold correct kernels and kernels with planted bugs, written to the ftfm_cuda.h contract;
tests/emu/driver.cpp runs named cases in one run order and prints ``CASE <name> <status> <detail>``.
The driver is built once per session with g++ -DFASTTFM_EMU (-O2 -g, plus slow ASan/UBSan and
ucontext builds). Each test asserts on the driver's lines: correct kernels must match a float64 /
exact reference in every run order, and every planted bug must be reported.
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from fasttfm._cuda_home import cuda_include_dir, nvcc_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_TESTS = os.path.join(ROOT, "tests", "emu")
KERNEL_SOURCES = ["ok_kernels.cu", "bug_kernels.cu"]
ORDERS = ["forward", "reverse", "random"]

CORRECT_CASES = [
    # row softmax (warp shuffles + shared-memory block reduction): widths below, at, between and
    # above multiples of 32, up to 1024 threads per block
    "softmax/3/1/32", "softmax/4/31/32", "softmax/3/100/32", "softmax/5/1000/128", "softmax/2/333/256",
    "softmax/3/4097/1024", "softmax/2/1025/1024",
    # block sizes that are not multiples of 32 (partial last warp, exact masks), __syncthreads_count
    "partial_warp/3/100", "partial_warp/2/45", "partial_warp/2/1", "partial_warp/1/1024",
    "reverse_dyn/3/97", "reverse_dyn/2/1024",  # dynamic shared memory
    "histogram",  # shared and global atomics: int, float, double, unsigned long long, max, min
    "grid_index",  # 3-D grid and block
    "shuffle/0", "shuffle/1", "shuffle/2", "shuffle/3", "shuffle/4", "shuffle/5",  # int..bf16, widths 32..1
    "votes", "half_math", "multithread", "recovery", "stats",
    "missing_sync_fixed", "poison", "launch_config/4",
]
ERROR_CASES = {  # case -> substrings the error must contain (besides naming the kernel)
    "divergent_sync": ["divergent __syncthreads", "bug_kernels.cu:30", "bug_kernels.cu:33"],
    "exit_before_sync": ["divergent __syncthreads", "exited"],
    "mask_excludes_lane": ["bad shuffle mask 0x7fffffff", "lane 31 is not in its own mask"],
    "mask_includes_exited": ["bad shuffle mask 0xffffffff", "exited"],
    "mask_mismatch": ["bad shuffle mask"],
    "bad_width": ["bad shuffle width 3"],
    "warp_deadlock": ["deadlock", "__syncwarp", "__syncthreads", "for lanes 0xffff0000"],
    "throwing": ["kernel 'throwing_kernel'", "block (2,0,0) thread (5,0,0)", "boom from device code"],
    "trap": ["kernel 'trap_kernel'", "thread (3,0,0)", "__trap() called"],
    "smem_overflow": ["write past the end of the 256-byte dynamic shared memory"],
    "launch_config/0": ["illegal block size (1025,1,1)"],
    "launch_config/1": ["illegal block size (0,1,1)"],
    "launch_config/2": ["illegal block size (32,32,2)"],
    "launch_config/3": ["illegal grid size (0,1,1)"],
}
KERNEL_SYMBOL = {  # FTFM_LAUNCH names most test kernels `k`; the error adds the demangled symbol
    "divergent_sync": "emu_tests::divergent_sync_kernel(float*)",
    "mask_excludes_lane": "emu_tests::mask_excludes_lane_kernel(float*)",
    "warp_deadlock": "emu_tests::warp_deadlock_kernel(float*)",
    "throwing": "emu_tests::throwing_kernel_impl(float*)",
    "launch_config/0": "emu_tests::noop_kernel(int*)",
}
ALL_CASES = CORRECT_CASES + ["missing_sync"] + list(ERROR_CASES)


def _toolchain():
    gxx, inc = shutil.which("g++"), cuda_include_dir()
    if gxx and inc:
        return gxx, inc
    why = "g++ not found" if not gxx else "CUDA toolkit headers not found ($CUDA_HOME or nvcc on PATH)"
    if os.environ.get("FASTTFM_REQUIRE_EMU") == "1":
        pytest.fail(f"emulator tests need {why}")
    pytest.skip(why)


def _build(out_dir, name, flags, link_flags=()):
    """Compile the test kernels and the driver (one g++ per file, two at a time); return the binary."""
    gxx, inc = _toolchain()
    common = ["-std=c++17", "-DFASTTFM_EMU", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
              f"-I{ROOT}/csrc/include", f"-I{EMU_TESTS}", f"-I{inc}", *flags]
    jobs = [(["-x", "c++", os.path.join(EMU_TESTS, src)], os.path.join(out_dir, f"{name}_{src}.o"))
            for src in KERNEL_SOURCES]
    jobs.append(([os.path.join(EMU_TESTS, "driver.cpp")], os.path.join(out_dir, f"{name}_driver.o")))

    def compile_one(job):
        src, obj = job
        return subprocess.run([gxx, *common, "-c", *src, "-o", obj], capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, jobs))
    for res in results:
        assert res.returncode == 0, f"compile failed:\n{res.stderr}"
        # the emulator headers must compile warning-free under -Wall -Wextra
        emu_warnings = [line for line in res.stderr.splitlines() if "csrc/emu/" in line and "warning" in line]
        assert not emu_warnings, "\n".join(emu_warnings)
    binary = os.path.join(out_dir, name)
    res = subprocess.run([gxx, *flags, *link_flags, "-rdynamic", "-pthread", *(obj for _, obj in jobs), "-o", binary],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"link failed:\n{res.stderr}"
    return binary


def _run(binary, order, cases, seed=0, env=None, check=True):
    res = subprocess.run([binary, order, str(seed), *cases], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    if check:
        assert res.returncode == 0, f"driver exited with {res.returncode}:\n{res.stdout}\n{res.stderr}"
    lines = {}
    for line in res.stdout.splitlines():
        m = re.match(r"CASE (\S+) (\S+) ?(.*)$", line)
        if m:
            lines[m.group(1)] = (m.group(2), m.group(3))
    if check:
        missing = [c for c in cases if c not in lines]
        assert not missing, f"no result for {missing}:\n{res.stdout}\n{res.stderr}"
    return lines, res


@pytest.fixture(scope="session")
def emu_build_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emu_build"))


@pytest.fixture(scope="session")
def driver(emu_build_dir):
    return _build(emu_build_dir, "emu_driver", ["-O2", "-g"])


_results_cache = {}


@pytest.fixture(scope="session")
def results(driver):
    """results(order) -> {case: (status, detail)}, every case run once per order (seeded random order)."""
    def get(order):
        if order not in _results_cache:
            _results_cache[order] = _run(driver, order, ALL_CASES, seed=1234)[0]
        return _results_cache[order]
    return get


# ---------------------------------------------------------------------------------- correct kernels
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CORRECT_CASES)
def test_correct_kernels(results, case, order):
    status, detail = results(order)[case]
    assert status == "ok", f"{case} in {order} order: {status} {detail}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_order_seeds(driver, seed):
    lines, _ = _run(driver, "random", ["softmax/3/500/256", "partial_warp/2/100", "histogram", "votes"], seed=seed)
    assert all(status == "ok" for status, _ in lines.values()), lines


# ---------------------------------------------------------------------------------- planted bugs
def test_missing_syncthreads_needs_more_than_one_order(results):
    # Threads read their neighbour's shared-memory slot without a barrier. Forward order runs
    # thread t before thread t+1 wrote it: caught. Reverse order runs t+1 first: missed. Hence
    # tests run several orders.
    by_order = {order: results(order)["missing_sync"][0] for order in ORDERS}
    assert by_order["forward"] == "mismatch", by_order
    assert by_order["reverse"] == "ok", by_order
    assert any(status != "ok" for status in by_order.values())
    assert all(results(order)["missing_sync_fixed"][0] == "ok" for order in ORDERS)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_planted_bug_is_reported(results, case, order):
    status, detail = results(order)[case]
    assert status == "error", f"{case} in {order} order was not reported: {status} {detail}"
    assert detail.startswith("ftfm_emu: kernel '"), detail  # every error names the kernel
    for part in ERROR_CASES[case]:
        assert part in detail, f"{case}: {part!r} not in {detail!r}"
    if case in KERNEL_SYMBOL:
        assert KERNEL_SYMBOL[case] in detail, detail
    if not case.startswith("launch_config") and case != "smem_overflow":
        assert re.search(r"block \(\d+,\d+,\d+\) thread \(\d+,\d+,\d+\)", detail), detail


def test_poisoned_dynamic_smem(results):
    # the kernel copies dynamic shared memory it never wrote: every word must read 0xffffffff
    for order in ORDERS:
        assert results(order)["poison"][0] == "ok", results(order)["poison"]


def test_driver_fails_on_unknown_case(driver):
    lines, _ = _run(driver, "forward", ["no_such_case"])
    assert lines["no_such_case"][0] == "unknown"


# ---------------------------------------------------------------------------------- speed
def test_softmax_256x4096_timing(driver):
    lines, _ = _run(driver, "forward", ["time_softmax"])
    status, detail = lines["time_softmax"]
    assert status == "ok", detail
    seconds = float(re.search(r"seconds=([0-9.]+)", detail).group(1))
    print(f"\nemulated 256x4096 fp32 row softmax, 256 threads/block: {seconds:.3f} s (best of 3)")
    assert seconds < 5.0


# ---------------------------------------------------------------------------------- other builds
@pytest.mark.slow
def test_asan_ubsan_build(emu_build_dir):
    """ASan/UBSan build: the emulator annotates its stack switches, so correct kernels and
    reported bugs run clean (no false positives, no leaks from aborted blocks), and an
    out-of-range dynamic shared memory read is caught with file and line."""
    binary = _build(emu_build_dir, "emu_driver_asan", ["-O1", "-g", "-fno-omit-frame-pointer",
                                                       "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
    cases = [c for c in ALL_CASES if c != "smem_overflow"]  # ASan itself would abort on that write
    env = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    lines, res = _run(binary, "random", cases, seed=7, env=env)
    assert "Sanitizer" not in res.stderr, res.stderr
    for case in CORRECT_CASES:
        assert lines[case][0] == "ok", (case, lines[case])
    for case in ERROR_CASES:
        if case != "smem_overflow":  # under ASan the canary is replaced by poisoning
            assert lines[case][0] == "error", (case, lines[case])
    _, res = _run(binary, "forward", ["smem_overread"], env=env, check=False)
    assert res.returncode != 0
    line = next(i for i, text in enumerate(open(os.path.join(EMU_TESTS, "bug_kernels.cu")), 1)
                if "SMEM_OVERREAD_LINE" in text)
    assert "AddressSanitizer" in res.stderr and f"bug_kernels.cu:{line}" in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
def test_ucontext_fallback(emu_build_dir):
    """The portable ucontext switch (used off x86-64) gives the same results."""
    binary = _build(emu_build_dir, "emu_driver_ucontext", ["-O1", "-g", "-DFTFM_EMU_UCONTEXT"])
    cases = ["softmax/3/100/32", "softmax/2/1025/1024", "partial_warp/2/100", "shuffle/4", "votes", "multithread",
             "recovery", "missing_sync", "divergent_sync", "mask_mismatch", "warp_deadlock", "throwing"]
    expect_missing_sync = {"forward": "mismatch", "reverse": "ok", "random": None}  # random: either
    for order in ORDERS:
        lines, _ = _run(binary, order, cases, seed=3)
        for case in cases:
            status = lines[case][0]
            if case in ERROR_CASES:
                assert status == "error", (order, case, lines[case])
            elif case == "missing_sync":
                assert expect_missing_sync[order] in (None, status), (order, lines[case])
            else:
                assert status == "ok", (order, case, lines[case])


@pytest.mark.slow
@pytest.mark.parametrize("src", KERNEL_SOURCES)
def test_test_kernels_are_valid_cuda(src, tmp_path):
    """The emulator test kernels follow the ftfm_cuda.h contract: nvcc compiles them for sm_90."""
    nvcc = nvcc_path()
    if not nvcc:
        pytest.skip("nvcc not found")
    res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", f"-I{ROOT}/csrc/include", f"-I{EMU_TESTS}", "-c",
                          os.path.join(EMU_TESTS, src), "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
