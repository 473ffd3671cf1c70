"""Typed configuration of the Serve application (the `args` of configs/serve.yaml's application).

Loaded with `entropyinfer.configs.loader.from_dict`, so unknown keys fail with their dotted name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from entropyinfer.configs.loader import from_dict, load_yaml
from entropyinfer.errors import ConfigError
from entropyinfer.shard.config import check_load_format

KNOWN_POLICIES = ("dense", "entropy", "fixed", "snapkv")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine deployment runs and how its replicas are placed."""

    model: str = "smollm2-135m"  # a model preset LLM knows, or a checkpoint folder
    policy: str = "entropy"  # default attention policy when a request names none
    policies: tuple[str, ...] = ("dense", "entropy", "fixed")  # accepted in a request's `policy` field
    device: str | None = None  # passed to LLM; None: the shard's GPU if it has one, else CPU
    dtype: str | None = None
    # Sparse-prefill settings: a preset name (entropy_long, entropy_short) or a YAML file, passed to
    # LLM(policy_config=...); None: the LLM's default for the model's context length.
    policy_config: str | None = None
    # LLM(load_format=...): "auto" reads the checkpoint's safetensors; "dummy" builds random weights of the
    # checkpoint's shape (the folder needs only config.json and the tokenizer): benchmarks, tests.
    load_format: str = "auto"
    # Extra LLM(**overrides): sparse-prefill fields (base_budget, ...), shard engine fields
    # (prefill_chunk_size, ...), kv_* decode compression fields; checked when the config is loaded.
    overrides: dict[str, Any] = field(default_factory=dict)
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"  # auto: GPU bundles iff the cluster has GPUs
    num_shards: int = 1  # shard actors per replica: one placement-group bundle each
    cpus_per_shard: float = 1.0
    cpu_threads: int | None = None  # torch threads of a CPU shard; None: all cores of its node
    num_replicas: int = 1
    max_ongoing_requests: int = 16
    load_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.policy not in self.policies:
            raise ConfigError(
                f"engine.policy {self.policy!r} is not in engine.policies {list(self.policies)}"
            )
        unknown = [p for p in self.policies if p not in KNOWN_POLICIES]
        if unknown:
            raise ConfigError(
                f"engine.policies: unknown policy {unknown[0]!r}; known: {list(KNOWN_POLICIES)}"
            )
        check_load_format(self.load_format, "engine.load_format")
        if self.num_shards != 1:
            raise ConfigError("engine.num_shards: only 1 shard per replica is supported for now")
        if self.cpus_per_shard < 0 or self.num_replicas < 1 or self.max_ongoing_requests < 1:
            raise ConfigError("engine: cpus_per_shard >= 0, num_replicas >= 1, max_ongoing_requests >= 1")
        check_llm_options(self.policy_config, self.overrides)

    def shard_args(self) -> dict[str, Any]:
        """What each shard actor builds its `LLM` from (`ShardActor(engine=...)`)."""
        return {
            "model": self.model,
            "policy": self.policy,
            "device": self.device,
            "dtype": self.dtype,
            "policy_config": self.policy_config,
            "load_format": self.load_format,
            "overrides": dict(self.overrides),
            "cpu_threads": self.cpu_threads,
        }


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

    def __post_init__(self) -> None:
        values = (self.max_body_bytes, self.max_batch_documents, self.max_questions, self.max_tokens)
        if min(*values, self.max_prompts) < 1:
            raise ConfigError("limits: every limit must be >= 1")

    @property
    def max_wire_items(self) -> int:
        """Items in one array of a decoded body (documents, messages, ...): above every count limit."""
        return max(4096, self.max_batch_documents, self.max_questions, self.max_prompts)


