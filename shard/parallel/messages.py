"""What rank 0 sends the other ranks of a tensor-parallel group: one `StepPlan` per model call.

A plan is a list of typed ops (frozen dataclasses below), encoded with msgpack: tensors as (dtype, shape,
raw bytes), the config dataclasses and ops as a type name plus their fields, nothing pickled. The last op
of a plan is the model call every rank runs (`Prefill`, `Decode`, `Compress`, `Probe`, `Shutdown`); the
ones before it mirror what rank 0 did to its own state since the last plan (observation-pool rows, prefix
cache policy states, swapped KV, finished requests), in order.

    broadcast_plan(StepPlan([...]), group)     # rank 0
    plan = receive_plan(group)                 # every other rank (blocks until rank 0 sends)

Both are two broadcasts over a gloo (CPU) process group: the payload's length, then its bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from entropyinfer.policies.config import KVCompressionConfig, SparsePrefillConfig
from entropyinfer.shard.parallel.executor import PrefillCall

VERSION = 3  # of the plan format; a rank refuses a plan of another version


@dataclass(frozen=True)
class ObsAcquire:
    """Rank 0 took observation-pool row `row` for a window of `window` queries."""

    window: int
    row: int


@dataclass(frozen=True)
class ObsRelease:
    row: int


@dataclass(frozen=True)
class Share:
    """The prefix cache shares pages of `request_id` whose ends carry its prefill state: each rank keeps
    ``state_at(segments)`` of its own heads under `names` (page i's state covers `counts[i]` segments)."""

    request_id: str
    segments: int
    names: list[bytes]
    counts: list[int]


@dataclass(frozen=True)
class Evict:
    """Rank 0 evicted the prefix cache entry `name` (its policy state goes too)."""

    name: bytes


@dataclass(frozen=True)
class Drop:
    """`request_id` finished or was cancelled: forget its attention object and swapped KV."""

    request_id: str


@dataclass(frozen=True)
class Swap:
    """Preemption by swap: `out` copies the request's KV (pages `table`, one list per table row) to host
    memory before rank 0 frees them; `in` writes it back into the new pages `table`."""

    request_id: str
    out: bool
    table: list[list[int]]


@dataclass(frozen=True)
class Prefill:
    call: PrefillCall


@dataclass(frozen=True)
class Decode:
    """One decode step (see `PagedDecoder`): tables ``[B, rows, P]`` and lengths ``[L, B, rows]`` in the
    core's layout; rows / slots the observation index (None: no window in the batch); request_ids: the rows'
    requests when some prefilled sequence-parallel (each rank knows where their K/V lies), else None."""

    tokens: torch.Tensor
    positions: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor
    rows: torch.Tensor | None
    slots: torch.Tensor | None
    steps_left: int
    request_ids: list[str] | None = None


@dataclass(frozen=True)
class Compress:
    """KV compression of one sequence: lengths / capacities ``[L, rows]``, table its pages per row. Every
    rank plans its own heads, the kept counts are all-gathered, rank 0 allocates the new pages and
    broadcasts them, every rank writes what it kept."""

    request_id: str
    obs_row: int
    decode_steps: int
    kv: KVCompressionConfig
    lengths: torch.Tensor
    capacities: torch.Tensor
    table: list[list[int]]
    shares: torch.Tensor | None = None  # learned SP split: the pinned `SegmentShares` bins [L, rows, B]


@dataclass(frozen=True)
class Probe:
    """Every rank reports what it holds and its peak device memory (tests, health checks, benchmarks);
    `reset_peak`: then starts a new peak."""

    reset_peak: bool = False


@dataclass(frozen=True)
class Shutdown:
    """The group is closing: the other ranks leave their loop."""


Op = ObsAcquire | ObsRelease | Share | Evict | Drop | Swap | Prefill | Decode | Compress | Probe | Shutdown


@dataclass(frozen=True)
class StepPlan:
    ops: list[Op] = field(default_factory=list)
    version: int = VERSION


_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        ObsAcquire, ObsRelease, Share, Evict, Drop, Swap, Prefill, Decode, Compress, Probe, Shutdown,
        StepPlan, PrefillCall, SparsePrefillConfig, KVCompressionConfig,
    )
}  # fmt: skip
_TUPLES = {("PrefillCall", "resume"), ("PrefillCall", "head_table")}  # fields msgpack turns into lists


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"__tensor__": [str(t.dtype).removeprefix("torch."), list(t.shape), raw]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name not in _TYPES:
            raise TypeError(f"{name} is not a plan type")
        return {"__type__": name, **{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot put a {type(obj).__name__} in a plan")


def _object_hook(d: dict[str, Any]) -> Any:
    if "__tensor__" in d:
        dtype_name, shape, raw = d["__tensor__"]
        dtype = getattr(torch, dtype_name)
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if "__type__" in d:
        name = d.pop("__type__")
        for cls_name, fname in _TUPLES:
            if cls_name == name and isinstance(d.get(fname), list):
                d[fname] = tuple(d[fname])
        return _TYPES[name](**d)
    return d


def encode(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, default=_default, use_bin_type=True))


def decode(payload: bytes) -> Any:
    return msgpack.unpackb(payload, object_hook=_object_hook, raw=False, strict_map_key=False)


def broadcast_object(obj: Any, group: dist.ProcessGroup | None, src: int = 0) -> Any:
    """Send `obj` (a plan type, tensors, lists, ints, bytes) from `src` to every rank; returns it."""
    if dist.get_rank() == src:
        payload = encode(obj)
        size = torch.tensor([len(payload)], dtype=torch.long)
        dist.broadcast(size, src, group=group)
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src, group=group)
        return obj
    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src, group=group)
    buf = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src, group=group)
    return decode(buf.numpy().tobytes())


def broadcast_plan(plan: StepPlan, group: dist.ProcessGroup | None) -> None:
    broadcast_object(plan, group)


def receive_plan(group: dist.ProcessGroup | None) -> StepPlan:
    plan = broadcast_object(None, group)
    if not isinstance(plan, StepPlan) or plan.version != VERSION:
        raise RuntimeError(f"a plan of another version (or not a plan) reached this rank: {type(plan)}")
    return plan
