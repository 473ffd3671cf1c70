"""Suite-wide settings: CPU-friendly threading, deterministic seeds, offline Hugging Face."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (SmolLM2-135M-Instruct, fp32 on CPU), loaded once for the whole run."""
    from entropyinfer import LLM

    return LLM("smollm2-135m", device="cpu")
