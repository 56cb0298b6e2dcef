"""Fused linear + cross-entropy (``fasttfm::linear_cross_entropy_fwd/bwd``) that never materializes logits.

loss = cross_entropy(hidden @ weight.T + bias, target, ...) with every option of
:func:`fasttfm.cross_entropy` (class weights, ignore_index, reductions, torch/fairseq smoothing,
z-loss, logit softcapping, the z-loss term returned for logging). Shapes: hidden (*, H), weight (V, H), bias (V,) or None, target (*) int64; hidden, weight
and bias share one dtype (fp32/fp16/bf16; float64 on the plain CPU path).

How: rows are processed in chunks of ``chunk`` rows, so at most a [chunk, V] logits buffer (in the
input dtype, like the unfused ``F.linear``) exists at a time. Per chunk: logits = h @ W^T (+ b), the
cross-entropy forward kernel gives the row losses and LSE, and -- the standard trick (Liger-Kernel,
quack) -- when gradients are needed the backward kernel immediately overwrites the same buffer with
d(loss)/d(logits), from which grad_hidden[chunk] = dlogits @ W is written and grad_weight += dlogits^T
@ h, grad_bias += sum(dlogits) are accumulated (fp32 accumulators for fp16/bf16). For reduction
"mean"/"sum" the gradient of the reduced loss is known in the forward, so the forward stores
grad_hidden [N, H] and grad_weight [V, H] (and grad_bias) and the backward only scales them by the
incoming scalar gradient. For reduction "none" the row gradients are only known in the backward, which
recomputes the logits chunk by chunk (one more pass of GEMMs, same memory bound).

Peak extra memory: the [chunk, V] logits/gradient buffer (fp32 copies of it on the CPU for fp16/bf16
grad_weight), grad_hidden, grad_weight (fp32 [V, H] while accumulating for fp16/bf16) and per-row
vectors -- instead of several [N, V] tensors (logits, log-probs, their gradients) unfused. The chunk
adapts to the sizes (:func:`default_chunk_rows`: logits chunk ~4x the hidden activations, a power of
two between 64 and 2^28 / V rows); ``chunk_size`` overrides it. Results equal the unfused computation
up to floating-point summation order (grad_weight is summed chunk by chunk).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._ext import backend
from ._autocast import autocast_dtype, register_lowp_autocast
from .cross_entropy import (REDUCTIONS, SMOOTHINGS, _KERNEL_TYPES, _loss_dtype, ce_bwd_rows_, ce_fwd_rows,
                            smoothing_coefficients, z_loss_term)

__all__ = ["linear_cross_entropy", "default_chunk_rows"]

_REDUCTION_CODE = {"none": 0, "sum": 1, "mean": 2}


def default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: a [chunk, vocab] logits buffer about 4x the [rows, hidden] activations (at least
    2^22 elements), a power of two, at least min(rows, 64) and at most 2^28 / vocab rows (1 GiB of fp32
    logits), never more than rows."""
    want = max(4 * rows * hidden, 1 << 22) // max(vocab, 1)
    chunk = 1 << max(0, int(want).bit_length() - 1)
    hi = max(64, (1 << 28) // max(vocab, 1))
    return int(max(1, min(rows, max(64, min(chunk, hi)))))


def _mm_accumulate_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly fp16/bf16 (fp32 accumulation of every chunk)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # fp32 output of a bf16/fp16 GEMM
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _acc_dtype(t: Tensor):
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _run(hidden, weight, target, bias, class_weight, ignore_index, a, b, z, dloss, need_h, need_w, need_b, chunk,
         softcap=0.0):
    """One pass over row chunks. dloss: None (losses only) or the per-row gradient of the row losses
    ([rows] or 0-d). Returns (loss [rows], grad_hidden | None, grad_weight | None, grad_bias | None,
    lse [rows])."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    loss = hidden.new_empty((rows,), dtype=_loss_dtype(hidden))
    lse_all = torch.empty_like(loss)
    grads = dloss is not None
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grads and need_h else None
    gw = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device) if grads and need_w else None
    gb = torch.zeros((vocab,), dtype=_acc_dtype(bias), device=bias.device) if grads and need_b else None
    wt = weight.t()
    for s in range(0, rows, chunk):
        e = min(rows, s + chunk)
        h, t = hidden[s:e], target[s:e]
        logits = torch.addmm(bias, h, wt) if bias is not None else torch.mm(h, wt)  # [chunk, V], our own buffer
        loss_c, lse = ce_fwd_rows(logits, t, class_weight, ignore_index, a, b, z, softcap)
        loss[s:e] = loss_c
        lse_all[s:e] = lse
        if not grads:
            continue
        d = dloss if dloss.dim() == 0 else dloss[s:e]
        g = ce_bwd_rows_(logits, d, t, class_weight, lse, ignore_index, a, b, z, softcap)  # logits -> dlogits, in place
        if gh is not None:
            torch.mm(g, weight, out=gh[s:e])
        if gw is not None:
            _mm_accumulate_(gw, g.t(), h)
        if gb is not None:
            gb.add_(g.sum(0, dtype=gb.dtype))
        del logits, g
    return (loss, gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
            lse_all)


def _mean_scale(target, class_weight, ignore_index, dtype):
    valid = target != ignore_index
    if class_weight is None:
        return 1.0 / valid.sum().to(dtype)
    safe = torch.where(valid, target, 0).clamp(0, class_weight.shape[0] - 1)
    return 1.0 / torch.where(valid, class_weight.to(dtype)[safe], 0.0).sum()


def _empty(t):
    return t.new_empty((0,))


@torch.library.custom_op("fasttfm::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], class_weight: Optional[Tensor],
             ignore_index: int, a: float, b: float, z: float, reduction: int, need_h: bool, need_w: bool,
             need_b: bool, chunk: int, softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [V, H], target [N] int64. reduction 0 none / 1 sum / 2 mean.
    Returns (loss [N] or [], grad_hidden, grad_weight, grad_bias, lse [N]); the gradients (of the reduced
    loss, computed only for sum/mean and when requested, else empty) are saved for the backward."""
    dloss = None
    if reduction != 0 and (need_h or need_w or need_b):
        dt = _loss_dtype(hidden)
        dloss = (torch.ones((), dtype=dt, device=hidden.device) if reduction == 1 else
                 _mean_scale(target, class_weight, ignore_index, dt))
    loss, gh, gw, gb, lse = _run(hidden, weight, target, bias, class_weight, ignore_index, a, b, z, dloss, need_h,
                                 need_w, need_b, chunk, softcap)
    if reduction == 1:
        loss = loss.sum()
    elif reduction == 2:
        scale = dloss if dloss is not None else _mean_scale(target, class_weight, ignore_index, loss.dtype)
        loss = loss.sum() * scale
    return (loss, _empty(hidden) if gh is None else gh, _empty(weight) if gw is None else gw,
            _empty(weight) if gb is None else gb, lse)


@_lce_fwd.register_fake
def _(hidden, weight, target, bias, class_weight, ignore_index, a, b, z, reduction, need_h, need_w, need_b, chunk,
      softcap=0.0):
    rows = hidden.shape[0]
    grads = reduction != 0
    loss = hidden.new_empty((rows,) if reduction == 0 else (), dtype=_loss_dtype(hidden))
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grads and need_h else _empty(hidden)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if grads and need_w else _empty(weight)
    gb = bias.new_empty(bias.shape) if grads and need_b and bias is not None else _empty(weight)
    return loss, gh, gw, gb, hidden.new_empty((rows,), dtype=_loss_dtype(hidden))


@torch.library.custom_op("fasttfm::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(dloss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
             class_weight: Optional[Tensor], ignore_index: int, a: float, b: float, z: float, need_h: bool,
             need_w: bool, need_b: bool, chunk: int, softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """reduction "none": recomputes the logits chunk by chunk with the row gradients dloss [N]."""
    _, gh, gw, gb, _ = _run(hidden, weight, target, bias, class_weight, ignore_index, a, b, z,
                            dloss.to(_loss_dtype(hidden)), need_h, need_w, need_b, chunk, softcap)
    return (_empty(hidden) if gh is None else gh, _empty(weight) if gw is None else gw,
            _empty(weight) if gb is None else gb)


@_lce_bwd.register_fake
def _(dloss, hidden, weight, target, bias, class_weight, ignore_index, a, b, z, need_h, need_w, need_b, chunk,
      softcap=0.0):
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else _empty(hidden)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else _empty(weight)
    gb = bias.new_empty(bias.shape) if need_b and bias is not None else _empty(weight)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, class_weight, ignore_index, a, b, z, reduction, need_h, need_w, need_b, chunk, \
        *rest = inputs
    ctx.recompute = reduction == 0
    ctx.args = (ignore_index, a, b, z)
    ctx.need = (need_h, need_w, need_b and bias is not None)
    ctx.chunk = chunk
    ctx.softcap = rest[0] if rest else 0.0
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, target, bias, class_weight)
    else:
        _, gh, gw, gb, _ = output
        ctx.save_for_backward(gh, gw, gb)


def _backward(ctx, dloss, _gh, _gw, _gb, _lse):
    if ctx.recompute:
        hidden, weight, target, bias, class_weight = ctx.saved_tensors
        gh, gw, gb = _lce_bwd(dloss, hidden, weight, target, bias, class_weight, *ctx.args, *ctx.need, ctx.chunk,
                              ctx.softcap)
    else:
        gh, gw, gb = (g * dloss.to(g.dtype) if g.numel() else g for g in ctx.saved_tensors)
    need_h, need_w, need_b = ctx.need
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b else None,
            None, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fasttfm::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)
