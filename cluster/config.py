"""Typed configuration of the Serve application (the `args` of configs/serve.yaml's application).

Loaded with `entropyinfer.configs.loader.from_dict`, so unknown keys fail with their dotted name. The model
instance is `engine.llm`, the same `LLMConfig` that `LLM(...)` builds from the same keywords.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from entropyinfer.configs.loader import from_dict, load_yaml, merge
from entropyinfer.errors import ConfigError
from entropyinfer.policies.head_budgets import RebalanceConfig
from entropyinfer.policies.registry import POLICY_NAMES, get_policy
from entropyinfer.shard.config import LLMConfig


@dataclass(frozen=True)
class ReplicaConfig:
    """The engine replica: the model instance it runs (`llm`) and how its replicas are placed.

    `llm` is built from the keywords of `LLM(...)` (`shard.config.LLMConfig.from_keywords`): model, policy,
    policy_config, load_format, dtype, base_budget, kv_capacity, max_num_seqs, ...; a typo fails at load,
    naming the key. Its defaults are LLM's (policy "dense"); configs/serve.yaml sets policy "entropy"."""

    llm: LLMConfig = field(default_factory=lambda: LLMConfig.from_keywords({}))
    policies: tuple[str, ...] = POLICY_NAMES  # accepted in a request's `policy` field
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"  # auto: GPU bundles iff the cluster has GPUs
    cpus_per_shard: float = 1.0
    cpu_threads: int | None = None  # torch threads of a CPU shard; None: all cores of its node
    num_replicas: int = 1
    max_ongoing_requests: int = 16
    load_timeout_s: float = 900.0
    health_check_period_s: float = 10.0  # Serve's check of the replica (every shard answers); a dead
    # shard is found within this, and the replica restarted
    # The placement group of a replica's tensor-parallel ranks (one bundle each): "STRICT_PACK" keeps them on
    # one node (NCCL over NVLink); "SPREAD" / "STRICT_SPREAD" across nodes, "PACK" where they fit.
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = "STRICT_PACK"

    def __post_init__(self) -> None:
        for p in self.policies:
            try:
                get_policy(p)
            except ConfigError as e:
                raise ConfigError(f"engine.policies: {e}") from None
        if self.llm.policy not in self.policies:
            raise ConfigError(
                f"engine.llm.policy {self.llm.policy!r} is not in engine.policies {list(self.policies)}"
            )
        if self.cpus_per_shard < 0 or self.num_replicas < 1 or self.max_ongoing_requests < 1:
            raise ConfigError("engine: cpus_per_shard >= 0, num_replicas >= 1, max_ongoing_requests >= 1")
        if self.health_check_period_s <= 0:
            raise ConfigError("engine.health_check_period_s must be > 0")

    @property
    def num_shards(self) -> int:
        """Ranks per replica (one placement-group bundle each): tensor x sequence parallel size. Rank 0 is
        the shard actor (bundle 0), ranks 1.. its `RayRanks` workers (bundles 1..)."""
        return self.llm.parallel.world_size


