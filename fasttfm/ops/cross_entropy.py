"""Label-smoothed cross-entropy as torch.library custom ops (``fasttfm::cross_entropy_fwd/bwd``).

Loss of one row with logits x (C classes), target y, optional class weights w (W = sum w; without
weights w = 1 and W = C), lse = log(sum_c exp(x_c)):

    L = a * w_y * (lse - x_y) + b * (W * lse - sum_c w_c x_c) + z * lse^2

  * ``smoothing="torch"`` (``F.cross_entropy(label_smoothing=eps)``): a = 1 - eps, b = eps / C, i.e.
    (1 - eps) * w_y * nll + (eps / C) * sum_c w_c * (-log p_c);
  * ``smoothing="fairseq"`` (fairseq's ``label_smoothed_nll_loss``): eps_i = eps / (C - 1),
    a = 1 - eps - eps_i, b = eps_i (with class weights, the same weighting as torch's);
  * ``z_loss=z`` adds z * lse^2 per non-ignored row (PaLM's auxiliary loss; not scaled by class weights);
    ``return_z_loss=True`` also returns that term, reduced like the loss, for logging;
  * ``softcap=c > 0`` (Gemma 2's ``final_logit_softcapping``): every logit x is replaced by c * tanh(x / c)
    before all of the above, inside the kernels (forward and backward: d/dx gets the factor 1 - tanh^2).

Rows whose target is ``ignore_index`` contribute 0. Reductions follow ``F.cross_entropy`` exactly:
``sum`` adds the row losses; ``mean`` divides by the number of non-ignored rows, or with class weights
by the sum of the targets' weights (so all rows ignored gives NaN, as in torch); ``none`` returns the
row losses in the target's shape. Losses are float32 for fp32/fp16/bf16 logits (fp32 math throughout;
torch returns the logits' dtype) and float64 for float64 logits (plain CPU path only).

Kernels (csrc/cross_entropy.cu, csrc/cpu/cross_entropy_cpu.cpp): the forward reads each row once
(online max and sum-exp, target logit, sum of logits) and saves only the fp32 LSE per row; the
backward recomputes softmax from it and writes the gradient to a new buffer (or, opt-in, into the
logits' own storage: ``inplace_backward``, guarded by the version counter). It takes autograd's
gradient of the row losses (a [rows] tensor, stride 0 after ``sum``/``mean``), so one kernel serves
every reduction. No host synchronization (CUDA graphs, torch.compile). Dispatch: CUDA tensors -> CUDA
kernels; ``FASTTFM_EMULATE=1`` CPU tensors -> the same kernels in the SIMT emulator; otherwise CPU
tensors -> the fused C++ kernel (fp32/fp16/bf16) or, for float64 or without fasttfm._C, the same math
in torch ops (CUDA tensors take those only under ``FASTTFM_ALLOW_FALLBACK=1``, with one warning; otherwise
a missing or broken extension raises). The CUDA forward uses one thread block per row (several rows per
block for C <= ~2k): with fewer rows than a few per SM the GPU is underused (the backward splits long rows instead).

Out-of-range targets (not ignore_index, outside [0, C)): the CPU path raises IndexError; the GPU
kernels cannot raise without a host sync, so they write NaN into that row's loss (hence a NaN mean or
sum) and gradient, and never trigger a device assert.

Layouts: the class dim is dim 1 ((C,), (N, C) or (N, C, d1, ...)). The kernels take a [rows, C] view
with unit class stride: (N, C) with contiguous classes (any row stride) and (N, C, d...) tensors whose
class dim has stride 1 (e.g. ``logits.transpose(1, 2)`` of a (B, T, C) tensor) are read in place;
other layouts (e.g. a contiguous (N, C, d)) are copied once to (N * d, C), and that copy is what
autograd keeps for the backward.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._ext import KERNEL_DTYPES, backend, cpu_kernels_for, cuda_kernels, emu_lib
from ._autocast import keep, register_autocast

__all__ = ["cross_entropy", "smoothing_coefficients", "class_rows", "reduce_rows", "z_loss_term", "ce_fwd_rows",
           "ce_bwd_rows", "ce_bwd_rows_", "REDUCTIONS", "SMOOTHINGS"]

_KERNEL_TYPES = KERNEL_DTYPES
REDUCTIONS = ("none", "mean", "sum")
SMOOTHINGS = ("torch", "fairseq")


def smoothing_coefficients(label_smoothing: float, smoothing: str, num_classes: int) -> Tuple[float, float]:
    """(a, b) of the loss above for a smoothing convention and C classes."""
    eps = float(label_smoothing)
    if smoothing == "torch":
        return 1.0 - eps, eps / num_classes
    eps_i = eps / (num_classes - 1) if num_classes > 1 else 0.0  # C == 1: log p = 0, the loss is 0 anyway
    return 1.0 - eps - eps_i, eps_i


# ---- math in torch ops: float64 (gradcheck) and builds without fasttfm._C ---------------------------

def _bad_rows(target, ignore_index, num_classes):
    valid = target != ignore_index
    return valid, valid & ((target < 0) | (target >= num_classes))


def _raise_bad_target(target, bad, num_classes, ignore_index):
    if target.device.type == "cpu" and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise IndexError(f"fasttfm: cross_entropy: target {int(target[row])} at row {row} is out of bounds for "
                         f"{num_classes} classes (and is not ignore_index={ignore_index})")


def _capped(x, softcap):
    """(logits the loss sees, tanh(x / cap) or None) for the torch-ops path."""
    if not softcap:
        return x, None
    t = torch.tanh(x / softcap)
    return t * softcap, t


def _torch_fwd(logits, target, weight, ignore_index, a, b, z, softcap=0.0):
    x, _ = _capped(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), softcap)
    num_classes = x.shape[1]
    valid, bad = _bad_rows(target, ignore_index, num_classes)
    _raise_bad_target(target, bad, num_classes, ignore_index)
    safe = torch.where(valid & ~bad, target, 0)
    lse = torch.logsumexp(x, 1)
    xt = x.gather(1, safe[:, None]).squeeze(1)
    if weight is None:
        wt, wsum, sx = 1.0, float(num_classes), x.sum(1)
    else:
        w = weight.to(x.dtype)
        wt, wsum, sx = w[safe], w.sum(), x @ w
    loss = a * wt * (lse - xt)
    if b != 0.0:
        loss = loss + b * (wsum * lse - sx)
    if z != 0.0:
        loss = loss + z * lse * lse
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(bad, nan, torch.where(valid, loss, 0.0))
    lse = torch.where(bad, nan, torch.where(valid, lse, 0.0))
    return loss, lse


def _torch_bwd(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap=0.0):
    x, tanh = _capped(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), softcap)
    rows, num_classes = x.shape
    valid, bad = _bad_rows(target, ignore_index, num_classes)
    _raise_bad_target(target, bad, num_classes, ignore_index)
    safe = torch.where(valid & ~bad, target, 0)
    g = dloss.to(x.dtype).expand(rows)
    if weight is None:
        w, wt, wsum = None, torch.ones_like(g), float(num_classes)
    else:
        w = weight.to(x.dtype)
        wt, wsum = w[safe], w.sum()
    coef = g * (a * wt + b * wsum + 2.0 * z * lse.to(x.dtype))
    grad = coef[:, None] * torch.exp(x - lse.to(x.dtype)[:, None])
    grad = grad - (g * b)[:, None] * (1.0 if w is None else w[None, :])
    grad[torch.arange(rows, device=x.device), safe] -= g * a * wt
    if tanh is not None:
        grad = grad * (1.0 - tanh * tanh)
    grad = torch.where(bad[:, None], float("nan"), torch.where(valid[:, None], grad, 0.0))
    return grad.to(logits.dtype)


# ---- low-level entry points (also used by the fused linear + cross-entropy) --------------------------

def _row_kernels(logits):
    """(library, name suffix) of the kernels that take ``logits``: the CUDA kernels (``torch.ops.fasttfm_C``,
    ""), the emulator (``torch.ops.fasttfm_emu``, ""), the CPU C++ kernels (``torch.ops.fasttfm_C``, "_cpu"),
    or (None, "") for torch ops: float64, a CPU install without fasttfm._C, or the CUDA fallback that only
    ``FASTTFM_ALLOW_FALLBACK=1`` allows (else a missing or broken extension raises here)."""
    where = backend(logits)
    if where == "cuda":
        return cuda_kernels("cross_entropy"), ""
    if where == "emu":
        return emu_lib(), ""
    return cpu_kernels_for(logits), "_cpu"


def ce_fwd_rows(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, a: float, b: float,
                z: float, softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Row losses and LSE of logits [rows, C] (unit class stride) on the kernels for its device.

    target: [rows] int64 contiguous; weight: [C] fp32 contiguous (float64 with float64 logits) or None.
    softcap: 0 = off. Returns (loss, lse), each [rows] fp32 (float64 for float64 logits).
    """
    lib, sfx = _row_kernels(logits)
    if lib is None:
        return _torch_fwd(logits, target, weight, ignore_index, a, b, z, softcap)
    return getattr(lib, "cross_entropy_fwd" + sfx)(logits, target, weight, ignore_index, a, b, z, softcap)


