"""The configuration of one model instance: `LLMConfig`, frozen and nested, built in one place.

    LLMConfig
      model     ModelConfig      which checkpoint, where, in which dtype, how long a context
      policy    str              the default attention policy (`policies/registry.py`)
      engine    EngineConfig     how the engine runs it (chunk sizes, sequences per step, CUDA graphs)
      sparse    SparsePrefillConfig  sparse-prefill hyperparameters (a preset in configs/ + keywords)
      kv        KVConfig         decode-time KV compression of every policy
      parallel  ParallelConfig   tensor / sequence parallel sizes

Users never build the nesting by hand: `LLM(model, policy=..., **keywords)`, the `engine.llm` mapping of the
Serve config and the CLI all pass flat keywords to `LLMConfig.from_keywords`, which puts each keyword in its
section (`configs.loader.split_keywords`), resolves the presets and checks every value, raising `ConfigError`
that names an unknown or ill-typed key and lists the valid ones. Engine settings use vLLM's names where the
meaning is the same (`max_num_seqs`, `max_num_batched_tokens`, `max_model_len`, `gpu_memory_utilization`,
`enable_prefix_caching`, `load_format`, `dtype`, `seed`, `tensor_parallel_size`; docs/serving.md's table).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from entropyinfer.configs.loader import KeywordSection, check_int, from_dict, split_keywords
from entropyinfer.errors import ConfigError, UnknownPolicyError
from entropyinfer.policies.config import (
    KVCompressionConfig,
    SparsePrefillConfig,
    load_kv_compression_config,
    load_sparse_config,
)
from entropyinfer.policies.registry import POLICIES, get_policy

__all__ = [
    "LOAD_FORMATS",
    "EngineConfig",
    "KVConfig",
    "LLMConfig",
    "ModelConfig",
    "ParallelConfig",
    "check_load_format",
    "default_sparse_preset",
]

# How the weights are read (vLLM's names): "auto" reads the checkpoint's safetensors; "dummy" fills a model
# of the checkpoint's shape with random weights (only config.json and the tokenizer are read): benchmarks,
# serving tests without a real checkpoint.
LoadFormat = Literal["auto", "dummy"]
LOAD_FORMATS: tuple[str, ...] = ("auto", "dummy")


def check_load_format(value: object, name: str = "load_format") -> None:
    """Raise ConfigError naming `name` unless `value` is one of LOAD_FORMATS."""
    if value not in LOAD_FORMATS:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(LOAD_FORMATS)}")


DTYPES = ("auto", "float32", "fp32", "float", "float16", "fp16", "half", "bfloat16", "bf16")  # vLLM's + short


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m"  # an embedded model name or a Hugging Face checkpoint folder
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: the GPU if there is one, else the CPU
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    load_format: LoadFormat = "auto"
    trust_remote_code: bool = False  # tokenizers that are remote code (openPangu) need consent
    max_model_len: int | None = None  # a shorter context than the checkpoint's (None: the checkpoint's)
    # vLLM's `seed`: the seed stream of sampled requests that bring none, so the same requests in the same
    # order sample the same tokens (None: each such request a fresh seed). Dummy weights always use seed 0.
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: give an embedded model name or a checkpoint folder")
        check_load_format(self.load_format)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, minimum=1)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)


DENSE_PAIRS_PER_BATCHED_TOKEN = 1 << 14
"""Dense prefill query-key pairs a step may run beside decoding streams, per token of its budget
(`EngineConfig.max_dense_prefill_pairs = "auto"`). A pair costs about 4 x d x Hq x layers FLOPs (0.5 MFLOP
in an 8B model), a token of the linear layers about 2 x parameters (16 GFLOP): ~30k pairs cost one token's
work; 16384 keeps a step's dense attention at about half its token budget's."""
MIN_DENSE_PREFILL_PAIRS = 1 << 24  # "auto" never cuts finer (smaller pieces only add steps)


@dataclass(frozen=True)
class EngineConfig:
    # Tokens per chunk of the token-wise prefill work (norms, projections, MLP): bounds activation memory.
    # Attention itself runs over the whole prompt in one fused kernel, so no N x N matrix ever exists.
    prefill_chunk_size: int = 4096
    max_num_seqs: int = 32  # sequences running at once (decoded together in one step)
    # Tokens one step runs: one per decoding sequence plus the prompt chunks it prefills (shard/scheduler.py).
    max_num_batched_tokens: int = 8192
    # Query-key pairs of dense prefill attention a prompt's chunk may run beside decoding streams or other
    # prefills: dense attention over a long prefix costs by its keys, so a dense prompt's chunks and a sparse
    # prompt's dense last segment are cut into pieces of about this many pairs (whole pages), and the streams
    # keep their pace. A prefill alone in its step runs whole. "auto": `max_num_batched_tokens` x
    # `DENSE_PAIRS_PER_BATCHED_TOKEN` (16384), at least 2^24, so the one knob trades latency for throughput:
    # 2^24 pairs (128 queries over a 128k prefix, about 30 ms of an 8B model's step on an H200) up to 1024
    # tokens, the setting measured for the streams' p99 (pieces of 2^25 pairs were a 128k document's only
    # steps over 100 ms, benchmarks/stall_trace.py; 2^23 at 512 doubled a dense document's prefill, 63.9 s
    # against 29 s, without lowering p99); 2^27 at the default 8192, where 2^24 cut a batch of 32k dense
    # prompts into ~500-token chunks and took 1.5x their prefill time (benchmarks/results/core_decode.md).
    # An int: that many pairs; None: no limit.
    max_dense_prefill_pairs: int | Literal["auto"] | None = "auto"
    # Scheduling (shard/scheduler.py): at most `max_long_partial_prefills` prompts with more than
    # `long_prefill_token_threshold` tokens left to prefill (after the prefix cache) prefill at once, and
    # shorter ones are admitted past a long one that waits, so chats are not held behind documents.
    long_prefill_token_threshold: int = 4096
    max_long_partial_prefills: int = 1
    # Paged KV memory (shard/kv_pages.py): pages of `kv_page_size` tokens per KV head, shared by all layers.
    kv_page_size: int = 16
    # How many pages: explicit, or (None) on GPU from `gpu_memory_utilization` of the device memory after
    # the model, the staging buffer of the largest prefill and its activations; on CPU, 2 x the context.
    num_kv_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True  # capture the decode step in a CUDA graph (GPU only) ...
    cuda_graph_min_tokens: int = 8  # ... when at least this many tokens are generated
    # Overlapped decode (shard/engine_core.py): a greedy decode step is launched before the previous one's
    # tokens are read back (its inputs fed from the device), so the host's per-step work runs while the GPU
    # computes. True, False, or None: on CUDA only (on the CPU nothing overlaps; it would only delay each
    # streamed token by one step). One rank only: with several, sending a step's plan waits for the step.
    async_decode: bool | None = None
    # Piecewise CUDA graphs of prefill chunks of up to 512 tokens (shard/prefill_graphs.py): each layer's
    # token-wise parts (norms, projections, rope, MLP) replayed, attention eager, so a chunk's step beside
    # decoding streams is not host-bound. True, False, or None: on CUDA only (True on the CPU runs the same
    # static buffers without graphs, for tests). One rank only.
    prefill_graphs: bool | None = None
    # GPU: compile the sparse-prefill kernels for every block-count size class when the model loads, so the
    # first long request of each size does not pay Triton's compile time (a few seconds, once per process).
    warm_up_kernels: bool = True
    # Chunked prefill (shard/engine_core.py): a prompt runs in chunks of at most `max_num_batched_tokens`
    # tokens (aligned to the sparse segment size) interleaved with decode steps, for every policy whose
    # budget rule is causal (dense, fixed, entropy in `causal` / `spread` mode); others run one-shot.
    enable_chunked_prefill: bool = True
    # Automatic prefix caching: full KV pages keyed by their tokens and everything that shaped their KV.
    enable_prefix_caching: bool = True
    # A sparse policy's prefill chunk reads its prefix where it lies, in the KV pages (profiling from the
    # pages' block max/min, the paged block-sparse kernel), instead of gathering it per layer: True, None (on
    # CUDA only; the CPU references gather anyway) or False. On an H200 (bf16, benchmarks/gpu_kernel_check
    # and chunk_trace) the paged kernels match their references and a 2048-token chunk at a 113k prefix
    # ran 64.5 ms against 69.5 ms gathering.
    paged_prefix_reads: bool | None = None

    def __post_init__(self) -> None:
        for name in (
            "prefill_chunk_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "long_prefill_token_threshold",
            "max_long_partial_prefills",
            "kv_page_size",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_int("cuda_graph_min_tokens", self.cuda_graph_min_tokens, minimum=0)
        ps = self.kv_page_size
        if ps & (ps - 1) or not 8 <= ps <= 128:
            raise ConfigError(f"kv_page_size: a power of two in 8 .. 128 (the paged kernel's), got {ps}")
        if self.num_kv_pages is not None:
            check_int("num_kv_pages", self.num_kv_pages, minimum=1)
        if self.max_dense_prefill_pairs not in (None, "auto"):
            check_int("max_dense_prefill_pairs", self.max_dense_prefill_pairs, minimum=1)
        for name in ("async_decode", "prefill_graphs"):
            if getattr(self, name) not in (None, True, False):
                raise ConfigError(f"{name}: expected true, false or null, got {getattr(self, name)!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ConfigError(f"gpu_memory_utilization: expected a number in (0, 1], got {u!r}")

    def reads_prefix_in_place(self, device_type: str) -> bool:
        """`paged_prefix_reads` on a device of this type ("cuda", "cpu"): None means on CUDA only."""
        reads = self.paged_prefix_reads
        return device_type == "cuda" if reads is None else reads

    def dense_prefill_pairs(self) -> int | None:
        """`max_dense_prefill_pairs` with "auto" resolved (None: no limit)."""
        pairs = self.max_dense_prefill_pairs
        if pairs == "auto":
            return max(MIN_DENSE_PREFILL_PAIRS, self.max_num_batched_tokens * DENSE_PAIRS_PER_BATCHED_TOKEN)
        return pairs

    def graphs_prefill(self, device_type: str) -> bool:
        """`prefill_graphs` on a device of this type: None means on CUDA only."""
        return device_type == "cuda" if self.prefill_graphs is None else self.prefill_graphs

    def overlaps_decode(self, device_type: str) -> bool:
        """`async_decode` on a device of this type: None means on CUDA only."""
        return device_type == "cuda" if self.async_decode is None else self.async_decode


@dataclass(frozen=True)
class ParallelConfig:
    """A group of ``tensor_parallel_size x sequence_parallel_size`` ranks: heads split over the tensor-
    parallel ranks; prompts of at least `sequence_parallel_min_tokens` tokens split into contiguous segments
    over the sequence-parallel ones (`shard/parallel/sequence.py`; shorter ones run on every SP rank)."""

    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1
    sequence_parallel_min_tokens: int = 1024

    def __post_init__(self) -> None:
        check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        check_int("sequence_parallel_size", self.sequence_parallel_size, minimum=1)
        check_int("sequence_parallel_min_tokens", self.sequence_parallel_min_tokens, minimum=1)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.sequence_parallel_size


@dataclass(frozen=True)
class KVConfig:
    """Decode-time KV compression, resolved for every policy (None: that policy keeps the full cache).

    `compression` is what was asked for: "auto" (each policy's default preset from the registry: entropy
    -> latent, snapkv -> snapkv, dense and fixed -> none), "none", or a preset name / YAML file that every
    policy then uses; `kv_<field>` keywords override fields of the preset(s)."""

    compression: str = "auto"
    by_policy: dict[str, KVCompressionConfig | None] = field(default_factory=dict)

    def for_policy(self, policy: str) -> KVCompressionConfig | None:
        get_policy(policy)
        return self.by_policy.get(policy)

    @classmethod
    def build(cls, compression: str = "auto", **fields: Any) -> KVConfig:
        known = {f.name for f in dataclasses.fields(KVCompressionConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join('kv_' + k for k in unknown)}; known keys: "
                f"kv_compression, {', '.join('kv_' + k for k in sorted(known))}"
            )
        if not isinstance(compression, str) or not compression:
            raise ConfigError("kv_compression: expected auto, none, a preset name or a YAML file")
        by_policy: dict[str, KVCompressionConfig | None] = {}
        resolved: dict[str, KVCompressionConfig] = {}
        for name, policy in POLICIES.items():
            preset = policy.kv_compression if compression == "auto" else compression
            if preset == "none":
                by_policy[name] = None
                continue
            if preset not in resolved:
                try:
                    resolved[preset] = load_kv_compression_config(preset, **fields)
                except ConfigError as e:
                    key = next((k for k in fields if str(e).startswith(f"{k}:")), None)
                    raise ConfigError(f"kv_{e}" if key else f"kv_compression={preset!r}: {e}") from None
            by_policy[name] = resolved[preset]
        return cls(compression, by_policy)


def default_sparse_preset(max_context: int | None) -> str:
    """The short-context preset for models of <= 8k tokens (SmolLM2), else the reference defaults."""
    return "entropy_short" if max_context is not None and max_context <= 8192 else "entropy_long"


def checkpoint_context(model: str) -> int | None:
    """The context length of `model` without loading it: an embedded model's known config, or a folder's
    config.json; None when neither can be read here (then the long-context preset is the default)."""
    from entropyinfer.shard.embedded import embedded_model

    spec = embedded_model(model)
    if spec is not None:
        value = spec.expected_config.get("max_position_embeddings")
        return int(value) if isinstance(value, int) else None
    path = Path(model).expanduser() / "config.json"
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def _section(cls: type, name: str, *, prefix: str = "", extra: tuple[str, ...] = ()) -> KeywordSection:
    return KeywordSection(name, tuple(f.name for f in dataclasses.fields(cls)) + extra, prefix)


# Where each keyword of LLM(...) goes. `policy_config` picks the sparse preset; `kv_compression` the KV one.
_SECTIONS = (
    KeywordSection("top", ("policy",)),
    _section(ModelConfig, "model"),
    _section(EngineConfig, "engine"),
    _section(ParallelConfig, "parallel"),
    _section(SparsePrefillConfig, "sparse", extra=("policy_config",)),
    _section(KVCompressionConfig, "kv", prefix="kv_", extra=("compression",)),
)
_RENAMED = {"max_batch_size": "max_num_seqs"}


@dataclass(frozen=True)
class LLMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: str = "dense"
    engine: EngineConfig = field(default_factory=EngineConfig)
    sparse: SparsePrefillConfig = field(default_factory=SparsePrefillConfig)
    sparse_preset: str = "entropy_long"  # the preset (or YAML file) `sparse` was built from
    kv: KVConfig = field(default_factory=KVConfig.build)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # No `policy_config` was given: the preset follows the model's context. It is guessed where the config
    # is built (an embedded model's known context, or the folder's config.json when it is readable there)
    # and settled by `for_context` where the model loads, with these sparse keywords applied again.
    sparse_auto: bool = False
    sparse_keywords: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_policy(self.policy)
        if self.parallel.tensor_parallel_size > 1:  # the split needs every head's window scores: one rank's
            for name, kv in self.kv.by_policy.items():  # heads only would silently give uniform capacities
                if kv is not None and kv.head_capacity in ("adaptive", "adaptive_layers"):
                    raise ConfigError(
                        f"kv_head_capacity={kv.head_capacity!r} (policy {name}) is not supported with "
                        f"tensor_parallel_size={self.parallel.tensor_parallel_size} yet: use 'uniform' or "
                        "'entropy', or tensor_parallel_size=1"
                    )

    def for_context(self, max_context: int) -> LLMConfig:
        """This config for a loaded model of `max_context` tokens: with an automatic preset, the one that
        context calls for (the config itself when the guess was right)."""
        preset = default_sparse_preset(max_context)
        if not self.sparse_auto or preset == self.sparse_preset:
            return self
        sparse = load_sparse_config(preset, **self.sparse_keywords)
        return dataclasses.replace(self, sparse=sparse, sparse_preset=preset)

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any], where: str = "") -> LLMConfig:
        """The config of `LLM(**keywords)`: model, policy, device, dtype, load_format, trust_remote_code,
        max_model_len; EngineConfig and ParallelConfig fields; `policy_config` (a sparse preset in configs/
        or a YAML file; default: by the model's context) and SparsePrefillConfig fields on top of it;
        `kv_compression` and `kv_<KVCompressionConfig field>`."""
        for old, new in _RENAMED.items():
            if old in keywords:
                raise ConfigError(f"{_join(where, old)}: renamed to {new} (vLLM's name)")
        parts = split_keywords(keywords, _SECTIONS, where)
        policy = parts["top"].get("policy", "dense")
        if not isinstance(policy, str):
            raise ConfigError(f"{_join(where, 'policy')}: expected a policy name, got {policy!r}")
        try:
            get_policy(policy)
        except UnknownPolicyError as e:
            raise UnknownPolicyError(f"{_join(where, 'policy')}: {e}" if where else str(e)) from None
        try:
            model = from_dict(ModelConfig, parts["model"])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
        sparse_kw = dict(parts["sparse"])
        preset = sparse_kw.pop("policy_config", None)
        auto = preset is None
        if preset is None:
            preset = default_sparse_preset(checkpoint_context(model.model))
        if not isinstance(preset, str):
            raise ConfigError(f"{_join(where, 'policy_config')}: expected a preset name or a YAML file")
        kv_kw = dict(parts["kv"])
        compression = kv_kw.pop("compression", "auto")
        try:
            return cls(
                model=model,
                policy=policy,
                engine=from_dict(EngineConfig, parts["engine"]),
                sparse=load_sparse_config(preset, **sparse_kw),
                sparse_preset=preset,
                kv=KVConfig.build(compression, **kv_kw),
                parallel=from_dict(ParallelConfig, parts["parallel"]),
                sparse_auto=auto,
                sparse_keywords=sparse_kw,
            )
        except ConfigError as e:
            raise type(e)(f"{where}: {e}" if where else str(e)) from None

    def with_sparse(self, **fields: Any) -> LLMConfig:
        """A copy whose sparse settings have `fields` replaced (checked; ConfigError names a bad key)."""
        merged = {**dataclasses.asdict(self.sparse), **fields}
        keywords = {**self.sparse_keywords, **fields}
        return dataclasses.replace(
            self, sparse=from_dict(SparsePrefillConfig, merged), sparse_keywords=keywords
        )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
