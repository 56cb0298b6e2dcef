"""Types shared by ``fasttfm.patch`` (the registry and the handle) and the registry targets
(``fasttfm.hf``): one home both import, importing neither back.

    patch  ->  _registry  <-  hf        (patch imports hf lazily to resolve "fasttfm.hf.*" targets)
"""
import dataclasses
from typing import Callable, Optional

__all__ = ["Row", "Entry", "Keep"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One replacement. ``target``: "fasttfm.nn.<Name>" (a class, may be absent in a build) or
    "fasttfm.hf.<factory>" (called with the source class, returns the replacement class).
    ``scope="model"`` rows act once on the top-most instance of ``source`` (Hugging Face attention):
    their target is a function ``(model, handle, path) -> (note, undo)`` that raises ``Keep`` to refuse."""
    group: str
    source: str
    target: str
    check: Optional[Callable] = None
    build: Optional[Callable] = None
    call_reason: Optional[Callable] = None
    scope: str = "module"


@dataclasses.dataclass
class Entry:
    """One decision of ``patch()``: what happened to the module at ``path`` and why."""
    path: str            # the module's name in the model ("" for the root)
    source: str          # the original class
    target: Optional[str]
    status: str          # "replaced" | "kept" | "adjusted"
    reason: str = ""
    undo: Optional[Callable] = None


class Keep(Exception):
    """Raised by a model-scope target to keep the model as it is (the message is the reason)."""
