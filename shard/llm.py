"""`LLM`: the offline Python API. Tokenizes (with the chat template), prefills, decodes, reports stats."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from entropyinfer.configs.loader import from_dict
from entropyinfer.errors import (
    ConfigError,
    InvalidRequestError,
    PromptTooLongError,
    RequestCancelled,
)
from entropyinfer.policies.config import load_sparse_config
from entropyinfer.policies.kv_compression import KVCompressionConfig, load_kv_compression_config
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import (
    DECODE_COMPRESSION,
    POLICY_NAMES,
    SparsePrefill,
    build_prefill_attention,
    check_policy,
    warm_up_sparse_prefill,
)
from entropyinfer.shard.compression import DecodeCompressor
from entropyinfer.shard.config import EngineConfig, check_load_format
from entropyinfer.shard.embedded import resolve_checkpoint
from entropyinfer.shard.engine import DecodeRunner, Engine
from entropyinfer.shard.kv_cache import CompactKVCache, KVCache
from entropyinfer.shard.sampling import SamplingParams, make_generator, sample
from entropyinfer.shard.weights import build_model

Prompt = str | list[dict[str, str]]
ProgressFn = Callable[[int, int], None]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class RequestOutput:
    prompt: Prompt
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamEvent:
    index: int  # which prompt of the call
    token_id: int
    text: str  # newly decoded text (may be empty while a multi-byte character or stop string is pending)
    finished: bool
    output: RequestOutput | None = None  # set on the sequence's last event


def default_sparse_preset(max_context: int) -> str:
    """The short-context preset for models of <= 8k tokens (SmolLM2), else the reference defaults."""
    return "entropy_short" if max_context <= 8192 else "entropy_long"


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class LLM:
    """Offline engine on one device.

    `LLM(model, policy="dense", device=None, dtype=None, **overrides)`: `model` is an embedded name
    ("smollm2-135m") or a Hugging Face checkpoint folder; `policy` is "dense", "entropy", "fixed" or
    "snapkv". `load_format` (named as in vLLM): "auto" reads the checkpoint's safetensors, "dummy" builds
    the model with random weights of the checkpoint's shape, so the folder needs only config.json and the
    tokenizer files (speed measurements, serving tests). Sparse hyperparameters come from `policy_config`
    (a preset name such as "entropy_short", or a YAML file; default: the long-context preset, or the short
    one for models of <= 8k context) and `overrides` (e.g. `base_budget=512`); `overrides` may also set
    `EngineConfig` fields (e.g. `prefill_chunk_size`). Unknown keys raise `ConfigError`.

    Decode-time KV compression: `entropy` compresses with the `latent` preset, `snapkv` with the `snapkv`
    preset, `dense` and `fixed` do not. `kv_compression` overrides that for every policy: "none", a preset
    name or a YAML file (`configs/latent.yaml` documents the fields); `kv_<field>` overrides one field
    (e.g. `kv_capacity=2048`, `kv_head_capacity="entropy"`, `kv_recompress_every=256`).
    """

    def __init__(
        self,
        model: str,
        policy: str = "dense",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        policy_config: str | None = None,
        trust_remote_code: bool = False,
        load_format: str = "auto",
        **overrides: Any,
    ):
        check_policy(policy)
        check_load_format(load_format)
        self.load_format = load_format
        self.policy = policy
        engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
        self.engine_config = from_dict(EngineConfig, {k: v for k, v in overrides.items() if k in engine_keys})
        self.checkpoint = resolve_checkpoint(model)
        self.arch = ModelArch.from_folder(self.checkpoint)
        kv_keys = {k for k in overrides if k.startswith("kv_")}
        self.set_kv_compression(
            str(overrides.get("kv_compression", "auto")),
            **{k[3:]: v for k, v in overrides.items() if k in kv_keys - {"kv_compression"}},
        )
        policy_overrides = {k: v for k, v in overrides.items() if k not in engine_keys | kv_keys}
        self.sparse_config = load_sparse_config(
            policy_config or default_sparse_preset(self.arch.max_position_embeddings), **policy_overrides
        )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = _load_tokenizer(self.checkpoint, trust_remote_code)
        self.model = build_model(self.checkpoint, self.device, self.dtype, load_format)
        self.engine = Engine(self.model, self.engine_config)
        if self.engine_config.warm_up_kernels:
            a = self.arch
            warm_up_sparse_prefill(
                self.sparse_config, a.num_heads, a.num_kv_heads, a.head_dim, a.max_position_embeddings,
                self.device, self.dtype,
            )  # fmt: skip
        self.eos_token_ids = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(int(self.tokenizer.eos_token_id))

    @property
    def max_context(self) -> int:
        return self.arch.max_position_embeddings

    def set_kv_compression(self, kv_compression: str = "auto", **fields: Any) -> None:
        """Choose the decode-time KV compression for later requests: "auto" (each policy's default), "none",
        a preset name or a YAML file, with field overrides (``capacity=512``; the constructor's
        ``kv_<field>`` keywords). Raises `ConfigError` naming a bad key."""
        self.kv_compression, self.kv_overrides = kv_compression, dict(fields)
        for p in POLICY_NAMES:  # fail now, naming the key, rather than at the first request
            self.kv_config(p)

    def kv_config(self, policy: str) -> KVCompressionConfig | None:
        """The decode-time KV compression a policy runs with (None: keep the full cache)."""
        name = DECODE_COMPRESSION[policy] if self.kv_compression == "auto" else self.kv_compression
        if name == "none":
            return None
        known = {f.name for f in dataclasses.fields(KVCompressionConfig)}
        unknown = sorted(set(self.kv_overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join('kv_' + k for k in unknown)}; known keys: "
                f"kv_compression, {', '.join('kv_' + k for k in sorted(known))}"
            )
        try:
            return load_kv_compression_config(name, **self.kv_overrides)
        except ConfigError as e:
            key = next((k for k in self.kv_overrides if str(e).startswith(f"{k}:")), None)
            raise ConfigError(f"kv_{e}" if key else f"kv_compression={name!r}: {e}") from None

    # ----------------------------------------------------------------------------------------- prompts
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat message lists through the chat template, strings as they are."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", field="prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidRequestError(
                        f"message {i} needs string 'role' and 'content'", field=f"messages[{i}]"
                    )
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        raise InvalidRequestError(
            "a prompt is a non-empty string or a non-empty list of {'role', 'content'} messages",
            field="prompt",
        )

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.encode(prompt))

    # -------------------------------------------------------------------------------------- generation
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        policy: str | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt (a single prompt still gives a list of one)."""
        batch = _as_batch(prompts)
        outputs: list[RequestOutput | None] = [None] * len(batch)
        for ev in self._run(batch, params or SamplingParams(), policy, progress, cancel):
            if ev.output is not None:
                outputs[ev.index] = ev.output
        return [o for o in outputs if o is not None]

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        policy: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        """Token-by-token events for one prompt; the last has `finished=True` and the full `output`."""
        yield from self._run([prompt], params or SamplingParams(), policy, None, cancel)

    def _run(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        policy: str | None,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> Iterator[StreamEvent]:
        policy = policy or self.policy
        check_policy(policy)
        if len(prompts) > self.engine_config.max_batch_size:
            raise InvalidRequestError(
                f"{len(prompts)} prompts exceed max_batch_size={self.engine_config.max_batch_size}",
                field="prompts",
            )
        token_lists = [self.encode(p) for p in prompts]
        for i, ids in enumerate(token_lists):
            if len(ids) + params.max_tokens > self.max_context:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={params.max_tokens} that exceeds the "
                    f"model's context of {self.max_context} tokens: shorten the prompt or lower max_tokens"
                )
        total_prefill = sum(len(ids) for ids in token_lists)
        seqs = [_Sequence(self, p, ids, params) for p, ids in zip(prompts, token_lists, strict=True)]
        cache = self.engine.new_cache(len(seqs), max(len(ids) for ids in token_lists) + params.max_tokens)
        kv_cfg = self.kv_config(policy)
        compressor = None
        if kv_cfg is not None and params.max_tokens > 1:
            compressor = DecodeCompressor(
                self.arch, kv_cfg, len(seqs), params.max_tokens - 1, self.device, self.dtype
            )
        done_before = 0
        for i, seq in enumerate(seqs):
            seq.compressor = compressor
            attention = build_prefill_attention(policy, self.sparse_config)

            def on_layer(done: int, total: int, base: int = done_before) -> None:
                if progress is not None:
                    progress(base + done, total_prefill)

            t0 = _now(self.device)
            logits = self.engine.prefill(
                torch.tensor(seq.prompt_ids, dtype=torch.long),
                cache,
                i,
                attention,
                progress=on_layer,
                cancel=cancel,
                observe=compressor.obs if compressor is not None else None,
            )
            if compressor is not None and isinstance(attention, SparsePrefill):
                compressor.set_head_entropy(i, attention.head_entropy(self.arch.num_kv_heads))
            token = sample(logits, params, seq.generator)
            seq.stats["prefill_ms"] = (_now(self.device) - t0) * 1e3
            seq.stats.update(attention.stats())
            seq.stats["policy"] = policy
            done_before += len(seq.prompt_ids)
            yield from seq.push(token, i, cache)
        yield from self._decode(seqs, params, cache, cancel, compressor)

    def _decode(
        self,
        seqs: list[_Sequence],
        params: SamplingParams,
        cache: KVCache | CompactKVCache,
        cancel: threading.Event | None,
        compressor: DecodeCompressor | None = None,
    ) -> Iterator[StreamEvent]:
        if all(s.finished for s in seqs):
            return
        dev = self.device
        tokens = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev)
        positions = torch.tensor([len(s.prompt_ids) for s in seqs], dtype=torch.long, device=dev)
        cfg = self.engine_config
        runner = DecodeRunner(
            self.engine,
            cache,
            params.max_tokens - 1,
            compressor,
            graphs=cfg.cuda_graphs,
            min_graph_steps=cfg.cuda_graph_min_tokens,
        )
        t0 = _now(dev)
        steps = 0
        while not all(s.finished for s in seqs):
            if cancel is not None and cancel.is_set():
                raise RequestCancelled("request cancelled during decode")
            logits = runner(tokens, positions)
            cache = runner.cache  # a compact cache once compression has run
            steps += 1
            picks = (
                logits.argmax(-1).tolist()
                if params.greedy
                else [
                    sample(logits[i], params, s.generator) if not s.finished else 0
                    for i, s in enumerate(seqs)
                ]
            )
            elapsed = _now(dev) - t0 - runner.paused_s  # compression and graph capture apart
            for i, s in enumerate(seqs):
                if not s.finished:
                    s.decode_steps = steps
                    s.decode_seconds = elapsed
                    yield from s.push(int(picks[i]), i, cache)
            tokens = torch.tensor([s.last_token for s in seqs], dtype=torch.long, device=dev)
            positions += 1


