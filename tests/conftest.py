"""Suite-wide settings: CPU-friendly threading, deterministic seeds, offline Hugging Face, and the `slow`
marker on every test that loads the real SmolLM2 (so `pytest -m "not slow"` is the fast loop)."""

from __future__ import annotations

import os

import torch

# First, before any test module imports transformers: importing the package takes the repository root off
# sys.path, where `python -m pytest` puts it and where our kernels/ would shadow Hugging Face's `kernels`.
import entropyinfer  # noqa: F401

# Without a GPU, kernel tests run the Triton kernels (backend="triton") in Triton's interpreter, which
# triton.language binds at its first import: set it here, before anything imports triton (torch does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import inspect
import re
from pathlib import Path

import pytest

# Fixtures that load the real SmolLM2 (in this process, in a Serve replica, or as its converted checkpoint).
SMOLLM2_FIXTURES = {"smollm2", "server", "checkpoint"}


def loads_smollm2(item: pytest.Item) -> bool:
    """The test uses a SmolLM2 fixture (directly or through another fixture) or builds the model itself
    (`LLM("smollm2-135m", ...)`); a test that loads it another way (the CLI's default model) says so with
    an explicit `@pytest.mark.slow`."""
    if SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return False
    return re.search(r"""(LLM|ShardActor)\(\s*(model=)?["']smollm2""", source) is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if loads_smollm2(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# A 2-layer random-weight Llama of real structure (GQA 4/2), for tests where quality does not matter.
TINY_LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder of TINY_LLAMA for `load_format="dummy"`: config.json plus a byte-level tokenizer
    (one byte = one token), no weights."""
    from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

    return write_dummy_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_LLAMA)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (SmolLM2-135M-Instruct, fp32 on CPU), loaded once for the whole run."""
    from entropyinfer import LLM

    return LLM("smollm2-135m", device="cpu")
