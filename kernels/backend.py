"""Which implementation of a kernel op runs: the Triton kernel or the torch reference.

Every public op in `kernels/` takes ``backend`` and asks `runs_triton` once; callers pass nothing and get:

- ``"auto"`` (the default): the Triton kernel, compiled, for CUDA tensors; the torch reference for any other
  device, whatever ``TRITON_INTERPRET`` says. Serving on the CPU runs the references: the interpreter is for
  testing kernels, not for serving.
- ``"triton"``: the Triton kernel always. CUDA tensors: compiled. CPU tensors: through Triton's interpreter,
  which needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported (pytest sets it at
  the top of ``tests/conftest.py``); tests use float32 / float16 there, since the interpreter's bf16
  ``tl.dot`` is wrong.
- ``"torch"``: the reference always (``*_ref.py`` beside each kernel).

An op that runs Triton launches ``jit_kernel(kernel, device)[grid](...)``: the kernel as imported for CUDA
tensors, an interpreted one for CPU tensors.

``@triton.jit`` functions annotate their runtime parameters ``tl.tensor`` (inside a kernel every runtime
argument, pointer or scalar, is one) and their compile-time ones ``tl.constexpr``; Triton reads neither
annotation as a type to specialise on.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal, get_args

import torch
import triton
import triton.language as tl

__all__ = ["Backend", "interpreter_ready", "jit_kernel", "runs_triton"]

Backend = Literal["auto", "torch", "triton"]


def interpreter_ready() -> bool:
    """True when Triton kernels can run on CPU tensors: TRITON_INTERPRET=1 was set before triton was imported
    (triton.language's own helpers, tl.max and the like, are bound to the interpreter at that moment)."""
    return not isinstance(tl.max, triton.runtime.JITFunction)


def _check_interpreter(device: torch.device) -> None:
    """Fail clearly when a Triton kernel is asked to run on CPU tensors without the interpreter."""
    if device.type == "cuda" or interpreter_ready():
        return
    when = (
        "was set after triton was imported, so the kernels were compiled for a GPU"
        if os.environ.get("TRITON_INTERPRET") == "1"
        else "was not set when triton was imported"
    )
    raise RuntimeError(
        "Triton kernels run on CPU tensors only under the Triton interpreter, and TRITON_INTERPRET=1 "
        f"{when}; set TRITON_INTERPRET=1 before the first import of triton (for pytest: at the top of "
        "tests/conftest.py), or use backend='auto' or 'torch' to run the torch reference on the CPU"
    )


def runs_triton(device: torch.device, backend: Backend = "auto") -> bool:
    """Whether an op runs its Triton kernel for tensors on `device` (see the module docstring).

    ``backend="triton"`` on CPU tensors without the interpreter raises here, before anything is allocated.
    """
    if backend not in get_args(Backend):
        raise ValueError(f"backend must be one of {get_args(Backend)}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    _check_interpreter(device)
    return True


@functools.cache
def _interpreted(fn: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def jit_kernel(kernel: Any, device: torch.device) -> Any:
    """`kernel` (a ``@triton.jit`` function) ready to launch on `device`'s tensors: as imported for CUDA
    tensors, interpreted for CPU tensors.

    ``@triton.jit`` picks interpreter or compiler when the kernel's module is imported; if that module was
    imported before TRITON_INTERPRET=1 was set and triton after, CPU tensors get an interpreted copy.
    """
    if device.type == "cuda":
        return kernel
    _check_interpreter(device)
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return _interpreted(kernel.fn)