def ce_bwd_rows(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap=0.0) -> Tensor:
    """Gradient of sum(dloss * loss) wrt logits, in a new [rows, C] tensor of the logits' dtype."""
    lib, sfx = _row_kernels(logits)
    if lib is None:
        return _torch_bwd(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap)
    return getattr(lib, "cross_entropy_bwd" + sfx)(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap)


def ce_bwd_rows_(logits, dloss, target, weight, lse, ignore_index, a, b, z, softcap=0.0) -> Tensor:
    """In-place variant for buffers nobody else sees (the fused linear + CE's own logits chunk):
    overwrites ``logits`` with the gradient and returns it. Never used on tensors autograd saved."""
    lib, sfx = _row_kernels(logits)
    if lib is not None and (sfx == "" or logits.stride(0) >= logits.shape[1]):  # CPU kernel: rows don't overlap
        getattr(lib, "cross_entropy_bwd_inplace" + sfx)(logits, dloss, target, weight, lse, ignore_index, a, b, z,
                                                        softcap)
    else:
        logits.copy_(_torch_bwd(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap))
    return logits


# ---- custom ops -------------------------------------------------------------------------------------

def _loss_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fasttfm::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, a: float, b: float,
            z: float, inplace_backward: bool, softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """logits [rows, C] (unit class stride), target [rows] int64. Returns loss [rows], lse [rows].
    inplace_backward only changes the autograd backward (see cross_entropy). softcap: 0 = off."""
    return ce_fwd_rows(logits, target, weight, ignore_index, a, b, z, softcap)


