"""One request inside the engine core: its ids, sampling, policy, stop rules, text, KV pages and statistics.

`Sequence` is what the scheduler queues and the model runner steps (nano-vllm's `Sequence`, plus what the
sparse policies and decode-time compression need per request). `IncrementalDetokenizer` turns each new
token into its new text in O(1) (vLLM's prefix / read offsets): the text of a small window of tokens is
decoded twice, with and without the new token, and the difference is the delta, held back while it ends in
an incomplete UTF-8 character. `Sequence.append` applies the stop rules (stop token ids, EOS, stop strings
searched only where a new match can be, `max_tokens`) and holds back the text a stop string could still
claim, so streamed deltas never show a stop string.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from entropyinfer.policies.config import SparsePrefillConfig
from entropyinfer.policies.head_budgets import HeadBudgetTable
from entropyinfer.policies.kv_compression import KVCompressionConfig
from entropyinfer.policies.segment_shares import SegmentShares
from entropyinfer.shard.sampling import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from entropyinfer.shard.block_tables import DeviceTable

Prompt = str | list[dict[str, str]]
ProgressFn = Callable[[int, int], None]


@dataclass
class RequestOutput:
    prompt: Prompt
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    stats: dict[str, Any] = field(default_factory=dict)
    # with SamplingParams.logprobs: one {token: logprob} per generated token (the sampled one and top-k);
    # with prompt_logprobs: one per prompt token, None for the first (vLLM's shapes)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_token_ids: list[int] = field(default_factory=list)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re-)prefill: new, or preempted by recompute
    RUNNING = "running"  # holds KV pages and decodes every step
    SWAPPED = "swapped"  # preempted with its (compressed) KV copied to host memory
    FINISHED = "finished"


class IncrementalDetokenizer:
    """Text of the generated ids, one token at a time, equal to ``tokenizer.decode(ids,
    skip_special_tokens=True)`` of all of them (byte-level BPE and SentencePiece tokenizers).

    Only the tokens from ``prefix_offset`` on are decoded per call (a handful): ``prefix_offset ..
    read_offset`` is text already emitted, kept as context because a token's text can depend on the one
    before it (SentencePiece spaces, bytes of one character split over tokens)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self.tokens: list[str] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _window(self, start: int, end: int | None = None) -> str:
        return str(self.tokenizer.convert_tokens_to_string(self.tokens[start:end]))

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while a multi-byte character is still incomplete)."""
        if token_id in self.special:
            return ""
        self.tokens.append(str(self.tokenizer.convert_ids_to_tokens(token_id)))
        prefix = self._window(self.prefix_offset, self.read_offset)
        text = self._window(self.prefix_offset)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character decodes to U+FFFD)."""
        prefix = self._window(self.prefix_offset, self.read_offset)
        text = self._window(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


@dataclass
class SequenceRequest:
    """What `EngineCore.add_request` takes: tokenized, validated, with its policy settings resolved."""

    request_id: str
    prompt: Prompt
    prompt_ids: list[int]
    params: SamplingParams
    policy: str
    sparse: SparsePrefillConfig
    kv: KVCompressionConfig | None  # decode-time compression (None: keep the full cache)
    progress: ProgressFn | None = None  # (layers' share of the prompt done, prompt tokens), per prefill
    cancel: threading.Event | None = None
    # the policy actor's per-head budget factors, pinned for the whole request (None or version 0: the
    # entropy rule's own budgets); its version is part of the prefix-cache key
    head_budgets: HeadBudgetTable | None = None
    # the policy actor's table of where compression keeps positions, pinned likewise (the learned split of
    # a sequence-parallel sequence's capacity; not in the prefix-cache key)
    keep_shares: SegmentShares | None = None


class Sequence:
    """Per-request state. KV: ``block_table[h]`` lists the pages of KV head ``h`` (one page id per
    ``kv_page_size`` tokens; the same list for every head until compression gives heads their own
    lengths); ``kv_lengths`` int32 ``[layers, Hkv]`` (CPU) counts the cached tokens of each (layer, head)."""

    def __init__(
        self,
        request: SequenceRequest,
        tokenizer: Any,
        stop_ids: set[int],
        generator: torch.Generator | None,
        arrival: int,
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prompt_ids = request.prompt_ids
        self.params = request.params
        self.generator = generator
        self.arrival = arrival  # admission order (FIFO within a class)
        self.status = SequenceStatus.WAITING
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprobs] | None = [] if request.params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.stop_ids = stop_ids
        self.stops: list[str] = list(request.params.stop or [])
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        # KV state
        self.block_table: list[list[int]] = []
        # The device copy of block_table (`shard/block_tables.py`; reset whenever block_table is replaced).
        self.table_cache: DeviceTable | None = None
        self.kv_lengths: torch.Tensor | None = None
        self.swapped_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, while swapped
        self.swapped_pages: list[int] = []  # pages per head it held when swapped out
        # prefix cache: names of the shared entries its first pages are (`KVPages.register` / `allocate`)
        self.cached_names: list[bytes] = []
        # prefill state (chunked prefill): prompt tokens whose KV is in its pages, the attention object
        # that carries the policy's per-layer state from chunk to chunk, and its cache page names
        self.num_computed = 0
        self.attention: Any = None
        self.observer: Any = None
        self.page_names: list[bytes] = []
        self.share_pages = 0  # pages below this may be registered in the prefix cache once written
        self.cache_limit = 0  # pages it may take from the prefix cache (it prefills the rest)
        self.resume_unit = 1  # a cached prefix must be a multiple of this many pages (a segment, sparse)
        self.chunk_unit = 0  # chunks are multiples of this many tokens (0: one-shot prefill only)
        # ... except from here on, where every position attends densely to the prompt's end (a sparse
        # prompt's last segment, all of a dense one): chunks may end on any page there
        self.dense_from = 0
        self.prefill_started: float | None = None
        # decode state: decode steps run on the current KV (the token fed at step i is output_ids[i])
        self.decode_steps = 0
        self.obs_row: int | None = None  # row of the observation pool while compression needs queries
        self.compressions = 0
        self.last_compression = 0
        self.capacities: torch.Tensor | None = None  # int64 [L, Hkv] tokens kept per head by compression
        # where the first compression kept prompt positions (`kept_histogram`: fractions [L, Hkv, B],
        # weights [L, Hkv]), until the engine core hands it to its sink; None: not an exact plan
        self.kept_bins: tuple[torch.Tensor, torch.Tensor] | None = None
        # statistics
        self.stats: dict[str, Any] = {"prompt_tokens": len(request.prompt_ids), "policy": request.policy}
        self.decode_seconds = 0.0
        self.decoded_tokens = 0
        self.compression_ms = 0.0
        self.kv_bytes_before: int | None = None
        self.preemptions = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prefilling(self) -> bool:
        """Admitted, but part of the prompt is not yet in its pages."""
        return self.num_computed < self.num_prompt_tokens

    @property
    def compressed(self) -> bool:
        return self.compressions > 0

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds (after a recompute, earlier outputs are fed again)."""
        return self.output_ids[self.decode_steps]

    @property
    def replaying(self) -> bool:
        """The next decode step rebuilds KV of a token already generated (its logits are not sampled)."""
        return self.decode_steps + 1 < len(self.output_ids)

    @property
    def position(self) -> int:
        """Rope position of the next decode step's input."""
        return self.num_prompt_tokens + self.decode_steps

    def cancelled(self) -> bool:
        c = self.request.cancel
        return c is not None and c.is_set()

    def append(self, token: int) -> str:
        """Record a sampled token; returns the text it adds to the output (may be "")."""
        self.output_ids.append(token)
        start = len(self.text)
        if token in self.stop_ids:  # kept in output_ids, not in the text
            self.finish_reason = "stop"
        else:
            self.text += self.detokenizer.push(token)
        if self.finish_reason is not None or len(self.output_ids) >= self.params.max_tokens:
            self.text += self.detokenizer.flush()
        self._check_stop_strings(start)
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        done = self.finish_reason is not None
        upto = len(self.text) if done else len(self.text) - self.holdback
        delta = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted += len(delta)
        return delta

    def _check_stop_strings(self, start: int) -> None:
        """Cut the text at the first stop string; only a match that ends in the new text is new."""
        first = -1
        for stop in self.stops:
            at = self.text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first >= 0:
            self.text = self.text[:first]
            self.finish_reason = "stop"

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.request.prompt, self.text, list(self.output_ids), self.finish_reason or "length", self.stats,
            None if self.logprobs is None else list(self.logprobs), self.prompt_logprobs,
            list(self.prompt_ids),
        )  # fmt: skip
