"""The fp16 <-> float conversions the CPU C++ kernels use (csrc/cpu/cpu_common.h), branch-free so
their loops vectorize: every one of the 65536 halves against torch's conversion, float -> half
against torch on boundary and random values, and against a plain reference on all 2^32 floats."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    gxx = shutil.which("g++")
    assert gxx, "g++ is required (it also builds the extensions)"
    exe = str(tmp_path_factory.mktemp("convert") / "convert_check")
    subprocess.run([gxx, "-O2", "-std=c++20", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}/csrc", "-o", exe,
                    os.path.join(ROOT, "tests", "cpu", "convert_check.cpp")], check=True)
    return exe


def _bits32(t):
    return t.contiguous().view(torch.int32)


def test_every_half_to_float(driver):
    out = subprocess.run([driver, "halves"], capture_output=True, check=True).stdout
    got = torch.frombuffer(bytearray(out), dtype=torch.int32)
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    want = _bits32(halves.float())
    nan = torch.isnan(halves)
    assert torch.equal(got[~nan], want[~nan])
    # NaNs keep sign and payload (torch may quiet them; compare the pattern itself)
    pattern = (halves.view(torch.int16).to(torch.int32) & 0xFFFF)[nan]
    expect = ((pattern & 0x8000) << 16) | 0x7F800000 | ((pattern & 0x3FF) << 13)
    assert torch.equal(got[nan], expect)


def test_float_to_half_matches_torch(driver):
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, float("inf"), float("-inf"),
                             2.0**-14, 2.0**-14 * (1 - 2**-11), 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-26,
                             1.0 + 2**-11, 1.0 + 3 * 2**-11, 1e-40])
    # every float whose rounding is a tie somewhere in the half range, plus its neighbours
    ties = torch.arange(0x33000000, 0x47800000, 0x1000, dtype=torch.int64).to(torch.int32)
    vals = torch.cat([wide.view(torch.float32), specials, ties.view(torch.float32), (ties + 1).view(torch.float32),
                      (ties - 1).view(torch.float32)])
    vals = torch.cat([vals, -vals])
    vals = vals[~torch.isnan(vals)]
    out = subprocess.run([driver, "floats"], input=vals.numpy().tobytes(), capture_output=True, check=True).stdout
    got = torch.frombuffer(bytearray(out), dtype=torch.int16)
    assert torch.equal(got, vals.half().view(torch.int16))


def test_float_to_half_all_floats_against_reference(driver):
    out = subprocess.run([driver, "exhaustive"], capture_output=True, text=True, check=True, timeout=300).stdout
    assert int(out) == 0