# Autocast: the matmuls follow it as the unfused F.linear does (hidden, weight and bias in the autocast
# dtype); the cross-entropy is fp32 math anyway, like F.cross_entropy under autocast; the loss is fp32.
register_lowp_autocast("fasttfm::linear_cross_entropy_fwd", (0, 1, 3))
register_lowp_autocast("fasttfm::linear_cross_entropy_bwd", (1, 2, 4))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         smoothing: str = "torch", z_loss: float = 0.0, class_weight: Optional[Tensor] = None,
                         chunk_size: Optional[int] = None, softcap: float = 0.0, return_z_loss: bool = False):
    """``cross_entropy(F.linear(hidden, weight, bias), target, ...)`` without materializing the logits.

    hidden: (*, H); weight: (V, H) (an ``nn.Linear``/LM-head weight); bias: (V,) or None; target: (*)
    int64 class indices; class_weight: (V,) class weights (``weight`` of F.cross_entropy). All loss
    options as :func:`fasttfm.cross_entropy`, ``softcap`` (the logits capped to c * tanh(logits / c) in
    the chunks, forward and backward) and ``return_z_loss`` (returns ``(loss, z_loss)``) included. Returns a float32 loss (float64 for float64 input): a
    scalar for "mean"/"sum", the target's shape for "none". Under ``torch.autocast`` hidden, weight and
    bias are cast to the autocast dtype for the matmuls, as ``F.linear`` is (fp32 master weights keep
    fp32 gradients), and the loss stays fp32, as ``F.cross_entropy``'s. See the module docstring for the
    chunking, the gradients stored by the forward, and memory.
    """
    if not all(isinstance(t, Tensor) for t in (hidden, weight, target)):
        raise TypeError("fasttfm.linear_cross_entropy: hidden, weight and target must be Tensors")
    where = backend(hidden)
    if hidden.dtype not in _KERNEL_TYPES and not (hidden.dtype == torch.float64 and where == "cpu"):
        raise TypeError(f"fasttfm.linear_cross_entropy: hidden dtype must be float32, float16 or bfloat16 (float64 "
                        f"only on the plain CPU path), got {hidden.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fasttfm.linear_cross_entropy: weight must be (V, H) with H = hidden.shape[-1]; got hidden "
                         f"{list(hidden.shape)} and weight {list(weight.shape)}")
    vocab = weight.shape[0]
    for name, p in (("weight", weight), ("bias", bias)):  # dtypes as the op sees them (autocast casts them)
        if p is None:
            continue
        if autocast_dtype(p) != autocast_dtype(hidden) or p.device != hidden.device:
            raise TypeError(f"fasttfm.linear_cross_entropy: {name} must have hidden's dtype and device "
                            f"({hidden.dtype}, {hidden.device}), or both be cast by torch.autocast; got "
                            f"{p.dtype} on {p.device}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"fasttfm.linear_cross_entropy: bias must be ({vocab},), got {list(bias.shape)}")
    if reduction not in REDUCTIONS or smoothing not in SMOOTHINGS:
        raise ValueError(f"fasttfm.linear_cross_entropy: reduction must be in {REDUCTIONS} and smoothing in "
                         f"{SMOOTHINGS}, got {reduction!r}, {smoothing!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0 or not float(z_loss) >= 0.0:
        raise ValueError("fasttfm.linear_cross_entropy: label_smoothing must be in [0, 1] and z_loss >= 0")
    if not float(softcap) >= 0.0 or softcap == float("inf"):
        raise ValueError(f"fasttfm.linear_cross_entropy: softcap must be a finite float >= 0 (0 = off), got {softcap}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"fasttfm.linear_cross_entropy: target must hold int64 class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]) or target.device != hidden.device:
        raise ValueError(f"fasttfm.linear_cross_entropy: target shape {list(target.shape)} must be hidden's without "
                         f"the last dim, {list(hidden.shape[:-1])}, on hidden's device")
    if class_weight is not None and (class_weight.shape != (vocab,) or class_weight.device != hidden.device):
        raise ValueError(f"fasttfm.linear_cross_entropy: class_weight must be ({vocab},) on hidden's device")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).long().contiguous()
    cw = None if class_weight is None else class_weight.detach().to(_loss_dtype(hidden)).contiguous()
    a, b = smoothing_coefficients(label_smoothing, smoothing, vocab)
    chunk = int(chunk_size) if chunk_size else default_chunk_rows(h2.shape[0], h2.shape[1], vocab)
    if chunk < 1:
        raise ValueError(f"fasttfm.linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    out = _lce_fwd(h2, weight, t, bias, cw, int(ignore_index), a, b, float(z_loss), _REDUCTION_CODE[reduction],
                   need_h, need_w, need_b, chunk, float(softcap))
    loss = out[0].view(target.shape) if reduction == "none" else out[0]
    if not return_z_loss:
        return loss
    return loss, z_loss_term(out[4], t, cw, int(ignore_index), reduction, target.shape, float(z_loss))