@_ce_fwd.register_fake
def _(logits, target, weight, ignore_index, a, b, z, inplace_backward, softcap=0.0):
    rows = logits.shape[0]
    dt = _loss_dtype(logits)
    return logits.new_empty((rows,), dtype=dt), logits.new_empty((rows,), dtype=dt)


@torch.library.custom_op("fasttfm::cross_entropy_bwd", mutates_args=())
def _ce_bwd(dloss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor, ignore_index: int,
            a: float, b: float, z: float, softcap: float = 0.0) -> Tensor:
    """dloss [rows] (any stride, e.g. 0 after sum/mean) -> dlogits [rows, C] (a new contiguous buffer)."""
    return ce_bwd_rows(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap)


@_ce_bwd.register_fake
def _(dloss, logits, target, weight, lse, ignore_index, a, b, z, softcap=0.0):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fasttfm::cross_entropy_bwd_", mutates_args=("logits",))
def _ce_bwd_inplace(logits: Tensor, dloss: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                    ignore_index: int, a: float, b: float, z: float, softcap: float = 0.0) -> None:
    """Overwrites logits [rows, C] (non-overlapping rows) with their gradient; bumps its version counter."""
    ce_bwd_rows_(logits, dloss, target, weight, lse, ignore_index, a, b, z, softcap)


