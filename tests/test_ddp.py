"""Data-parallel training: torchrun with 2 gloo processes makes the same update as one process
with the same global batch (and as one process with gradient accumulation)."""
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


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo "
                    "is not available in this torch build")
def test_torchrun_two_gloo_processes_match_one_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    cli = []
    for k, v in _args(ddp_dir, batch_size=2).items():
        flag = "--" + k.replace("_", "-")
        cli += [flag] if v is True else [flag.replace("--", "--no-", 1)] if v is False else [flag, str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fasttfm", "train", "--preset", "tiny", "--device", "cpu", *cli]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

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
    with open(ddp_dir / "log.csv", newline="") as f:
        ddp_losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert ddp_losses == pytest.approx([one["losses"][s] for s in range(1, STEPS + 1)], abs=1e-5)