@dataclass(frozen=True)
class AuthConfig:
    """An optional bearer token protecting every route but /healthz."""

    api_key: str | None = None
    api_key_env: str | None = "ENTROPYINFER_API_KEY"  # read in the ingress replica when api_key is unset

    def resolve(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


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
class ServeAppConfig:
    """The Serve application: `args` of the application in configs/serve.yaml."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    served_model_name: str | None = None  # the name in /v1/models; default: engine.model

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model


# LLM(...) keyword arguments that have their own `engine` key, and plain LLM keywords allowed in overrides.
_ENGINE_OWN_KEYS = ("model", "policy", "device", "dtype", "policy_config", "load_format")
_LLM_KEYWORDS = ("trust_remote_code",)
_DEFAULT_SPARSE_PRESETS = ("entropy_short", "entropy_long")  # LLM picks one by the model's context


def check_llm_options(policy_config: str | None, overrides: dict[str, Any]) -> None:
    """Fail at config load, naming the key, on what `LLM(policy_config=..., **overrides)` would reject in
    every engine replica (a crash-looping deployment): the same split as LLM's: shard engine fields,
    kv_* decode-compression fields, the rest sparse-prefill fields."""
    from entropyinfer.configs.loader import load_yaml
    from entropyinfer.policies.config import SparsePrefillConfig, load_sparse_config
    from entropyinfer.shard.config import EngineConfig as ShardEngineConfig

    where = "engine.overrides"
    for key in _ENGINE_OWN_KEYS:
        if key in overrides:
            raise ConfigError(f"{where}.{key}: set engine.{key} instead")
    if policy_config is not None:
        try:
            load_yaml(policy_config)
        except ConfigError as e:
            raise ConfigError(f"engine.policy_config: {e}") from None
    engine_keys = {f.name for f in dataclasses.fields(ShardEngineConfig)}
    sparse_keys = {f.name for f in dataclasses.fields(SparsePrefillConfig)}
    kv = {k: v for k, v in overrides.items() if k.startswith("kv_")}
    kv_fields = _check_kv_overrides(kv, where) if kv else set()
    known = engine_keys | sparse_keys | kv_fields | set(_LLM_KEYWORDS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(f'{where}.{k}' for k in unknown)}; known keys: "
            f"{', '.join(sorted(engine_keys | sparse_keys))}, kv_compression, kv_<field>, trust_remote_code"
        )
    if not isinstance(overrides.get("trust_remote_code", False), bool):
        raise ConfigError(f"{where}.trust_remote_code: expected true or false")
    try:
        from_dict(ShardEngineConfig, {k: v for k, v in overrides.items() if k in engine_keys})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    sparse = {k: v for k, v in overrides.items() if k in sparse_keys}
    errors: list[ConfigError] = []
    for preset in (policy_config,) if policy_config is not None else _DEFAULT_SPARSE_PRESETS:
        try:
            load_sparse_config(preset, **sparse)
            return
        except ConfigError as e:
            errors.append(e)
    raise ConfigError(f"{where}: {errors[0]}")


def _check_kv_overrides(kv: dict[str, Any], where: str) -> set[str]:
    """The kv_* keys LLM knows (kv_compression and kv_<KVCompressionConfig field>); checks their values
    against the preset(s) they apply to. Imports torch, so only when some kv_* key is set."""
    from entropyinfer.policies.kv_compression import KVCompressionConfig, load_kv_compression_config

    known = {"kv_compression"} | {f"kv_{f.name}" for f in dataclasses.fields(KVCompressionConfig)}
    fields_ = {k[3:]: v for k, v in kv.items() if k in known and k != "kv_compression"}
    name = kv.get("kv_compression", "auto")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.kv_compression: expected a preset name, a YAML file, auto or none")
    presets = {"auto": ("latent", "snapkv"), "none": ()}.get(name, (name,))
    if set(kv) <= known:
        for preset in presets:
            try:
                load_kv_compression_config(preset, **fields_)
            except ConfigError as e:
                raise ConfigError(f"{where}: kv_compression={preset!r}: {e}") from None
    return known


def app_config(args: dict[str, Any] | ServeAppConfig | None) -> ServeAppConfig:
    """The typed config from an application's `args` (unknown keys raise ConfigError)."""
    if isinstance(args, ServeAppConfig):
        return args
    return from_dict(ServeAppConfig, dict(args or {}), "args")


def to_args(config: ServeAppConfig) -> dict[str, Any]:
    """Plain-dict form (what `serve run` passes back as `args`)."""
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class ServeFile:
    """What the project reads from a Serve config file (the rest is Ray's; Ray validates it)."""

    host: str
    port: int
    app_name: str
    route_prefix: str
    import_path: str
    app: ServeAppConfig


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
    return ServeFile(
        host=str(http.get("host", "127.0.0.1")),
        port=int(http.get("port", 8000)),
        app_name=str(app.get("name", "default")),
        route_prefix=str(app.get("route_prefix", "/")),
        import_path=str(app["import_path"]),
        app=from_dict(ServeAppConfig, app.get("args") or {}, f"applications[{idx}].args"),
    )
