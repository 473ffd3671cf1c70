"""Kernel tests: on a machine without CUDA, Triton kernels run under the interpreter.

TRITON_INTERPRET must be in the environment before triton is first imported (triton.language's helpers bind to
the interpreter at that moment), so it is set here, before the test modules import any kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