class _Sequence:
    """Per-prompt generation state: generated ids, incremental text, stop handling, stats."""

    def __init__(self, llm: LLM, prompt: Prompt, prompt_ids: list[int], params: SamplingParams):
        self.llm, self.prompt, self.prompt_ids, self.params = llm, prompt, prompt_ids, params
        self.generator = make_generator(params, llm.device)
        self.generated: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finished = False
        self.finish_reason = "length"
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else llm.eos_token_ids)
        self.holdback = max((len(s) for s in params.stop or []), default=1) - 1
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.stats: dict[str, Any] = {"prompt_tokens": len(prompt_ids)}
        self.compressor: DecodeCompressor | None = None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def push(self, token: int, index: int, cache: KVCache | CompactKVCache) -> Iterator[StreamEvent]:
        self.generated.append(token)
        if token in self.stop_ids:
            self.finished, self.finish_reason = True, "stop"
        else:
            self.text = self.llm.tokenizer.decode(self.generated, skip_special_tokens=True)
            for stop in self.params.stop or []:
                at = self.text.find(stop)
                if at >= 0:
                    self.text = self.text[:at]
                    self.finished, self.finish_reason = True, "stop"
        if len(self.generated) >= self.params.max_tokens:
            self.finished = True
        upto = len(self.text) if self.finished else len(self.text) - self.holdback
        if not self.finished and self.text.endswith("\ufffd"):  # an incomplete multi-byte character
            upto = min(upto, len(self.text) - 1)
        delta = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted += len(delta)
        output = self._output(index, cache) if self.finished else None
        yield StreamEvent(index=index, token_id=token, text=delta, finished=self.finished, output=output)

    def _output(self, index: int, cache: KVCache | CompactKVCache) -> RequestOutput:
        stats = dict(self.stats)
        stats["generated_tokens"] = len(self.generated)
        stats["decode_ms_per_token"] = (
            self.decode_seconds * 1e3 / self.decode_steps if self.decode_steps else 0.0
        )
        stats["kv_tokens_kept"] = cache.tokens_kept(index)
        stats["kv_tokens_kept_per_layer"] = cache.tokens_per_layer(index)
        stats["kv_tokens_kept_total"] = round(
            sum(stats["kv_tokens_kept_per_layer"]) * self.llm.arch.num_kv_heads
        )  # positions held, summed over layers and KV heads
        stats["kv_bytes"] = cache.bytes_used(index)
        stats["kv_compression"] = "none"
        if self.compressor is not None:
            stats.update(self.compressor.stats(index))
        stats.setdefault("kv_bytes_before", stats["kv_bytes"])
        return RequestOutput(self.prompt, self.text, list(self.generated), self.finish_reason, stats)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts):
        return [prompts]  # one chat conversation
    if isinstance(prompts, (list, tuple)) and prompts:
        return list(prompts)
    raise InvalidRequestError(
        "prompts must be a string, a chat message list, or a non-empty list of them", field="prompts"
    )


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load_tokenizer(folder: Any, trust_remote_code: bool) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # remote-code tokenizers (openPangu) need explicit consent
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise ConfigError(
                f"the tokenizer in {folder} is remote code: pass trust_remote_code=True to load it"
            ) from e
        raise
