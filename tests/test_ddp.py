"""Data-parallel training: torchrun with 2 gloo processes makes the same update as one process
with the same global batch (and as one process with gradient accumulation); the same for FSDP2
(``--fsdp``), and ``--context-parallel 2`` (each sequence sharded over 2 ranks, ring attention)
gives one process's loss curve and validation loss."""
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fasttfm.model import attention_available
from fasttfm.train import load_checkpoint, preset, train

KERNELS = "fasttfm" if attention_available()[0] else "torch"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


def _args(out_dir, **kw):
    # bias=False: a key bias has an exactly-zero true gradient, and Adam would turn the rounding noise
    # of a different reduction order into +-lr updates there
    base = dict(kernels=KERNELS, max_steps=STEPS, eval_interval=STEPS, eval_iters=2, sample_tokens=0, bias=False,
                tensorboard=False, quiet=True, threads=1, out_dir=str(out_dir))
    base.update(kw)
    return base


def _torchrun(out_dir, nproc=2, **kw):
    cli = []
    for k, v in _args(out_dir, **kw).items():
        flag = "--" + k.replace("_", "-")
        cli += [flag] if v is True else [flag.replace("--", "--no-", 1)] if v is False else [flag, str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fasttfm", "train", "--preset", "tiny", "--device", "cpu", *cli]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


@needs_gloo
def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    _torchrun(ddp_dir, batch_size=2)

    one = train(preset("tiny", **_args(tmp_path / "one", batch_size=4)))          # same global batch
    accum = train(preset("tiny", **_args(tmp_path / "accum", batch_size=2, grad_accum=2)))
    ddp_state = load_checkpoint(str(ddp_dir / "ckpt.pt"))
    one_state = load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))
    assert ddp_state["world_size"] == 2 and len(ddp_state["rng"]) == 2
    assert ddp_state["step"] == one_state["step"] == STEPS
    assert ddp_state["data"] == one_state["data"]
    for name, p in one_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][name], p, atol=2e-6, rtol=1e-5, msg=f"ddp vs one: {name}")
        torch.testing.assert_close(accum["model"].state_dict()[name], p, atol=2e-6, rtol=1e-5,
                                   msg=f"grad_accum vs one: {name}")
    ddp_losses = [float(row["loss"]) for row in _csv(ddp_dir / "log.csv")]
    assert ddp_losses == pytest.approx([one["losses"][s] for s in range(1, STEPS + 1)], abs=1e-5)


@needs_gloo
@pytest.mark.skipif(KERNELS != "fasttfm", reason="context parallelism runs fasttfm's ring attention")
@pytest.mark.parametrize("positions,attention", [("rope", "causal"), ("learned", "sliding")])
def test_context_parallel_two_processes_match_one_process(tmp_path, positions, attention):
    """--context-parallel 2: both ranks train on halves of the same sequences (zigzag order; the
    tiny preset's T = 32 is a multiple of 2N); loss curve, validation loss and weights = 1 process."""
    kw = dict(positions=positions, attention=attention, window=5, eval_iters=2)
    _torchrun(tmp_path / "cp", context_parallel=2, **kw)
    one = train(preset("tiny", **_args(tmp_path / "one", **kw)))
    rows = _csv(tmp_path / "cp" / "log.csv")
    assert [float(r["loss"]) for r in rows] == pytest.approx([one["losses"][s] for s in range(1, STEPS + 1)],
                                                             abs=2e-5)
    (_, val_loss, val_ppl), = one["val"]
    assert float(rows[-1]["val_loss"]) == pytest.approx(val_loss, abs=2e-5)
    assert float(rows[-1]["val_ppl"]) == pytest.approx(val_ppl, rel=5e-5)
    cp_state = load_checkpoint(str(tmp_path / "cp" / "ckpt.pt"))
    assert cp_state["train_config"]["context_parallel"] == 2 and cp_state["world_size"] == 2
    # atol 2e-5: Adam divides by sqrt(v), so gradient entries near 0 turn the ring's different
    # summation order into weight differences of a few 1e-6 after 2 steps (an update is ~lr = 1e-2)
    for name, p in load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))["model"].items():
        torch.testing.assert_close(cp_state["model"][name], p, atol=2e-5, rtol=1e-5, msg=f"cp vs one: {name}")


@needs_gloo
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_fsdp_two_processes_match_one_process(tmp_path, amp):
    """--fsdp: FSDP2 over 2 ranks (batch 2 each) makes one process's updates (batch 4); the
    checkpoint holds the full fp32 state dict. amp=bf16 adds the MixedPrecisionPolicy (bf16 parameters
    in the forward, where one process's autocast casts per op: the losses agree to bf16 rounding; the
    weights are compared in fp32 only, as Adam turns bf16 noise in near-zero gradients into +-lr steps)."""
    proc = _torchrun(tmp_path / "fsdp", fsdp=True, batch_size=2, amp=amp, sample_tokens=20, quiet=False)
    one = train(preset("tiny", **_args(tmp_path / "one", batch_size=4, amp=amp, sample_tokens=20)))
    tol = dict(none=(2e-5, 2e-6), bf16=(2e-3, None))[amp]
    losses = [float(r["loss"]) for r in _csv(tmp_path / "fsdp" / "log.csv")]
    assert losses == pytest.approx([one["losses"][s] for s in range(1, STEPS + 1)], abs=tol[0])
    state = load_checkpoint(str(tmp_path / "fsdp" / "ckpt.pt"))
    for name, p in load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))["model"].items():
        got = state["model"][name]
        assert type(got) is torch.Tensor and got.dtype == torch.float32 and got.shape == p.shape, name
        if tol[1] is not None:
            torch.testing.assert_close(got, p, atol=tol[1], rtol=1e-5, msg=f"fsdp vs one: {name}")
    if amp == "none":  # the end-of-run sample from the gathered weights = one process's
        assert one["sample"] and proc.stdout.split("sample:\n", 1)[1] == one["sample"] + "\n"
    if amp == "none":  # stop after step 1 and resume under FSDP: the same curve
        _torchrun(tmp_path / "resumed", fsdp=True, batch_size=2, stop_at=1)
        _torchrun(tmp_path / "resumed", fsdp=True, batch_size=2, resume="auto")
        resumed = [float(r["loss"]) for r in _csv(tmp_path / "resumed" / "log.csv")]
        assert resumed == pytest.approx(losses, abs=1e-6)


def test_parallel_config_errors():
    """Bad settings fail before any process group work, with the same message on every rank."""
    with pytest.raises(ValueError, match=r"seq_len \(30\) must be divisible by context_parallel \(4\)"):
        train(preset("tiny", **_args("unused", seq_len=30, context_parallel=4)))
    with pytest.raises(ValueError, match="context_parallel needs kernels='fasttfm' and causal or sliding"):
        train(preset("tiny", **_args("unused", attention="chunked", chunk_size=8, context_parallel=2)))
    with pytest.raises(ValueError, match="context_parallel must be >= 1"):
        train(preset("tiny", **_args("unused", context_parallel=0)))
    with pytest.raises(ValueError, match=r"context_parallel \(2\) must divide the number of processes \(1\)"):
        train(preset("tiny", **_args("unused", context_parallel=2)))
