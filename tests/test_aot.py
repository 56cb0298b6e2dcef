"""Static report: every shipped kernel compiles for sm_80 and sm_90 with no spills and shared
memory within the per-block limit (and, for Triton MMA kernels, tensor-core instructions)."""
import dataclasses

import pytest

from fasttfm import aot
from fasttfm._cuda_home import find_cuda_home


@pytest.fixture(scope="module")
def cuda_reports():
    if find_cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine: nvcc is needed for the static report")
    return aot.cuda_reports((80, 90))


def test_cuda_kernels_static_report(cuda_reports):
    names = {r.name for r in cuda_reports}
    assert any("layer_norm" in n for n in names), names  # the report saw the kernels
    assert {r.arch for r in cuda_reports} == {80, 90}
    for r in cuda_reports:
        print(r.row())
    assert aot.violations(cuda_reports) == []


def test_triton_kernels_static_report():
    """sm_80, sm_90 and the 99 KiB class (sm_86's lists, compiled for sm_86)."""
    reports = aot.triton_reports((80, 86, 90))
    for r in reports:
        print(r.row())
    assert reports, "no Triton kernel configs were compiled"
    assert {r.arch for r in reports} == {80, 86, 90}
    assert aot.violations(reports) == []


def test_arch_classes():
    """Which config table each compute capability gets; sm_80's 112 KiB forward config must not be
    in the 99 KiB class's lists (the static report above checks every listed one)."""
    from fasttfm.kernels import attention as KA, attention_bwd as KB

    assert KA._arch(80) == KA._arch(87) == 8 and KA._arch(90) == KA._arch(100) == 9
    assert KA._arch(86) == KA._arch(89) == KA._arch(120) == 86
    smem112 = aot.KernelReport("triton", "k", 80, 128, 0, 112 * 1024, 4, True)
    assert aot.violations([smem112]) == [] and aot.violations([dataclasses.replace(smem112, arch=86)])
    assert KA.AttnConfig(128, 64, 8, 3) in KA.fwd_configs(80, 128)
    assert KA.AttnConfig(128, 64, 8, 3) not in KA.fwd_configs(86, 128)
    for d in (64, 128, 256):
        for mods in (False, True):
            assert KB.bwd_configs(86, d, mods=mods).dkdv and KB.bwd_configs(86, d, mods=mods).dq
            assert KA.fwd_configs(86, d, mods=mods)


def test_violations_catch_spills_and_smem():
    ok = aot.KernelReport("cuda", "k", 90, 64, 0, 1024, 0)
    spill = aot.KernelReport("cuda", "k", 80, 255, 48, 1024, 0)
    smem = aot.KernelReport("triton", "k", 80, 128, 0, 200 * 1024, 4, True)
    no_mma = aot.KernelReport("triton", "k", 90, 128, 0, 1024, 0, True)
    assert aot.violations([ok]) == []
    assert len(aot.violations([spill, smem, no_mma])) == 3


def test_ptxas_parser():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 356 bytes cmem[0]
"""
    (r,) = aot._parse_ptxas(log, 80, {"_Z3fooPf": 2}, "x.cu")
    assert (r.registers, r.spill_bytes, r.smem_bytes, r.mma) == (40, 16, 2048, 2)
    assert r.name == "x.cu: foo"


def test_measured_spill_allowance():
    """A config may spill only within the allowance a GPU measurement granted it (MEASURED_SPILLS)."""
    from fasttfm.kernels import attention as KA, attention_bwd as KB

    r = aot.KernelReport("triton", "k", 90, 255, 392, 96 * 1024, 8, True, spill_ok=512)
    assert aot.violations([r]) == []
    assert aot.violations([dataclasses.replace(r, spill_bytes=600)])
    assert aot.violations([dataclasses.replace(r, spill_ok=0)])
    cases = [c for c in KB.aot_cases_bwd(90, 128, KA.torch.bfloat16, "bf16") if c.spill_ok]
    assert [c.name for c in cases] == ["attn_bwd_dkdv[bf16,d128,bm64,bn64,w4,s2]"]
    assert all(c.spill_ok == 0 for c in KB.aot_cases_bwd(80, 128, KA.torch.bfloat16, "bf16"))

def test_replace_configs_copies_and_refuses_drift():
    """Per-Triton-version swaps (kernels/attention_common.py): the copy shares no list with the
    table (sm_86's lists are built from sm_80's), and a swap of a config that is not in the table
    raises instead of being silently ignored when the tables change."""
    from fasttfm.kernels.attention import AttnConfig as C
    from fasttfm.kernels.attention_common import TRITON_VERSION, _version, replace_configs

    a, b, c = C(64, 64, 4, 2), C(64, 64, 8, 2), C(32, 32, 4, 2)
    shared = [a, c]
    table = {8: [(64, shared), (256, [a])], 86: [(64, shared)]}
    out = replace_configs(table, {8: {64: {a: b}}})
    assert out == {8: [(64, [b, c]), (256, [a])], 86: [(64, [a, c])]}
    assert shared == [a, c] and out[86][0][1] is not shared
    assert replace_configs({9: {64: a, 128: c}}, {9: {64: {a: b}}}) == {9: {64: b, 128: c}}
    with pytest.raises(ValueError, match="not in sm_8's d64 list"):
        replace_configs(table, {8: {64: {b: a}}})
    with pytest.raises(ValueError, match="is not sm_9's d64 config"):
        replace_configs({9: {64: a}}, {9: {64: {b: c}}})
    assert _version("3.6.0") == (3, 6) and _version("3.8.0+git1a2b") == (3, 8) and len(TRITON_VERSION) == 2


def test_hdimv_configs_and_cases():
    """q/k head dim != v head dim: configs of the max(D, Dv) bucket, less the ones that spill there
    (sm_90 dQ 64x64 w4 s2 at 192/128: 16 B); equal dims keep the plain lists; the static report
    lists the 192/128 forward, dK/dV and dQ cases for every arch class, named d192v128."""
    import torch

    from fasttfm.kernels import attention_aot as AA, attention_bwd as KB
    from fasttfm.kernels.attention import AttnConfig as C

    for dt in (torch.float16, torch.bfloat16):
        plain = KB.bwd_configs(90, 256, dt)
        assert C(64, 64, 4, 2) in plain.dq
        mla = KB.bwd_configs(90, 192, dt, head_dim_v=128)
        assert mla.dq == [c for c in plain.dq if c != C(64, 64, 4, 2)] and mla.dq and mla.dkdv == plain.dkdv
        assert KB.bwd_configs(90, 192, dt, head_dim_v=192) == KB.bwd_configs(90, 192, dt)
        assert KB.bwd_configs(80, 192, dt, head_dim_v=128) == KB.bwd_configs(80, 256, dt)
    for cc in (80, 86, 90):
        names = [c.name for c in AA.aot_cases(cc) if ",d192v128," in c.name]
        for kernel in ("attn_fwd[", "attn_bwd_dkdv[", "attn_bwd_dq["):
            for dt in ("fp16", "bf16"):
                assert any(n.startswith(f"{kernel}{dt},d192v128,") for n in names), (cc, kernel, dt)
        assert all(c.constexprs["HEAD_DIM_V"] == 128 and c.constexprs["BLOCK_DV"] == 128
                   for c in AA.aot_cases(cc) if ",d192v128," in c.name)