@dataclass(frozen=True)
class JobsConfig:
    """The document-job store and its worker."""

    db_path: str = "~/.entropyinfer/jobs.sqlite"
    workers: int = 1  # jobs processed at once by each ingress replica
    lease_s: float = 60.0  # a running job with no heartbeat for this long was lost with its worker
    max_attempts: int = 3  # a job lost (worker gone, or engine unavailable) this many times is failed
    retry_backoff_s: float = 10.0  # wait after an engine outage before the next job; doubles per attempt
    result_ttl_s: float = 7 * 24 * 3600.0  # finished jobs (and results) are deleted after this
    poll_s: float = 1.0
    progress_interval_s: float = 0.25
    system_prompt: str | None = "Answer the question about the document. Be concise."
    prompt_template: str = "{document}\n\nQuestion: {question}"

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_attempts < 1 or self.lease_s <= 0 or self.poll_s <= 0:
            raise ConfigError("jobs: workers >= 1, max_attempts >= 1, lease_s > 0, poll_s > 0")
        if self.retry_backoff_s < 0:
            raise ConfigError("jobs.retry_backoff_s must be >= 0")
        if "{document}" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise ConfigError("jobs.prompt_template must contain {document} and {question}")

    @property
    def db_file(self) -> Path:
        return Path(os.path.expanduser(self.db_path))


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits; a request beyond them gets a 4xx naming the field."""

    # A decoded body takes up to ~25x its size in memory (many tiny strings or containers), so keep it
    # modest; split bigger batches into several jobs.
    max_body_bytes: int = 32 * 1024 * 1024
    max_batch_documents: int = 256
    max_questions: int = 16
    max_tokens: int = 4096  # largest `max_tokens` a request may ask for
    max_prompts: int = 16  # prompts in one /v1/completions request
    # Prompt tokens of one document (with its question and the template); None: the model's context.
    max_document_tokens: int | None = None
    # Backpressure: completion requests an ingress replica holds beyond those the engine replicas run at
    # once (engine.max_ongoing_requests x num_replicas); past it a 503 with Retry-After. Bursts below
    # it wait in the queue.
    max_waiting_requests: int = 128
    max_queued_jobs: int = 10_000  # queued jobs in the store; past it a submission gets a 503
    retry_after_s: int = 1  # the Retry-After of a 503 from these queue limits
    # Deadline of a completion request without its own `timeout` (seconds; None: none): past it the
    # request is aborted and answered 408 (cluster/deadline.py).
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        values = (self.max_body_bytes, self.max_batch_documents, self.max_questions, self.max_tokens)
        queues = (self.max_waiting_requests, self.max_queued_jobs, self.retry_after_s)
        if min(*values, self.max_prompts, *queues, self.max_document_tokens or 1) < 1:
            raise ConfigError("limits: every limit must be >= 1")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ConfigError("limits.request_timeout_s must be > 0 (or null: no deadline)")

    @property
    def max_wire_items(self) -> int:
        """Items in one array of a decoded body (documents, messages, ...): above every count limit."""
        return max(4096, self.max_batch_documents, self.max_questions, self.max_prompts)


@dataclass(frozen=True)
class AuthConfig:
    """Optional bearer tokens protecting every route but /healthz (and /metrics if `metrics_public`).

    With several keys (`api_key` and `api_keys`, or a comma-separated environment variable), each key
    sees and cancels only the jobs it submitted."""

    api_key: str | None = None
    api_keys: tuple[str, ...] = ()
    api_key_env: str | None = "ENTROPYINFER_API_KEY"  # read in the ingress replica when no key is set
    metrics_public: bool = False  # /metrics without a key (a scraper on a trusted network)

    def resolve(self) -> str | None:
        keys = self.keys()
        return keys[0] if keys else None

    def keys(self) -> tuple[str, ...]:
        """Every configured key: `api_key` and `api_keys`, else those of `api_key_env` (comma-separated)."""
        keys = tuple(k for k in (self.api_key, *self.api_keys) if k)
        if not keys and self.api_key_env:
            keys = tuple(k.strip() for k in os.environ.get(self.api_key_env, "").split(",") if k.strip())
        return keys


@dataclass(frozen=True)
class IngressConfig:
    """The HTTP ingress. Its replicas run on the head node (see `app.py`): the job store is a SQLite file
    on that node's disk, shared by every replica there (claims are atomic, each worker has its own id)."""

    num_replicas: int = 1
    max_ongoing_requests: int = 256

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.max_ongoing_requests < 1:
            raise ConfigError("ingress: num_replicas >= 1, max_ongoing_requests >= 1")


