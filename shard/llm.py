"""`LLM`: the offline Python API, a thin wrapper over the engine core (`shard/engine_core.py`).

It tokenizes (with the chat template), resolves a call's policy, sparse options and KV compression into
`SequenceRequest`s, adds them to the core and steps it until they finish, turning the core's events into
`StreamEvent`s and `RequestOutput`s. `engine` (the model runner: `Engine.prefill` / `decode_step` over a
contiguous cache) stays public for the quality harness and the benchmarks."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from entropyinfer.shard.config import KVConfig, LLMConfig
from entropyinfer.shard.devices import dtype_name, resolve_device, resolve_dtype
from entropyinfer.shard.embedded import resolve_checkpoint
from entropyinfer.shard.engine_core import EngineCore, EngineEvent, Finished
from entropyinfer.shard.parallel.launch import Ranks, build_engine, start_group
from entropyinfer.shard.parallel.lockstep import LockstepExecutor
from entropyinfer.shard.sampling import SamplingParams, TokenLogprobs
from entropyinfer.shard.sequence import Prompt, RequestOutput, SequenceRequest

__all__ = ["LLM", "Prompt", "RequestOutput", "StreamEvent", "resolve_device", "resolve_dtype"]

ProgressFn = Callable[[int, int], None]
_CALLS = itertools.count()


@dataclass
class StreamEvent:
    index: int  # which prompt of the call (prompt i's sequence j with SamplingParams.n: i * n + j)
    token_id: int
    text: str  # newly decoded text (may be empty while a multi-byte character or stop string is pending)
    finished: bool
    output: RequestOutput | None = None  # set on the sequence's last event
    logprobs: TokenLogprobs | None = None  # the token's and the top-k alternatives' (params.logprobs)


class LLM:
    """Offline engine on one device, or a tensor-parallel group of them.

    `LLM(model, policy="dense", device=None, dtype=None, **keywords)`: `model` is an embedded name
    ("smollm2-135m") or a Hugging Face checkpoint folder; `policy` one of `policies.registry.POLICY_NAMES`
    ("dense", "entropy", "fixed", "snapkv"). The keywords are those of
    `shard.config.LLMConfig.from_keywords`: `load_format` ("auto" reads the checkpoint's safetensors,
    "dummy" builds random weights of its shape, as in vLLM), `trust_remote_code`, `max_model_len`, `seed`
    (vLLM's: the seed stream of sampled requests that bring none, so the same requests in the same order
    sample the same tokens); engine
    settings (`prefill_chunk_size`, `max_num_seqs`, `cuda_graphs`, ...); `policy_config` (a sparse preset
    such as "entropy_short", or a YAML file; default: the long-context preset, or the short one for models
    of <= 8k context) and sparse fields on top of it (`base_budget=512`); `kv_compression` ("auto": entropy
    -> latent, snapkv -> snapkv, dense and fixed -> none; or "none", a preset, a YAML file) and
    `kv_<field>` (`kv_capacity=2048`). Unknown keys raise
    `ConfigError` naming them. `LLM.from_config(LLMConfig)` takes a built config (the Serve shard actors).
    `tensor_parallel_size=k` runs ranks 1..k-1 in worker processes of this machine, in lockstep with this
    one (`shard/parallel/launch.py`, one group per process); `close()` stops them.
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
                "dtype": dtype_name(dtype),
                **keywords,
            }
        )
        self._load(config)

    @classmethod
    def from_config(cls, config: LLMConfig, *, ranks: Ranks | None = None) -> LLM:
        """`ranks`: where a tensor-parallel config's ranks 1.. run (default: processes of this machine;
        `cluster/shard_group.py: RayRanks` for Ray actors)."""
        llm = cls.__new__(cls)
        llm._load(config, ranks)
        return llm

    def _load(self, config: LLMConfig, ranks: Ranks | None = None) -> None:
        self.checkpoint = resolve_checkpoint(config.model.model)
        self.arch = ModelArch.from_folder(self.checkpoint)
        config = config.for_context(self.arch.max_position_embeddings)  # settles an automatic preset
        self.config = config
        limit = config.model.max_model_len
        if limit is not None and limit > self.arch.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={limit} exceeds the model's context of {self.arch.max_position_embeddings}"
            )
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        # vLLM's `seed`: the seed stream of sampled requests that bring no seed of their own
        seed = config.model.seed
        self._seeds = random.Random(seed) if seed is not None else None
        self.tokenizer = _load_tokenizer(self.checkpoint, config.model.trust_remote_code)
        self.executor: LockstepExecutor | None = None
        if config.parallel.world_size > 1:  # ranks 1.. in processes of their own, in lockstep with this one
            self.engine, self.executor = start_group(
                config, self.checkpoint, self.arch, self.device, self.dtype, self.max_context, ranks
            )
        else:
            self.engine = build_engine(config, self.checkpoint, self.device, self.dtype, self.max_context)
        self.model = self.engine.model
        self.eos_token_ids = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(int(self.tokenizer.eos_token_id))
        # the engine core: scheduler, paged KV, step loop; `engine` stays the model runner it steps
        self.core = EngineCore(
            self.engine, self.tokenizer, self.eos_token_ids, self.max_context, executor=self.executor
        )
        self._inbox: dict[str, deque[EngineEvent]] = {}
        self._lock = threading.RLock()

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel LLM (a no-op on one rank)."""
        if self.executor is not None:
            self.executor.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        """One `RequestOutput` per prompt (a single prompt still gives a list of one); with
        ``params.n`` > 1, n per prompt, prompt after prompt (sequence j samples with ``seed + j``; they
        run together, so the forks take the prompt's pages from the prefix cache).

        Every prompt is added to the engine core at once and they run together (continuous batching: more
        prompts than `max_num_seqs`, or than the KV pages hold, wait in its queue). `policy` overrides the
        default policy for this call; `policy_options` overrides sparse-prefill fields for this call
        (``{"target_density": 0.25}``, ``{"base_budget": 512}``; ConfigError names a bad key). `progress`
        gets (prompt tokens prefilled, all prompt tokens of the call) per layer; `cancel` stops every
        prompt of the call (RequestCancelled)."""
        batch, params = _as_batch(prompts), params or SamplingParams()
        outputs: list[RequestOutput | None] = [None] * (len(batch) * params.n)
        run = self._run(batch, params, policy, policy_options, progress, cancel)
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
        """Token-by-token events for one prompt; the last has `finished=True` and the full `output`.
        Several streams may be consumed interleaved: they advance the same engine core."""
        if params is not None and params.n > 1:
            raise InvalidRequestError("stream takes n=1 (generate runs n sequences)", field="n")
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
        get_policy(policy or self.policy)
        if policy_options:
            self.config.with_sparse(**policy_options)  # ConfigError before anything runs
        token_lists = [self.encode(p) for p in prompts]
        for i, ids in enumerate(token_lists):
            if len(ids) + params.max_tokens > self.max_context:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={params.max_tokens} that exceeds the "
                    f"model's context of {self.max_context} tokens: shorten the prompt or lower max_tokens"
                )
        total = sum(len(ids) for ids in token_lists)
        call = next(_CALLS)
        index: dict[str, int] = {}
        base = 0
        try:
            for i, (prompt, ids) in enumerate(zip(prompts, token_lists, strict=True)):

                def on_layer(done: int, _n: int, base: int = base) -> None:
                    if progress is not None:
                        progress(base + done, total)

                for j in range(params.n):  # the forks of an n-sequence request report no progress
                    rid, fork = f"llm-{call}-{i}-{j}", params.fork(j) if params.n > 1 else params
                    report = on_layer if j == 0 else None
                    seq = self.request(rid, prompt, fork, policy, policy_options, report, cancel, ids=ids)
                    self.submit(seq)
                    index[rid] = i * params.n + j
                base += len(ids)
            pending = set(index)
            while pending:
                event = self._next_event(pending)
                rid = event.request_id
                if isinstance(event, Finished):
                    pending.discard(rid)
                    if event.output.finish_reason == "cancelled":
                        raise RequestCancelled("request cancelled")
                    continue  # a token always came first
                inbox = self._inbox[rid]
                done = inbox[0] if inbox and isinstance(inbox[0], Finished) else None
                if done is not None:
                    inbox.popleft()
                    pending.discard(rid)
                    if done.output.finish_reason == "cancelled":
                        raise RequestCancelled("request cancelled")
                yield StreamEvent(
                    index=index[rid],
                    token_id=event.token_id,
                    text=event.text,
                    finished=done is not None,
                    output=done.output if done is not None else None,
                    logprobs=event.logprobs,
                )
        finally:
            with self._lock:
                for rid in index:
                    self.core.abort(rid)  # no-op for the finished ones
                    self._inbox.pop(rid, None)

    def request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        policy: str | None = None,
        policy_options: Mapping[str, Any] | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        ids: list[int] | None = None,
    ) -> SequenceRequest:
        """A checked request for the engine core: tokenized, its policy, sparse options and KV compression
        resolved (UnknownPolicyError, ConfigError, InvalidRequestError name what is wrong)."""
        policy = policy or self.policy
        get_policy(policy)
        if self._seeds is not None and params.seed is None and not params.greedy:
            params = dataclasses.replace(params, seed=self._seeds.getrandbits(63))  # LLM(seed=...)'s stream
        config = self.config.with_sparse(**policy_options) if policy_options else self.config
        ids = self.encode(prompt) if ids is None else ids
        kv = self.kv_config(policy)
        return SequenceRequest(request_id, prompt, ids, params, policy, config.sparse, kv, progress, cancel)

    def submit(self, request: SequenceRequest) -> None:
        """Add a request to the engine core; its events then collect in `events(request_id)`'s inbox,
        whoever steps the core (PromptTooLongError if it can never fit)."""
        with self._lock:
            self.core.add_request(request)
            self._inbox[request.request_id] = deque()

    def step(self) -> None:
        """One engine-core step; its events go to their requests' inboxes (events of unknown ids drop)."""
        with self._lock:
            for event in self.core.step():
                inbox = self._inbox.get(event.request_id)
                if inbox is not None:
                    inbox.append(event)

    def take_events(self, request_id: str) -> list[EngineEvent]:
        """The events of a submitted request that arrived since the last call (its inbox is dropped once
        it has finished)."""
        with self._lock:
            inbox = self._inbox.get(request_id)
            if not inbox:
                return []
            events = list(inbox)
            inbox.clear()
            if isinstance(events[-1], Finished):
                self._inbox.pop(request_id, None)
            return events

    def _next_event(self, pending: set[str]) -> EngineEvent:
        """The next event of one of `pending`, stepping the core until there is one."""
        while True:
            with self._lock:
                for rid in pending:
                    if self._inbox[rid]:
                        return self._inbox[rid].popleft()
                self.step()


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
