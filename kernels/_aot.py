"""The contract between kernel files and the static report (``python -m fasttfm aot``).

Every kernel module exposes ``aot_cases(cc: int) -> list[AotCase]``: one entry per kernel and
per config it may launch on compute capability ``cc`` (80 or 90). The attention kernels are
collected by one module, ``attention_aot.py`` (forward, backward and decode list their own cases
under other names, so none is compiled twice). The report compiles each with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
options=dict(num_warps=..., num_stages=...))`` and reads registers, spills, shared memory and
tensor-core instruction counts from the cubin. A test fails on any spill or any shared-memory
use above the target's per-block limit.
"""
import dataclasses

__all__ = ["AotCase"]


@dataclasses.dataclass(frozen=True)
class AotCase:
    name: str  # e.g. "attn_fwd[d128,bm128,bn64,causal]"
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    num_warps: int
    num_stages: int
    tensor_core: bool = True  # whether the kernel is expected to use MMA (HGMMA on sm_90)
    tma: bool = False  # whether the kernel is expected to load through TMA (UTMALDG on sm_90)
    # ASTSource ``attrs``: the specializations the JIT applies at launch for typical inputs, e.g.
    # {(arg_index,): [["tt.divisibility", 16]]} for 16-byte-aligned pointers and strides divisible
    # by 16. Without them pointer loads are not vectorized/pipelined and the report overstates
    # registers and spills (attention fwd d64 128x128: 255 regs + 360 B stack without, 174 with).
    attrs: dict = dataclasses.field(default_factory=dict)
    # Stack bytes this config may spill: nonzero only for configs a GPU measured faster than every
    # spill-free candidate (kernels/attention_bwd.py MEASURED_SPILLS says which and by how much).
    spill_ok: int = 0
