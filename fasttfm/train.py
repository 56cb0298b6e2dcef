"""The training loop behind ``python -m fasttfm train [--preset cpu|gpu|tiny] [--option value ...]``.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, AMP (bf16, or fp16
with a GradScaler), optional torch.compile, evaluation loss and perplexity, a progress line,
CSV and TensorBoard logs, atomic checkpoints with exact resume, a sample at the end, and DDP
under torchrun (gloo on the CPU, nccl on GPUs):

    torchrun --standalone --nproc_per_node=2 -m fasttfm train --preset cpu

Global batch per optimizer step = batch_size x grad_accum x world_size sequences; the data order
does not depend on how that batch is split over processes and micro-steps, so 2 processes with
batch_size=B make the same update as 1 process with batch_size=2B.

Checkpoint (``out_dir/ckpt.pt``, the one before it kept as ``ckpt.prev.pt``): atomic, checksummed
(fasttfm/checkpoint.py, whose ``CheckpointError``, ``save_checkpoint`` and ``load_checkpoint`` this
module re-exports). ``load_checkpoint(path)`` returns the state dict (model, optimizer, scheduler,
scaler, RNG states per rank, data position, step, configs, tokenizer).
"""
import contextlib
import csv
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist

from .checkpoint import (CheckpointError, describe_previous, is_damaged, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .data import DataCursor, PackedWindows, Tokenizer, load_corpus
from .model import GPT, GPTConfig
from .train_parallel import Parallel, check_config

__all__ = ["TrainConfig", "PRESETS", "preset", "train", "evaluate", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "describe_previous"]


@dataclass
class TrainConfig:
    # data
    data: str = "shakespeare"       # bundled corpus name, a text file, or a wikitext-style directory
    tokenizer: str = "char"         # char | byte
    val_fraction: float = 0.1       # for a single text file: the last fraction validates
    # model (see fasttfm.model.GPTConfig; vocab_size comes from the tokenizer)
    kernels: str = "fasttfm"        # fasttfm | torch
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    d_model: int = 128
    d_ff: int = 0
    max_seq_len: int = 128
    dropout: float = 0.0
    norm: str = "layernorm"
    positions: str = "learned"
    attention: str = "causal"
    window: int = 64
    chunk_size: int = 64
    bias: bool = True
    tie_embeddings: bool = True
    # optimization
    seq_len: int = 0                # training sequence length; 0 = max_seq_len
    batch_size: int = 16            # sequences per micro-step per process
    grad_accum: int = 1
    max_steps: int = 600            # length of the LR schedule
    stop_at: int = 0                # stop after this step (0 = max_steps); the schedule still spans max_steps
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0 = off
    amp: str = "auto"               # auto (bf16/fp16 on CUDA, off on CPU) | none | bf16 | fp16
    compile: bool = False
    context_parallel: int = 1       # shard each sequence over this many ranks (ring attention; train_parallel.py)
    fsdp: bool = False              # FSDP2 (fully_shard) instead of DDP
    device: str = "auto"            # auto | cpu | cuda
    seed: int = 1337
    threads: int = 0                # torch CPU threads; 0 = torch's default
    # evaluation, logging, checkpoints, sample
    eval_interval: int = 100        # 0 = only at the end, -1 = never
    eval_iters: int = 10            # validation batches per evaluation; 0 = the whole split
    log_interval: int = 10          # progress lines when stdout is not a terminal
    ckpt_interval: int = 0          # 0 = at every evaluation
    out_dir: str = "runs/train"
    save: bool = True               # checkpoints, CSV and TensorBoard logs
    tensorboard: bool = True
    resume: str = ""                # "" | "auto" (out_dir/ckpt.pt) | a checkpoint path
    sample_tokens: int = 300
    sample_prompt: str = "\n"
    temperature: float = 0.8
    top_k: int = 0
    quiet: bool = False

    def model_config(self, vocab_size: int) -> GPTConfig:
        names = {f.name for f in fields(GPTConfig)} - {"vocab_size"}
        return GPTConfig(vocab_size=vocab_size, **{n: getattr(self, n) for n in names if hasattr(self, n)})


PRESETS = {
    # ~0.8 M parameters, char-level tiny Shakespeare, fp32 on 2 CPU cores (`make demo`: ~500k tokens)
    "cpu": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=64, batch_size=16, max_steps=500, lr=6e-3,
                min_lr=6e-4, warmup_steps=20, eval_interval=100, eval_iters=8, device="cpu", amp="none",
                log_interval=50, out_dir="runs/cpu"),
    # ~10.7 M parameters (nanoGPT's shakespeare-char size), bf16 + torch.compile on one GPU
    "gpu": dict(n_layer=6, n_head=6, d_model=384, max_seq_len=256, batch_size=64, max_steps=5000, lr=1e-3,
                min_lr=1e-4, warmup_steps=100, dropout=0.2, eval_interval=250, eval_iters=50, device="cuda",
                amp="auto", compile=True, beta2=0.99, out_dir="runs/gpu"),
    # tests: a few seconds on one core; head dim 16, GQA
    "tiny": dict(n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=32, batch_size=4, max_steps=20, lr=1e-2,
                 min_lr=1e-3, warmup_steps=2, eval_interval=10, eval_iters=2, sample_tokens=40, out_dir="runs/tiny"),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"train: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return replace(TrainConfig(), **{**PRESETS[name], **overrides})


# -- small helpers -------------------------------------------------------------------------------
def _lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr after `it` optimizer steps: linear warmup, then cosine to min_lr."""
    floor = cfg.min_lr / cfg.lr

    def factor(it):
        if it < cfg.warmup_steps:
            return (it + 1) / cfg.warmup_steps
        if it >= cfg.max_steps:
            return floor
        progress = (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)

    return factor


def _fmt_rate(x):
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _fmt_time(s):
    return f"{int(s) // 3600}h{int(s) // 60 % 60:02d}m" if s >= 3600 else f"{int(s) // 60}m{int(s) % 60:02d}s"


class _Progress:
    """One progress line, rewritten in place on a terminal; plain lines every `every` steps otherwise."""

    def __init__(self, total, first, every, enabled, stream=None):
        self.total, self.first, self.every, self.enabled = total, first, max(1, every), enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.dirty, self.printed_at = False, None
        self.t0 = time.perf_counter()

    def update(self, step, text):
        if not self.enabled:
            return
        done = step - self.first
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        if self.tty:
            filled = int(24 * step / self.total)
            self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (24 - filled)}] {step}/{self.total} | {text} | "
                              f"ETA {_fmt_time(eta)}")
            self.stream.flush()
            self.dirty = True
        elif (step % self.every == 0 or step == self.total) and step != self.printed_at:
            print(f"step {step:>5}/{self.total} | {text} | ETA {_fmt_time(eta)}", file=self.stream, flush=True)

    def print(self, line, step=None):
        if not self.enabled:
            return
        self.printed_at = step
        if self.dirty:
            self.stream.write("\r\x1b[K")
            self.dirty = False
        print(line, file=self.stream, flush=True)

    def close(self):
        if self.enabled and self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False


_CSV_FIELDS = ["step", "epoch", "tokens", "lr", "loss", "val_loss", "val_ppl", "tok_per_s", "elapsed_s"]


def _open_csv(path, resumed_step):
    rows = []
    if resumed_step is not None and os.path.exists(path):  # drop rows past the checkpoint
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resumed_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f, writer


@torch.no_grad()
def evaluate(model, windows: PackedWindows, cfg: TrainConfig, device, autocast, rank=0, world=1, par=None) -> float:
    """Mean validation loss over the first eval_iters * batch_size windows (all when eval_iters=0).
    par (train_parallel.Parallel): windows split over data-parallel replicas, sequences sharded."""
    was_training = model.training
    model.eval()
    n = windows.n if cfg.eval_iters <= 0 else min(cfg.eval_iters * cfg.batch_size, windows.n)
    ids = torch.arange(n)[par.dp_rank::par.dp_world] if par else torch.arange(n)[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for i in range(0, len(ids), cfg.batch_size):
        x, y = windows.batch(ids[i:i + cfg.batch_size], device)
        if par:
            x, y = par.shard(x, y)
        with autocast():
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def _check(cfg: TrainConfig):
    def bad(msg):
        raise ValueError(f"TrainConfig: {msg}")

    seq_len = cfg.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        bad(f"seq_len ({seq_len}) is longer than max_seq_len ({cfg.max_seq_len})")
    for name in ("batch_size", "grad_accum", "max_steps"):
        if getattr(cfg, name) < 1:
            bad(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.stop_at <= cfg.max_steps:
        bad(f"stop_at must be in 0..max_steps ({cfg.max_steps}), got {cfg.stop_at}")
    if cfg.amp not in ("auto", "none", "bf16", "fp16"):
        bad(f"amp must be auto, none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.lr <= 0 or cfg.min_lr < 0:
        bad(f"lr must be > 0 and min_lr >= 0, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    check_config(cfg, seq_len)
    return seq_len


def _setup_distributed(cfg: TrainConfig):
    """(rank, world, device, created): torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("train: device='cuda' but torch.cuda.is_available() is False (use --device cpu)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, created


# -- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train (or resume) as configured. Returns a summary dict on every rank: ``losses`` (step ->
    train loss), ``val`` [(step, loss, ppl)], ``tok_per_s``, ``sample``, ``step``, ``params``,
    ``model`` (the trained module)."""
    seq_len = _check(cfg)
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, world, device, created_pg = _setup_distributed(cfg)
    try:
        return _train(cfg, seq_len, rank, world, device)
    finally:
        torch.set_num_threads(threads)
        if created_pg:
            dist.destroy_process_group()


def _train(cfg, seq_len, rank, world, device):
    master = rank == 0
    say = print if (master and not cfg.quiet) else (lambda *a, **k: None)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resume_path = {"": None, "auto": ckpt_path}.get(cfg.resume, cfg.resume)
    ckpt = None
    if resume_path:
        try:
            ckpt = load_checkpoint(resume_path)
        except CheckpointError as exc:
            if cfg.resume == "auto" and not os.path.exists(resume_path):
                say(f"no checkpoint at {resume_path}: starting from scratch")
            else:
                raise CheckpointError(str(exc) + describe_previous(resume_path)) from exc

    # -- data
    corpus = load_corpus(cfg.data, cfg.val_fraction)
    tok = Tokenizer.from_state(ckpt["tokenizer"]) if ckpt else Tokenizer.build(cfg.tokenizer, list(corpus.values()))
    train_w = PackedWindows(tok.encode(corpus["train"]), seq_len, "train")
    val_w = PackedWindows(tok.encode(corpus["valid"]), seq_len, "valid")

    # -- model, optimizer, schedule (the same initial weights on every rank)
    mcfg = cfg.model_config(tok.vocab_size)
    if ckpt and ckpt["model_config"] != mcfg.to_dict():
        diff = {k: (ckpt["model_config"].get(k), v) for k, v in mcfg.to_dict().items()
                if ckpt["model_config"].get(k) != v}
        raise ValueError(f"train: the model config differs from the checkpoint's (checkpoint, now): {diff}")
    torch.manual_seed(cfg.seed)
    par = Parallel(cfg, rank, world, seq_len, device)
    model = par.shard_model(GPT(mcfg, kernels=cfg.kernels).to(device))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    amp = cfg.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "none"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    cursor = DataCursor(train_w.n, cfg.seed)
    step = 0
    if ckpt:
        par.load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        cursor.load_state_dict(ckpt["data"])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
        else:
            say(f"note: checkpoint from {len(ckpt['rng'])} processes, resuming on {world}: RNG streams re-seeded")
            torch.manual_seed(cfg.seed + 1 + rank + 1000 * step)
    else:
        torch.manual_seed(cfg.seed + 1 + rank)   # dropout stream of this rank
        random.seed(cfg.seed + 1 + rank)
    fwd = torch.compile(model) if cfg.compile else model
    ddp_model = par.wrap(fwd)

    # -- logs
    stop = cfg.stop_at or cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * par.dp_world   # sequences per optimizer step
    tokens_per_step = per_step * seq_len
    csv_file = writer = tb = None
    if master and cfg.save:
        os.makedirs(cfg.out_dir, exist_ok=True)
        csv_file, writer = _open_csv(os.path.join(cfg.out_dir, "log.csv"), step if ckpt else None)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(os.path.join(cfg.out_dir, "tb"), purge_step=step + 1 if ckpt else None)
            except ImportError:
                say("note: TensorBoard logging off (pip install tensorboard)")
    n_params = model.num_params()
    say(f"model: {n_params / 1e6:.2f} M parameters, {mcfg.n_layer} layers, d_model {mcfg.d_model}, "
        f"{mcfg.n_head} heads ({mcfg.n_kv_head} kv), {mcfg.norm}, {mcfg.positions} positions, "
        f"{mcfg.attention} attention, kernels={cfg.kernels}")
    say(f"data: {cfg.data} ({tok.kind}-level, vocab {tok.vocab_size}), {len(train_w.tokens):,} train / "
        f"{len(val_w.tokens):,} valid tokens, seq_len {seq_len}")
    say(f"train: {device.type}{f' x {world} processes' if world > 1 else ''}, amp {amp}, global batch "
        f"{per_step} x {seq_len} = {tokens_per_step:,} tokens/step, steps {step + 1}..{stop} of {cfg.max_steps}"
        + (f" (resumed from {resume_path})" if ckpt else "") + (f"; {par.describe()}" if par.describe() else ""))

    # a damaged ckpt.pt left behind by a run resumed from elsewhere must not become ckpt.prev.pt
    keep_previous = not (ckpt and os.path.abspath(resume_path) != os.path.abspath(ckpt_path) and is_damaged(ckpt_path))

    def checkpoint():
        nonlocal keep_previous
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs[0] = rng_state(device)
        model_sd, optim_sd = par.state_dicts(model, optimizer)
        if master:
            save_checkpoint({
                "step": step, "train_config": asdict(cfg), "model_config": mcfg.to_dict(),
                "tokenizer": tok.state_dict(), "model": model_sd, "optimizer": optim_sd,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "data": cursor.state_dict(),
                "rng": rngs, "world_size": world, "kernels": cfg.kernels}, ckpt_path, keep_previous=keep_previous)
        keep_previous = True

    result = {"losses": {}, "val": [], "tok_per_s": float("nan"), "sample": "", "params": n_params}
    progress = _Progress(stop, step, cfg.log_interval, master and not cfg.quiet)
    t_start, t_train, tokens_timed = time.perf_counter(), 0.0, 0
    first_step = step + 1
    ddp_model.train()
    while step < stop:
        t0 = time.perf_counter()
        ids = cursor.take(per_step)                               # this step's global batch
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            lo, hi = par.micro_slice(micro, cfg.batch_size)      # this rank's slice of the global batch
            x, y = par.shard(*train_w.batch(ids[lo:hi], device))  # (B, T), (B, T); a T / N shard under CP
            last = micro == cfg.grad_accum - 1
            sync = par.no_sync(ddp_model, model, last)
            with sync:
                with autocast():
                    _, loss = ddp_model(x, y)
                    loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss_val = loss_sum.item()
        dt = time.perf_counter() - t0
        if step > first_step or stop == first_step:               # the first step pays for warm-up/compile
            t_train += dt
            tokens_timed += tokens_per_step
        rate = tokens_timed / t_train if t_train > 0 else tokens_per_step / dt
        result["losses"][step] = loss_val
        if not math.isfinite(loss_val):
            progress.close()
            raise FloatingPointError(f"train: loss is {loss_val} at step {step} (lower lr, or amp='none')")

        val_loss = val_ppl = None
        if (cfg.eval_interval > 0 and step % cfg.eval_interval == 0) or (step == stop and cfg.eval_interval >= 0):
            val_loss = evaluate(fwd, val_w, cfg, device, autocast, rank, world, par)
            val_ppl = math.exp(min(val_loss, 50.0))
            result["val"].append((step, val_loss, val_ppl))
            progress.print(f"step {step:>5} | train loss {loss_val:.4f} | val loss {val_loss:.4f} | "
                           f"val ppl {val_ppl:.2f} | {_fmt_rate(rate)} tok/s", step)
        progress.update(step, f"loss {loss_val:.4f} | lr {lr:.2e} | {_fmt_rate(rate)} tok/s")
        if writer:
            writer.writerow({"step": step, "epoch": cursor.epoch, "tokens": step * tokens_per_step, "lr": f"{lr:.6g}",
                             "loss": f"{loss_val:.6f}", "val_loss": "" if val_loss is None else f"{val_loss:.6f}",
                             "val_ppl": "" if val_ppl is None else f"{val_ppl:.4f}", "tok_per_s": f"{rate:.1f}",
                             "elapsed_s": f"{time.perf_counter() - t_start:.2f}"})
            csv_file.flush()
        if tb:
            tb.add_scalar("train/loss", loss_val, step)
            tb.add_scalar("train/lr", lr, step)
            tb.add_scalar("train/tokens_per_s", rate, step)
            if val_loss is not None:
                tb.add_scalar("val/loss", val_loss, step)
                tb.add_scalar("val/perplexity", val_ppl, step)
        ckpt_every = cfg.ckpt_interval or max(cfg.eval_interval, 0)
        if cfg.save and ((ckpt_every and step % ckpt_every == 0) or step == stop):
            checkpoint()
    progress.close()
    result["tok_per_s"] = tokens_timed / t_train if t_train > 0 else float("nan")
    result["step"] = step

    sampler = par.local_model(model, master and cfg.sample_tokens > 0)   # every rank (FSDP gathers weights)
    if master and cfg.sample_tokens > 0:
        try:
            prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else torch.zeros(1, dtype=torch.long)
        except ValueError:
            prompt = torch.zeros(1, dtype=torch.long)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        sampler.eval()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)        # one short sequence: OpenMP hand-offs cost more than they give
        try:
            with autocast():
                out = sampler.generate(prompt[None].to(device), cfg.sample_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k or None, generator=gen)
        finally:
            torch.set_num_threads(threads)
        sampler.train()
        result["sample"] = tok.decode(out[0, len(prompt):])
    if csv_file:
        csv_file.close()
    if tb:
        tb.close()
    result["model"] = model
    return result
