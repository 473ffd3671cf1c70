"""`load_format="dummy"`: random weights of a checkpoint's shape from a folder with only config.json and a
tokenizer (the byte-level one of shard/dummy_checkpoint.py), through LLM, the shard actor and the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from entropyinfer import LLM, CheckpointNotFoundError, ConfigError, SamplingParams
from entropyinfer.shard.dummy_checkpoint import BOS_ID, byte_symbols


@pytest.fixture(scope="module")
def folder(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def test_the_byte_symbols_are_gpt2s() -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_symbols() == [bytes_to_unicode()[b] for b in range(256)]


def test_dummy_weights_generate_and_one_byte_is_one_token(folder) -> None:
    llm = LLM(str(folder), load_format="dummy", device="cpu")
    assert llm.config.model.load_format == "dummy" and llm.arch.vocab_size == 320
    text = "héllo, wörld " * 7
    ids = llm.encode(text)
    assert ids[0] == BOS_ID and ids[1:] == list(text.encode())
    chat = [{"role": "user", "content": text}]
    assert llm.count_tokens(chat) == 1 + len(f"<|user|>\n{text}\n<|assistant|>\n".encode())
    out = llm.generate(chat, SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.stats["prompt_tokens"] == llm.count_tokens(chat)
    assert out.text  # every id decodes to text
    again = LLM(str(folder), load_format="dummy", device="cpu")  # same seed: same weights, same tokens
    assert again.generate(chat, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids == out.token_ids
    assert all(torch.isfinite(p).all() for p in llm.model.parameters())


def test_unknown_load_format_and_missing_weights_raise_typed_errors(folder) -> None:
    with pytest.raises(ConfigError, match="load_format"):
        LLM(str(folder), load_format="npz", device="cpu")
    with pytest.raises(CheckpointNotFoundError, match="safetensors"):
        LLM(str(folder), device="cpu")  # "auto" reads weights the folder does not have


def test_the_shard_actor_builds_its_llm_from_the_serve_config(folder) -> None:
    from entropyinfer.cluster.config import app_config
    from entropyinfer.cluster.shard_actor import ShardActor

    llm = {"model": str(folder), "load_format": "dummy", "device": "cpu", "policy": "entropy"}
    cfg = app_config({"engine": {"llm": llm}})
    shard = ShardActor(cfg.engine.llm)  # what the engine replica passes each shard actor
    info = asyncio.run(shard.ready())
    assert info["max_context"] == 1024 and shard.llm.config.model.load_format == "dummy"


def test_cli_generate_with_dummy_weights(folder, tmp_path, capsys) -> None:
    from entropyinfer.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("a short document")
    argv = ["generate", "--model", str(folder), "--load-format", "dummy", "--device", "cpu"]
    assert main([*argv, "--prompt-file", str(doc), "--max-tokens", "3"]) == 0
    assert '"prompt_tokens"' in capsys.readouterr().err