@_ce_bwd_inplace.register_fake
def _(logits, dloss, target, weight, lse, ignore_index, a, b, z, softcap=0.0):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, a, b, z, inplace_backward, *rest = inputs
    _, lse = output
    ctx.args = (ignore_index, a, b, z, rest[0] if rest else 0.0)
    ctx.inplace = inplace_backward and (logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1])
    ctx.save_for_backward(logits, target, weight, lse)


def _backward(ctx, dloss, _dlse):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None, None, None
    logits, target, weight, lse = ctx.saved_tensors
    if ctx.inplace:  # the logits' storage becomes their gradient (opt-in; see cross_entropy)
        _ce_bwd_inplace(logits, dloss.to(lse.dtype), target, weight, lse, *ctx.args)
        dlogits = logits
    else:
        dlogits = _ce_bwd(dloss.to(lse.dtype), logits, target, weight, lse, *ctx.args)
    return dlogits, None, None, None, None, None, None, None, None


torch.library.register_autograd("fasttfm::cross_entropy_fwd", _backward, setup_context=_setup_context)

# Autocast: F.cross_entropy under autocast computes in fp32 (log_softmax with dtype=float32 on CUDA,
# nll_loss on the fp32 lists) and returns an fp32 loss; the kernels already read fp16/bf16 logits in
# fp32 math with fp32 weights and loss, so no cast (and no fp32 copy of the logits) is needed, only
# autocast off inside (the float64 / no-extension fallback is torch ops).
for _name in ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_"):
    register_autocast("fasttfm::" + _name, keep, keep)


# ---- public function ---------------------------------------------------------------------------------

def class_rows(x: Tensor) -> Tensor:
    """[rows, C] view of x ((C,), (N, C) or (N, C, d...), classes in dim 1) with unit class stride;
    a copy only when no such view exists."""
    num_classes = x.shape[0] if x.dim() == 1 else x.shape[1]
    moved = x if x.dim() <= 2 else x.movedim(1, -1)  # (N, d..., C)
    rows = x.numel() // num_classes if num_classes else 0
    try:
        x2 = moved.view(rows, num_classes)
        if (num_classes <= 1 or x2.stride(1) == 1) and x2.stride(0) >= 0:
            return x2
    except RuntimeError:
        pass
    return moved.reshape(rows, num_classes).contiguous()


def _check(name, input, target, weight, reduction, label_smoothing, smoothing, z_loss, softcap=0.0):
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"fasttfm.{name}: input and target must be Tensors")
    where = backend(input)
    if input.dtype not in _KERNEL_TYPES and not (input.dtype == torch.float64 and where == "cpu"):
        raise TypeError(f"fasttfm.{name}: input dtype must be float32, float16 or bfloat16 (float64 only on the "
                        f"plain CPU path), got {input.dtype} on {where}")
    if input.dim() < 1:
        raise ValueError(f"fasttfm.{name}: input must have a class dim (shape (C,), (N, C) or (N, C, d1, ...))")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fasttfm.{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"fasttfm.{name}: smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"fasttfm.{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"fasttfm.{name}: z_loss must be >= 0, got {z_loss}")
    if not float(softcap) >= 0.0 or softcap == float("inf"):
        raise ValueError(f"fasttfm.{name}: softcap must be a finite float >= 0 (0 = off), got {softcap}")
    if target.device != input.device:
        raise ValueError(f"fasttfm.{name}: target is on {target.device} but input is on {input.device}")
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.shape != (num_classes,) or not weight.is_floating_point():
            raise ValueError(f"fasttfm.{name}: weight must be a floating tensor of shape ({num_classes},), got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.device != input.device:
            raise ValueError(f"fasttfm.{name}: weight is on {weight.device} but input is on {input.device}")
    return num_classes


def _check_target(name, input, target):
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"fasttfm.{name}: target must hold class indices as int64 (torch.long) or uint8, got "
                        f"{target.dtype} (class-probability targets are float tensors of the input's shape)")
    expected = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"fasttfm.{name}: target shape {list(target.shape)} must be the input shape "
                         f"{list(input.shape)} without the class dim 1, i.e. {list(expected)}")
    return target.reshape(-1).long().contiguous()


