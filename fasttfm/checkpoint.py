"""Training checkpoints: atomic writes, a checksum, and what resuming needs.

``save_checkpoint(state, path)`` writes ``path.tmp``, fsyncs it and renames it over ``path``; the file it
replaces stays as ``*.prev.pt`` (a hard link, no copy). The state is serialized once into a payload whose
SHA-256 and size are stored next to it in a small envelope, so ``load_checkpoint`` tells a truncated or
corrupt file (or one that is not a fasttfm checkpoint) from a good one and raises :class:`CheckpointError`
with the reason instead of loading garbage; ``describe_previous`` then points at the intact previous one.
The state a run saves (fasttfm/train.py): step, train and model configs, tokenizer, model, optimizer,
scheduler, GradScaler, data position and the RNG states of every rank (:func:`rng_state`).
"""
import contextlib
import hashlib
import io
import os
import random
import shutil

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "describe_previous", "is_damaged",
           "previous_path", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a fasttfm checkpoint."""


_FORMAT, _VERSION = "fasttfm-checkpoint", 1
_REQUIRED = ("step", "train_config", "model_config", "tokenizer", "model", "optimizer", "scheduler", "scaler",
             "data", "rng")


def _write_file(path, envelope):
    with open(path, "wb") as f:
        torch.save(envelope, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(state: dict, path: str, keep_previous: bool = True) -> None:
    """Write ``state`` atomically: ``path.tmp`` + fsync + rename. The old file becomes ``*.prev.pt``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    envelope = {"format": _FORMAT, "version": _VERSION, "step": int(state.get("step", -1)),
                "sha256": hashlib.sha256(payload).hexdigest(), "nbytes": len(payload), "payload": payload}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        _write_file(tmp, envelope)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if keep_previous and os.path.exists(path):
        prev, prev_tmp = previous_path(path), previous_path(path) + ".tmp"
        with contextlib.suppress(OSError):
            os.remove(prev_tmp)
        try:
            os.link(path, prev_tmp)          # the old checkpoint under a second name, no copy
        except OSError:
            shutil.copyfile(path, prev_tmp)
        os.replace(prev_tmp, prev)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def previous_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext or '.pt'}"


def describe_previous(path):
    """A sentence on the ``*.prev.pt`` next to ``path`` (intact: resume from it), or ""."""
    prev = previous_path(path)
    if not os.path.exists(prev):
        return ""
    try:
        step = load_checkpoint(prev)["step"]
    except CheckpointError:
        return f" The previous checkpoint {prev} is damaged too."
    return f" The previous checkpoint {prev} (step {step}) is intact: resume from it with --resume {prev}."


def is_damaged(path):
    """True when a file exists at ``path`` and does not load as a checkpoint."""
    try:
        load_checkpoint(path)
    except CheckpointError:
        return os.path.exists(path)
    return False


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The state saved by :func:`save_checkpoint`, verified; :class:`CheckpointError` otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        env = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage, unpickling errors
        msg = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({os.path.getsize(path)} bytes; torch.load: "
                              f"{msg}).") from exc
    if not isinstance(env, dict) or env.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a fasttfm checkpoint (no '{_FORMAT}' header)")
    if env.get("version") != _VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {env.get('version')}, this fasttfm reads "
                              f"version {_VERSION}")
    payload = env.get("payload")
    size = len(payload) if isinstance(payload, bytes) else 0
    if size != env.get("nbytes"):
        raise CheckpointError(f"checkpoint {path} is truncated: payload of {size} bytes, expected {env.get('nbytes')}")
    if hashlib.sha256(payload).hexdigest() != env.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 of its payload does not match the one "
                              f"recorded when it was written")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: payload cannot be read ({exc})") from exc
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def rng_state(device):
    """This process's RNG states (torch CPU, Python, the CUDA device's) for a checkpoint."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
