"""The package's import-time guard: started in the repository root, Python must still find other
distributions' top-level packages whose names match our folders (transformers imports Hugging Face's
`kernels`, which `kernels/` here would shadow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import entropyinfer

ROOT = Path(entropyinfer.__file__).resolve().parent

PROBE = """
import importlib.util, os, sys
import entropyinfer
root = os.path.realpath(os.path.dirname(entropyinfer.__file__))
print([p for p in sys.path if os.path.realpath(p or os.curdir) == root])
spec = importlib.util.find_spec("kernels")
ours = os.path.join(root, "kernels", "__init__.py")
print(spec is not None and os.path.realpath(spec.origin or "") == ours)
from transformers import LlamaConfig
print(LlamaConfig.__name__)
"""


def test_root_is_off_sys_path_when_python_starts_in_it() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    on_path, kernels_is_ours, config = run.stdout.split("\n")[:3]
    assert on_path == "[]"
    assert kernels_is_ours == "False"
    assert config == "LlamaConfig"
