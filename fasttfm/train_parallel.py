"""Parallelism of the training loop beyond plain DDP: context parallelism and FSDP2.

    torchrun --standalone --nproc_per_node=4 -m fasttfm train --preset cpu --context-parallel 2
    torchrun --standalone --nproc_per_node=2 -m fasttfm train --preset gpu --fsdp

``--context-parallel N``: the W processes form W / N data-parallel replicas of N consecutive ranks;
each replica's ranks share its slice of the global batch and hold 1/N of every sequence (zigzag
order when T is a multiple of 2N, else contiguous; positions are the shard's global ones) and
attention is ``fasttfm.distributed.ring_attention`` over the replica's group. Every rank's loss is
the mean over its shard's tokens: their mean over all ranks is the full batch's mean loss, and
gradients averaged over all W ranks (DDP or FSDP) are its gradients, so the loss and perplexity
equal one process's on the same global batch (up to summation order).

``--fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every Transformer block and on the
root (embeddings, final norm and the tied head), parameters sharded over all W ranks, with a
``MixedPrecisionPolicy`` (parameters in the AMP dtype, gradient reduction in fp32) when AMP is on.
Checkpoints hold full (unsharded) state dicts, gathered on every rank and written by rank 0; the
optimizer's is keyed by parameter name (``torch.distributed.checkpoint.state_dict``), and a run
resumes from it with or without ``--fsdp``, on any number of processes. The end-of-run sample runs
on rank 0 on a plain copy built from the gathered weights.
"""
import contextlib

import torch
import torch.distributed as dist

from .model import GPT, ContextParallel

__all__ = ["Parallel", "check_config"]


def check_config(cfg, seq_len):
    """Raise ValueError (the same on every rank) for settings the parallel modes do not support."""
    cp = cfg.context_parallel
    if cp < 1:
        raise ValueError(f"TrainConfig: context_parallel must be >= 1, got {cp}")
    if cp > 1:
        if seq_len % cp:
            raise ValueError(f"TrainConfig: seq_len ({seq_len}) must be divisible by context_parallel ({cp})")
        if cfg.kernels != "fasttfm" or cfg.attention == "chunked":
            raise ValueError("TrainConfig: context_parallel needs kernels='fasttfm' and causal or sliding attention, "
                             f"got kernels={cfg.kernels!r}, attention={cfg.attention!r}")
        if cfg.compile:
            raise ValueError("TrainConfig: context_parallel does not support compile (the ring runs eagerly)")
    if cfg.fsdp:
        if cfg.amp == "fp16":
            raise ValueError("TrainConfig: fsdp supports amp none/bf16/auto (bf16 on GPUs), not fp16 (no sharded "
                             "GradScaler here)")


class Parallel:
    """How this rank takes part: data-parallel index/size, its sequence shard, the model wrapper."""

    def __init__(self, cfg, rank, world, seq_len, device):
        cp = cfg.context_parallel
        if world % cp:
            raise ValueError(f"train: context_parallel ({cp}) must divide the number of processes ({world})")
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.cp_size, self.dp_world, self.dp_rank = cp, world // cp, rank // cp
        self.cp = None
        if cp > 1:
            group = None
            for g in range(world // cp):           # every rank creates every group (new_group is collective)
                ranks = list(range(g * cp, (g + 1) * cp))
                pg = dist.new_group(ranks) if cp < world else None
                if rank in ranks:
                    group = pg
            order = "zigzag" if seq_len % (2 * cp) == 0 else "contiguous"
            self.cp = ContextParallel(group, rank % cp, cp, order)

    def describe(self):
        parts = []
        if self.cp:
            parts.append(f"context parallel {self.cp_size} ({self.cp.order}), {self.dp_world} data-parallel replicas")
        if self.cfg.fsdp:
            parts.append("FSDP2 (fully_shard)")
        return ", ".join(parts)

    # -- model ------------------------------------------------------------------------------------
    def _amp_dtype(self):
        amp = self.cfg.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "none"
        return {"bf16": torch.bfloat16}.get(amp)

    def shard_model(self, model):
        """Before the optimizer is built: context parallelism on the model, and FSDP2 on blocks and
        root when --fsdp (in place)."""
        amp_dtype = self._amp_dtype()
        if self.cp:
            model.set_context_parallel(self.cp)
        if not self.cfg.fsdp:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else \
            MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def wrap(self, fwd):
        """The module the loop calls: DDP over all ranks (when W > 1 and not FSDP) or fwd itself."""
        if self.world == 1 or self.cfg.fsdp:
            return fwd
        return torch.nn.parallel.DistributedDataParallel(
            fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def no_sync(self, wrapped, model, last):
        """Context of a micro-step: gradient sync only on the last one."""
        if self.world == 1 or last:
            if self.cfg.fsdp:
                model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return wrapped.no_sync()

    # -- data -------------------------------------------------------------------------------------
    def micro_slice(self, micro, batch_size):
        """[lo, hi) of this rank's sequences in the step's global batch (shared by a CP group)."""
        lo = (micro * self.dp_world + self.dp_rank) * batch_size
        return lo, lo + batch_size

    def shard(self, x, y):
        """This rank's (B, T / N) shards of x and y (B, T) under context parallelism, else x, y."""
        if not self.cp:
            return x, y
        from .distributed import shard_sequence

        kw = dict(rank=self.cp.rank, world=self.cp.world, order=self.cp.order)
        return shard_sequence(x, 1, **kw), shard_sequence(y, 1, **kw)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dicts(self, model, optimizer):
        """(model, optimizer) state dicts; under FSDP the full ones (a collective: call on every rank)."""
        if not self.cfg.fsdp:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)

    def load_state_dicts(self, model, optimizer, model_sd, optim_sd):
        """Load full state dicts into the (possibly sharded) model and optimizer. Optimizer states
        keyed by parameter name (written under --fsdp) load through torch.distributed.checkpoint's
        set_state_dict, with or without FSDP; index-keyed ones (written without) only without FSDP."""
        by_name = all(isinstance(key, str) for key in optim_sd.get("state", {}))
        if not by_name and self.cfg.fsdp and optim_sd.get("state"):
            raise ValueError("train: this checkpoint was written without --fsdp (optimizer state keyed by index); "
                             "resume it without --fsdp")
        if not self.cfg.fsdp and not by_name:
            model.load_state_dict(model_sd)
            optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))

    def local_model(self, model, wanted=True):
        """A model one rank can run alone (sampling): context parallelism stopped; under FSDP a plain
        copy built from the gathered full weights (a collective: call on every rank; the copy is
        returned where ``wanted``, None elsewhere). Without FSDP, ``model`` itself."""
        if self.cp:
            model.set_context_parallel(None)
        if not self.cfg.fsdp:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not wanted:
            return None
        plain = GPT(model.config, kernels=model.kernels).to(self.device)
        plain.load_state_dict(full)
        return plain
