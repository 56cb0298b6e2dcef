"""Run ``@triton.jit`` kernels through Triton's interpreter on CPU tensors, per call.

Triton only interprets when ``TRITON_INTERPRET=1`` is set before ``import triton``, and then
*every* kernel is interpreted, CUDA tensors included. fasttfm wants both in one process: CUDA
tensors run the compiled kernels, CPU tensors under ``FASTTFM_EMULATE=1`` run the very same
kernel source through the interpreter. ``interpreted(kernel)`` builds an interpreted twin of a
normal ``JITFunction``:

* the twin executes the kernel's source in a copy of its module globals in which every
  ``JITFunction`` (helpers the kernel calls) is replaced by its own interpreted twin;
* while a twin runs, the ``JITFunction`` members of ``triton.language`` (``tl.sum``, ``tl.max``,
  ``tl.cdiv``, ...) are swapped for interpreted twins and put back afterwards, so compiling
  kernels for a GPU later in the same process is unaffected.

Usage: ``interpreted(_my_kernel)[grid](*args, **constexprs)``.
"""
import contextlib
import functools

import numpy as np
import triton.language as tl
import triton.runtime.interpreter as _triton_interp
from triton.runtime.interpreter import FunctionRewriter, InterpretedFunction
from triton.runtime.jit import JITFunction

from ._interp_bf16 import bf16_arithmetic

try:  # the interpreter imports gluon lazily; it must see the unpatched triton.language
    import triton.experimental.gluon  # noqa: F401
except Exception:  # pragma: no cover - gluon is optional
    pass

__all__ = ["interpreted"]


class _Rewriter(FunctionRewriter):
    def _compile_and_exec(self, transformed_ast):
        import triton.runtime.interpreter as interp

        code = compile(transformed_ast, filename=self.filename, mode="exec")
        scope = dict(self.fn.__globals__)
        for name, value in vars(interp).items():
            scope.setdefault(name, value)
        for name, value in list(scope.items()):
            if isinstance(value, JITFunction):
                scope[name] = interpreted(value)
        local = {}
        exec(code, scope, local)
        return local[self.fn.__name__]


class _Interpreted(InterpretedFunction):
    rewritten_fn = {}  # our own cache: never shared with a plain InterpretedFunction

    def __init__(self, fn):
        super().__init__(fn)
        self.rewriter = _Rewriter(fn)

    def run(self, *args, **kwargs):
        with _stdlib_interpreted(), _index_fixed(), bf16_arithmetic():
            return super().run(*args, **kwargs)


@functools.cache
def interpreted(kernel):
    """The interpreted twin of ``kernel`` (a ``triton.jit`` function), cached."""
    fn = kernel.fn if isinstance(kernel, (JITFunction, InterpretedFunction)) else kernel
    return _Interpreted(fn)


@contextlib.contextmanager
def _stdlib_interpreted():
    saved = []
    for owner in (tl, tl.core, tl.standard, tl.math, tl.tensor):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                saved.append((owner, name, value))
                setattr(owner, name, interpreted(value))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _tensor_index(self):
    """``operator.index`` of an interpreted scalar tensor (e.g. a ``range`` bound): its data is a
    1-element array, which numpy >= 2.4 refuses to convert with a bare ``int()``."""
    return int(np.asarray(self.handle.data).reshape(-1)[0]) if np.size(self.handle.data) == 1 \
        else int(self.handle.data)


@contextlib.contextmanager
def _index_fixed():
    """During a launch, wrap the interpreter's ``_patch_lang_tensor`` (which installs
    ``tensor.__index__`` for the kernel's execution, restored by the interpreter afterwards) so
    that ``__index__`` is ``_tensor_index``. Triton 3.8 already squeezes; 3.6 does not."""
    original = getattr(_triton_interp, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover - a Triton without this hook: leave it alone
        yield
        return

    def patch_lang_tensor(tensor, scope, *rest, **kw):
        result = original(tensor, scope, *rest, **kw)
        scope.set_attr(tensor, "__index__", _tensor_index)
        return result

    _triton_interp._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        _triton_interp._patch_lang_tensor = original
