"""The attention kernels' static-report cases: ``aot_cases(cc)`` collects the forward
(``attention.aot_cases_fwd``), backward (``attention_bwd.aot_cases_bwd``) and decode
(``attention_decode.aot_cases_decode``) lists plus the variants that combine constexpr flags
(chunked + varlen, softcap + ALiBi + dropout, key padding + seqused_k + segments) and the
q/k head dim != v head dim cases (``_hdimv``, 192/128). It is the only
module importing all three, so none of them imports another (see ``kernels/_aot.py``).
"""
import dataclasses

import torch

from . import attention as _fwd, attention_bwd as _bwd, attention_decode as _dec
from .attention_common import _DT, _arch

__all__ = ["aot_cases"]


def _chunked_varlen(cases):
    """CHUNKED + VARLEN variants of each kernel's first bf16 d128 case (the default config)."""
    out, seen = [], set()
    for case in cases:
        if ",d128," in case.name and "bf16" in case.name and case.kernel not in seen:
            seen.add(case.kernel)
            out.append(dataclasses.replace(case, name=case.name.replace("]", ",chunked,varlen]"),
                                           constexprs=dict(case.constexprs, CHUNKED=True, VARLEN=True)))
    return out


def _modified(cc):
    """softcap + ALiBi + dropout together (the heaviest score path) for the configs modified problems
    launch (fwd_configs/bwd_configs with mods=True): fp16 at every head-dim bucket, bf16 at d128."""
    cases = []
    tma = _arch(cc) == 9
    mods = dict(SOFTCAP=True, ALIBI=True, DROPOUT=True)
    for d, dtype in ((64, torch.float16), (128, torch.float16), (256, torch.float16), (128, torch.bfloat16)):
        dt = _DT[dtype]
        bc = _bwd.bwd_configs(cc, d, dtype, mods=True)
        cases.append(_fwd._fwd_case(cc, d, dt, _fwd.fwd_configs(cc, d, dtype, True)[0], tma, **mods))
        cases.append(_bwd._bwd_case(cc, "dkdv", d, dt, bc.dkdv[0], **mods))
        cases.append(_bwd._bwd_case(cc, "dq", d, dt, bc.dq[0], **mods))
    return cases


def _masked(cc):
    """Key padding + seqused_k + segments together (KPAD, SEQUSED, SEGMENTS: the heaviest mask path)
    for the one config per kernel a masked problem launches (fwd_configs/bwd_configs masks=True):
    bf16 at every head-dim bucket, fp16 with softcap + ALiBi + dropout on top, fp32 at d64."""
    cases = []
    masks = dict(KPAD=True, SEQUSED=True, SEGMENTS=True)
    mod = dict(SOFTCAP=True, ALIBI=True, DROPOUT=True)
    combos = [(d, dt, m) for d in (64, 128, 256) for dt, m in ((torch.bfloat16, {}), (torch.float16, mod))]
    for d, dtype, mods in combos + [(64, torch.float32, {})]:
        dt = _DT[dtype]
        bc = _bwd.bwd_configs(cc, d, dtype, bool(mods), masks=True)
        fc = _fwd.fwd_configs(cc, d, dtype, bool(mods), masks=True)[0]
        cases.append(_fwd._fwd_case(cc, d, dt, fc, _arch(cc) == 9 and dt != "fp32", **mods, **masks))
        cases.append(_bwd._bwd_case(cc, "dkdv", d, dt, bc.dkdv[0], **mods, **masks))
        cases.append(_bwd._bwd_case(cc, "dq", d, dt, bc.dq[0], **mods, **masks))
    # varlen + seqused_k (FlashAttention-3 style), the masked default configs at bf16 d128
    vs = [dataclasses.replace(c, name=c.name.replace(",kpad,seqused,segments", ",varlen,seqused"),
                              constexprs=dict(c.constexprs, VARLEN=True, KPAD=False, SEGMENTS=False))
          for c in cases if "bf16,d128," in c.name]
    return cases + vs


def _hdimv(cc, d=192, dv=128):
    """q/k head dim != v head dim (DeepSeek-V3 MLA's 192/128): every plain forward, dK/dV and dQ config
    the launchers pick by max(d, dv) (fp16 and bf16; sm_90's forward with and without TMA), plus the
    modified (softcap + ALiBi + dropout, fp16) and masked (key padding + seqused_k + segments, bf16)
    configs. Named "d{d}v{dv}"."""
    cases = []
    tma = (True, False) if _arch(cc) == 9 else (False,)
    for dtype in (torch.float16, torch.bfloat16):
        dt = _DT[dtype]
        cases += [_fwd._fwd_case(cc, d, dt, cfg, t, dv=dv) for cfg in _fwd.fwd_configs(cc, max(d, dv), dtype)
                  for t in tma]
        bc = _bwd.bwd_configs(cc, d, dtype, head_dim_v=dv)
        cases += [_bwd._bwd_case(cc, which, d, dt, cfg, dv=dv) for which, lst in (("dkdv", bc.dkdv), ("dq", bc.dq))
                  for cfg in lst]
    for dtype, flags in ((torch.float16, dict(SOFTCAP=True, ALIBI=True, DROPOUT=True)),
                         (torch.bfloat16, dict(KPAD=True, SEQUSED=True, SEGMENTS=True))):
        dt, mods, masks = _DT[dtype], "SOFTCAP" in flags, "KPAD" in flags
        fc = _fwd.fwd_configs(cc, max(d, dv), dtype, mods, masks)[0]
        bc = _bwd.bwd_configs(cc, d, dtype, mods, masks, head_dim_v=dv)
        cases.append(_fwd._fwd_case(cc, d, dt, fc, tma[0], dv=dv, **flags))
        cases.append(_bwd._bwd_case(cc, "dkdv", d, dt, bc.dkdv[0], dv=dv, **flags))
        cases.append(_bwd._bwd_case(cc, "dq", d, dt, bc.dq[0], dv=dv, **flags))
    return cases


def aot_cases(cc):
    """Every attention config fasttfm may launch on ``cc`` (80, 86 or 90): forward, backward (fp16
    and bf16 at d64/128/256, fp32 at d64), the flag combinations above, decode, and d192/dv128."""
    cases = _fwd.aot_cases_fwd(cc)
    for d in (64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            cases += _bwd.aot_cases_bwd(cc, d, dtype, _DT[dtype])
    cases += _bwd.aot_cases_bwd(cc, 64, torch.float32, "fp32")
    cases += _chunked_varlen(cases)
    cases += _modified(cc)
    cases += _masked(cc)
    cases += _dec.aot_cases_decode(cc)
    cases += _hdimv(cc)
    return cases
