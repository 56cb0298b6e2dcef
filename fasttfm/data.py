"""Corpora, tokenizers and packed batches for the training loop.

* Corpus: ``"shakespeare"`` (the bundled tiny-shakespeare text, see ``fasttfm/tinyshakespeare.md``),
  a text file (split deterministically: the first ``1 - val_fraction`` of the text trains, the
  rest validates), or a wikitext-style directory with train / valid (and optional test) files.
* Tokenizer: character-level (vocabulary = the sorted distinct characters of the corpus) or
  byte-level (UTF-8 bytes, vocabulary 256). It serializes to a small dict kept in checkpoints.
* Batches: the token stream of a split is cut into packed windows of ``seq_len + 1`` tokens
  starting every ``seq_len`` tokens (x = window[:-1], y = window[1:]). Training visits the windows
  in a seeded random order, one permutation per epoch; the position in that order is two ints
  (epoch, cursor), saved in checkpoints for an exact resume.
"""
import os
from typing import Dict, List

import numpy as np
import torch

__all__ = ["BUNDLED", "Tokenizer", "load_corpus", "PackedWindows", "DataCursor"]

# Next to the modules, not in a data/ folder: setuptools reads a folder with an importable name as a package.
BUNDLED = {"shakespeare": os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare.txt")}
BUNDLED["tinyshakespeare"] = BUNDLED["shakespeare"]

_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "val", "dev"), "test": ("test",)}
_TEXT_EXTS = (".txt", ".tokens", ".raw", "")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _find_split_files(folder) -> Dict[str, str]:
    """{'train': path, 'valid': path[, 'test': path]} for a wikitext-style directory."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name.lower())
        if not os.path.isfile(path) or ext not in _TEXT_EXTS:
            continue
        parts = stem.replace("-", ".").replace("_", ".").split(".")
        for split, keys in _SPLIT_NAMES.items():
            if any(k in parts for k in keys):
                if split in found:
                    raise ValueError(f"data: {folder} has more than one {split} file: {found[split]} and {path}")
                found[split] = path
    missing = [s for s in ("train", "valid") if s not in found]
    if missing:
        raise ValueError(f"data: directory {folder} needs train and valid files (wikitext style: "
                         f"wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens, or train.txt/valid.txt); "
                         f"missing {', '.join(missing)}")
    return found


def load_corpus(spec: str, val_fraction: float = 0.1) -> Dict[str, str]:
    """{'train': text, 'valid': text[, 'test': text]} for a corpus name, file or directory."""
    path = BUNDLED.get(spec, spec)
    if os.path.isdir(path):
        return {split: _read(p) for split, p in _find_split_files(path).items()}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: {spec!r} is neither a bundled corpus ({', '.join(sorted(BUNDLED))}), "
                                f"a text file, nor a directory")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data: val_fraction must be in (0, 1), got {val_fraction}")
    text = _read(path)
    cut = int(len(text) * (1.0 - val_fraction))
    return {"train": text[:cut], "valid": text[cut:]}


class Tokenizer:
    """Character- or byte-level tokenizer. ``encode(str) -> 1-D int64 tensor``, ``decode(ids) -> str``."""

    def __init__(self, kind: str, chars: str = ""):
        if kind not in ("char", "byte"):
            raise ValueError(f"Tokenizer: kind must be 'char' or 'byte', got {kind!r}")
        if kind == "char" and not chars:
            raise ValueError("Tokenizer: a char tokenizer needs its characters")
        self.kind, self.chars = kind, chars if kind == "char" else ""
        if kind == "char":
            self._codes = np.array(sorted(ord(c) for c in set(chars)), dtype=np.uint32)
            if len(self._codes) != len(chars):
                raise ValueError("Tokenizer: chars must be distinct")

    @classmethod
    def build(cls, kind: str, texts: List[str]):
        """A tokenizer for these texts (char: every character that occurs in any of them)."""
        if kind == "byte":
            return cls("byte")
        chars = set()
        for t in texts:
            chars.update(t)
        return cls("char", "".join(sorted(chars)))

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "byte" else len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        if self.kind == "byte":
            return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ok = ids < len(self._codes)
        ok[ok] = self._codes[ids[ok]] == codes[ok]
        if not ok.all():
            unknown = sorted({chr(c) for c in codes[~ok]})[:10]
            raise ValueError(f"Tokenizer: characters not in the vocabulary: {unknown!r}")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_state(cls, state: dict):
        return cls(state["kind"], state.get("chars", ""))


class PackedWindows:
    """A split's token stream as windows of seq_len + 1 tokens starting every seq_len tokens."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, name: str = "split"):
        # int32 storage (a quarter of int64 for large corpora); batches come out int64
        self.tokens, self.seq_len = tokens.to(torch.int32), seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"data: the {name} split has {len(tokens)} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}: use a shorter seq_len or more text")

    def batch(self, window_ids: torch.Tensor, device="cpu"):
        """(x, y), each (len(window_ids), seq_len) int64 on device."""
        starts = window_ids[:, None] * self.seq_len + torch.arange(self.seq_len + 1)[None, :]  # (B, T+1)
        w = self.tokens[starts].long()
        x, y = w[:, :-1], w[:, 1:]
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class DataCursor:
    """Seeded order of training windows: epoch e visits randperm(n) drawn with seed + e.

    ``take(count)`` returns the next ``count`` window ids; an epoch's remainder smaller than count
    is skipped. The whole state is (epoch, pos).
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm, self._perm_epoch = None, None

    def _order(self):
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), self.epoch
        return self._perm

    def take(self, count: int) -> torch.Tensor:
        if count > self.n:
            raise ValueError(f"data: a step needs {count} windows but the training split has only {self.n}: "
                             f"lower batch_size / grad_accum or seq_len")
        if self.pos + count > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        ids = self._order()[self.pos:self.pos + count]
        self.pos += count
        return ids

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state):
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"data: the checkpoint's data position is for {state['n']} windows with seed "
                             f"{state['seed']}, this run has {self.n} windows with seed {self.seed} "
                             f"(different corpus, seq_len or seed)")
        self.epoch, self.pos = state["epoch"], state["pos"]
