"""The client SDK and the HTTP edge import without torch (the ingress replicas and client machines never
sample a token), checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "entropyinfer.cluster.client",
        "entropyinfer.cluster.schemas",
        "entropyinfer.cluster.config",
        "entropyinfer.cluster.ingress",
    ],
)
def test_imports_without_torch(module: str) -> None:
    code = f"import sys, {module}; from entropyinfer import Client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
