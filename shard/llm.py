"""`LLM`: the offline Python API. Tokenizes (with the chat template), prefills, decodes, reports stats."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from entropyinfer.errors import (
    ConfigError,
    InvalidRequestError,
    PromptTooLongError,
    RequestCancelled,
)
from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.kv_compression import KVCompressionConfig
from entropyinfer.policies.registry import get_policy
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import SparsePrefill, build_prefill_attention, warm_up_sparse_prefill
from entropyinfer.shard.compression import DecodeCompressor
from entropyinfer.shard.config import KVConfig, LLMConfig
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


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in _DTYPES.items() if "float" in k}
        if dtype not in names:
            raise ConfigError(f"dtype {dtype} is not one of {', '.join(_DTYPES)}")
        return names[dtype]
    return dtype


class LLM:
    """Offline engine on one device.

    `LLM(model, policy="dense", device=None, dtype=None, **keywords)`: `model` is an embedded name
    ("smollm2-135m") or a Hugging Face checkpoint folder; `policy` one of `policies.registry.POLICY_NAMES`
    ("dense", "entropy", "fixed", "snapkv"). The keywords are those of
    `shard.config.LLMConfig.from_keywords`: `load_format` ("auto" reads the checkpoint's safetensors,
    "dummy" builds random weights of its shape, as in vLLM), `trust_remote_code`, `max_model_len`; engine
    settings (`prefill_chunk_size`, `max_num_seqs`, `cuda_graphs`, ...); `policy_config` (a sparse preset
    such as "entropy_short", or a YAML file; default: the long-context preset, or the short one for models
    of <= 8k context) and sparse fields on top of it (`base_budget=512`); `kv_compression` ("auto": entropy
    -> latent, snapkv -> snapkv, dense and fixed -> none; or "none", a preset, a YAML file) and
    `kv_<field>` (`kv_capacity=2048`). Unknown keys raise
    `ConfigError` naming them. `LLM.from_config(LLMConfig)` takes a built config (the Serve shard actors).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        policy: str = "dense",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **keywords: Any,
    ):
        config = LLMConfig.from_keywords(
            {
                "model": str(model),
                "policy": policy,
                "device": None if device is None else str(device),
                "dtype": _dtype_name(dtype),
                **keywords,
            }
        )
        self._load(config)

    @classmethod
    def from_config(cls, config: LLMConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._load(config)
        return llm

    def _load(self, config: LLMConfig) -> None:
        self.config = config
        self.checkpoint = resolve_checkpoint(config.model.model)
        self.arch = ModelArch.from_folder(self.checkpoint)
        limit = config.model.max_model_len
        if limit is not None and limit > self.arch.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={limit} exceeds the model's context of {self.arch.max_position_embeddings}"
            )
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.tokenizer = _load_tokenizer(self.checkpoint, config.model.trust_remote_code)
        self.model = build_model(self.checkpoint, self.device, self.dtype, config.model.load_format)
        self.engine = Engine(self.model, config.engine)
        if config.engine.warm_up_kernels:
            a = self.arch
            warm_up_sparse_prefill(
                config.sparse, a.num_heads, a.num_kv_heads, a.head_dim, self.max_context,
                self.device, self.dtype,
            )  # fmt: skip
        self.eos_token_ids = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(int(self.tokenizer.eos_token_id))

    @property
    def policy(self) -> str:
        """The default policy of requests that name none."""
        return self.config.policy

    @property
    def sparse_config(self) -> SparsePrefillConfig:
        return self.config.sparse

    @property
    def max_context(self) -> int:
        return self.config.model.max_model_len or self.arch.max_position_embeddings

    def set_kv_compression(self, kv_compression: str = "auto", **fields: Any) -> None:
        """Choose the decode-time KV compression for later requests: "auto" (each policy's default), "none",
        a preset name or a YAML file, with field overrides (``capacity=512``; the constructor's
        ``kv_<field>`` keywords). Raises `ConfigError` naming a bad key."""
        self.config = dataclasses.replace(self.config, kv=KVConfig.build(kv_compression, **fields))

    def kv_config(self, policy: str) -> KVCompressionConfig | None:
        """The decode-time KV compression a policy runs with (None: keep the full cache)."""
        return self.config.kv.for_policy(policy)

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
        policy_options: Mapping[str, Any] | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt (a single prompt still gives a list of one).

        `policy` overrides the default policy for this call; `policy_options` overrides sparse-prefill
        fields for this call (``{"target_density": 0.25}``, ``{"base_budget": 512}``; ConfigError names a
        bad key)."""
        batch = _as_batch(prompts)
        outputs: list[RequestOutput | None] = [None] * len(batch)
        run = self._run(batch, params or SamplingParams(), policy, policy_options, progress, cancel)
        for ev in run:
            if ev.output is not None:
                outputs[ev.index] = ev.output
        return [o for o in outputs if o is not None]

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        policy: str | None = None,
        policy_options: Mapping[str, Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[StreamEvent]:
        """Token-by-token events for one prompt; the last has `finished=True` and the full `output`."""
        yield from self._run([prompt], params or SamplingParams(), policy, policy_options, None, cancel)

    def _run(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        policy: str | None,
        policy_options: Mapping[str, Any] | None,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> Iterator[StreamEvent]:
        policy = policy or self.policy
        get_policy(policy)
        config = self.config.with_sparse(**policy_options) if policy_options else self.config
        max_seqs = config.engine.max_num_seqs
        if len(prompts) > max_seqs:
            raise InvalidRequestError(
                f"{len(prompts)} prompts exceed max_num_seqs={max_seqs}", field="prompts"
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
            attention = build_prefill_attention(policy, config.sparse)

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
        cfg = self.config.engine
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
