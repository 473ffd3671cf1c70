"""The one decision of `kernels/backend.py`: Triton kernel or torch reference, compiled or interpreted."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from entropyinfer.kernels import backend
from entropyinfer.kernels.backend import interpreter_ready, jit_kernel, runs_triton
from entropyinfer.kernels.block_scoring import block_scores

CPU = torch.device("cpu")


@pytest.mark.parametrize("interpret_env", ["0", "1"])
def test_auto_runs_triton_on_cuda_only(monkeypatch: pytest.MonkeyPatch, interpret_env: str) -> None:
    """Serving on the CPU runs the references, whatever TRITON_INTERPRET says."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret_env)
    assert runs_triton(torch.device("cuda", 0)) and runs_triton(torch.device("cuda"), "auto")
    assert not runs_triton(CPU) and not runs_triton(CPU, "auto")
    assert not runs_triton(torch.device("meta"))


def test_torch_never_and_triton_always() -> None:
    assert not runs_triton(torch.device("cuda"), "torch") and not runs_triton(CPU, "torch")
    assert runs_triton(torch.device("cuda"), "triton")
    if interpreter_ready():
        assert runs_triton(CPU, "triton")


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        runs_triton(CPU, "cuda")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/conftest.py sets the interpreter on CPU only")
def test_the_suite_runs_the_interpreter_on_cpu() -> None:
    """tests/conftest.py set TRITON_INTERPRET=1 before triton was first imported."""
    from triton.runtime.interpreter import InterpretedFunction

    from entropyinfer.kernels.block_scoring import _minmax_kernel

    assert interpreter_ready()
    assert isinstance(jit_kernel(_minmax_kernel, CPU), InterpretedFunction)


@pytest.mark.parametrize(
    ("interpret_env", "reason"),
    [("1", "was set after triton was imported"), ("0", "was not set when triton was imported")],
)
def test_clear_error_without_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, interpret_env: str, reason: str
) -> None:
    """A Triton kernel asked for on CPU tensors, triton having been imported without the interpreter."""
    monkeypatch.setattr(backend, "interpreter_ready", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", interpret_env)
    with pytest.raises(RuntimeError, match=reason):
        runs_triton(CPU, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before the first import of triton"):
        jit_kernel(object(), CPU)
    q, k = torch.randn(2, 40, 16), torch.randn(1, 40, 16)
    with pytest.raises(RuntimeError, match="backend='auto' or 'torch'"):
        block_scores(q, k, 16, 8, backend="triton")
    assert block_scores(q, k, 16, 8).entropy.shape == (1, 3)  # auto: the reference, no interpreter needed


def _double(x_ptr: tl.tensor, n: tl.tensor, BLOCK: tl.constexpr) -> None:
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)


def test_interpreted_copy_of_a_compiled_kernel() -> None:
    """A kernel module imported before TRITON_INTERPRET=1 (a compiled `JITFunction`) gets an interpreted copy
    for CPU tensors, built once."""
    if not interpreter_ready():
        pytest.skip("needs the interpreter")
    from triton.runtime.interpreter import InterpretedFunction

    compiled = triton.runtime.JITFunction(_double)
    interpreted = jit_kernel(compiled, CPU)
    assert isinstance(interpreted, InterpretedFunction) and jit_kernel(compiled, CPU) is interpreted
    x = torch.arange(5, dtype=torch.float32)
    interpreted[(1,)](x, 5, BLOCK=8)
    assert torch.equal(x, torch.arange(5, dtype=torch.float32) * 2)