@dataclass(frozen=True)
class PolicyActorConfig:
    """The central policy actor (cluster/policy_actor.py): one named, detached actor per application that
    aggregates per-head statistics of sparse prefills and makes versioned head budget tables."""

    enabled: bool = False
    density_target: float | None = None  # mean prefill density the tables aim at (None: budget-neutral)
    # EXPERIMENTAL, off: tables that move budget between heads (measured worse than the entropy rule's own
    # budgets at matched density, benchmarks/results/policy_rebalance.md); off, the actor only aggregates
    # statistics and makes tables only for a density_target
    rebalance_heads: bool = False
    every_requests: int = 32  # at most one new table version per this many requests ...
    every_s: float = 30.0  # ... and per this many seconds (the version is part of the prefix-cache key)
    warmup_requests: int = 8  # no table before this many requests
    profile_path: str | None = None  # JSON profile loaded at start and saved with each version (warm start)
    pull_interval_s: float = 2.0  # each shard pulls the current table this often, in the background
    timeout_s: float = 2.0  # a call to the actor slower than this counts as a failure (fall back)
    connect_timeout_s: float = 30.0  # a shard's first call (a new actor's worker may take seconds to start)
    retry_s: float = 10.0  # after a failure, the shard looks the actor up again this much later
    max_pending: int = 64  # statistics queued or in flight per shard; beyond it new ones are dropped

    def __post_init__(self) -> None:
        self.rebalance  # noqa: B018 (validates the rebalancing fields, naming them)
        if min(self.pull_interval_s, self.timeout_s, self.connect_timeout_s, self.retry_s) <= 0:
            raise ConfigError("policy: pull_interval_s, timeout_s, connect_timeout_s and retry_s > 0")
        if self.max_pending < 1:
            raise ConfigError("policy: max_pending >= 1")

    @property
    def rebalance(self) -> RebalanceConfig:
        try:
            return RebalanceConfig(
                density_target=self.density_target,
                move_budget=self.rebalance_heads,
                every_requests=self.every_requests,
                every_s=self.every_s,
                warmup_requests=self.warmup_requests,
            )
        except ConfigError as e:
            raise ConfigError(f"policy.{e}") from None


@dataclass(frozen=True)
class ServeAppConfig:
    """The Serve application: `args` of the application in configs/serve.yaml."""

    engine: ReplicaConfig = field(default_factory=ReplicaConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    policy: PolicyActorConfig = field(default_factory=PolicyActorConfig)
    served_model_name: str | None = None  # the name in /v1/models; default: engine.llm.model

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.llm.model.model


def app_config(args: dict[str, Any] | ServeAppConfig | None) -> ServeAppConfig:
    """The typed config from an application's `args` (unknown keys raise ConfigError)."""
    if isinstance(args, ServeAppConfig):
        return args
    return from_dict(ServeAppConfig, dict(args or {}), "args")


@dataclass(frozen=True)
class ServeFile:
    """What the project reads from a Serve config file (the rest is Ray's; Ray validates it)."""

    host: str
    port: int
    app_name: str
    route_prefix: str
    import_path: str
    app: ServeAppConfig
    args: dict[str, Any] = field(default_factory=dict)  # the application's args as written in the file

    def with_args(self, overrides: dict[str, Any]) -> ServeFile:
        """The file with `overrides` merged into its args (nested mappings merge) and typed again."""
        args = merge(self.args, overrides)
        return dataclasses.replace(self, args=args, app=from_dict(ServeAppConfig, args, "args"))


def load_serve_file(path: str | Path = "serve") -> ServeFile:
    """Read a `serve run`/`serve deploy` config file: http_options and our application's args."""
    data = load_yaml(path)
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path}: `applications` must be a non-empty list")
    ours = [a for a in apps if isinstance(a, dict) and "entropyinfer" in str(a.get("import_path", ""))]
    if len(ours) != 1:
        raise ConfigError(
            f"{path}: expected one application with an entropyinfer import_path, got {len(ours)}"
        )
    app = ours[0]
    http = data.get("http_options") or {}
    if not isinstance(http, dict):
        raise ConfigError(f"{path}: http_options must be a mapping")
    idx = apps.index(app)
    args = app.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{path}: applications[{idx}].args must be a mapping")
    return ServeFile(
        host=str(http.get("host", "127.0.0.1")),
        port=int(http.get("port", 8000)),
        app_name=str(app.get("name", "default")),
        route_prefix=str(app.get("route_prefix", "/")),
        import_path=str(app["import_path"]),
        app=from_dict(ServeAppConfig, args, f"applications[{idx}].args"),
        args=args,
    )