def reduce_rows(loss: Tensor, target1d: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                out_shape) -> Tensor:
    """none/sum/mean of row losses with F.cross_entropy's mean denominator (torch ops, no host sync)."""
    if reduction == "none":
        return loss.view(out_shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    valid = target1d != ignore_index
    if weight is None:
        denom = valid.sum().to(total.dtype)
    else:
        safe = torch.where(valid, target1d, 0).clamp(0, weight.shape[0] - 1)
        denom = torch.where(valid, weight.to(total.dtype)[safe], 0.0).sum()
    return total / denom


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, smoothing: str = "torch",
                  z_loss: float = 0.0, inplace_backward: bool = False, softcap: float = 0.0,
                  return_z_loss: bool = False):
    """Drop-in ``F.cross_entropy`` for class-index targets, plus fairseq smoothing and z-loss.

    input: (C,), (N, C) or (N, C, d1, ...) logits, fp32/fp16/bf16 (float64 on the plain CPU path);
    target: int64 (or uint8) class indices of shape (), (N,) or (N, d1, ...); weight: (C,) class weights.
    ``smoothing``: "torch" (eps / C, F.cross_entropy's) or "fairseq" (eps / (C - 1)); ``z_loss``: adds
    z_loss * lse^2 per non-ignored row; ``softcap=c`` (Gemma 2's final_logit_softcapping, 0 = off): the
    loss is that of the logits c * tanh(input / c), fused (no capped copy; the gradient includes the
    tanh factor). ``return_z_loss=True`` returns ``(loss, z_loss)``: the z-loss term alone, reduced like
    the loss (it is already included in ``loss``), detached -- for logging, as Liger-Kernel's. Returns a float32 loss (float64 for float64 input): a scalar for
    "mean"/"sum", the target's shape for "none". Float (class-probability) targets are passed to
    ``torch.nn.functional.cross_entropy`` when smoothing="torch" and z_loss=0 (not fused).
    See the module docstring for the exact formulas, layouts and out-of-range targets.

    ``inplace_backward=True`` (opt-in) writes the gradient into the logits' own storage during the
    backward instead of a new (N x C) buffer: less memory and no page faults for a fresh buffer. The
    logits' values are gone after backward, so use it only for logits nobody reads afterwards (an LM
    head's output). The write goes through a mutating op, so autograd's version counter sees it: any
    other autograd node that saved these logits raises "modified by an inplace operation" instead of
    using corrupted values. Reading the logits yourself after backward (e.g. for accuracy) is NOT
    detected. Inputs whose class-rows view had to be copied (see the module docstring) overwrite that
    private copy, and inputs with overlapping rows (stride-0 broadcasts) use a new buffer.
    """
    num_classes = _check("cross_entropy", input, target, weight, reduction, label_smoothing, smoothing, z_loss,
                         softcap)
    if target.is_floating_point():
        if smoothing != "torch" or z_loss:
            raise ValueError("fasttfm.cross_entropy: class-probability (float) targets support only smoothing='torch' "
                             "and z_loss=0; pass int64 class indices")
        x = _capped(input, float(softcap))[0]
        loss = torch.nn.functional.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                                                 label_smoothing=label_smoothing)
        return (loss, torch.zeros_like(loss).detach()) if return_z_loss else loss
    t = _check_target("cross_entropy", input, target)
    w = None if weight is None else weight.detach().to(_loss_dtype(input)).contiguous()
    a, b = smoothing_coefficients(label_smoothing, smoothing, num_classes)
    loss, lse = _ce_fwd(class_rows(input), t, w, int(ignore_index), a, b, float(z_loss), bool(inplace_backward),
                        float(softcap))
    loss = reduce_rows(loss, t, w, int(ignore_index), reduction, target.shape)
    if not return_z_loss:
        return loss
    return loss, z_loss_term(lse, t, w, int(ignore_index), reduction, target.shape, float(z_loss))


def z_loss_term(lse: Tensor, target1d: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                out_shape, z: float) -> Tensor:
    """z * lse^2 per row (0 for ignored rows, whose lse is 0), reduced as the loss, detached."""
    lse = lse.detach()
    return reduce_rows(z * lse * lse, target1d, weight, ignore_index, reduction, out_shape)
