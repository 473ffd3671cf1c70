"""The tensor-parallel group a model runs in: its rank, its size, and the collectives the layers need.

A small frozen object passed into the model (`CausalLM(arch, group=...)`); `None` means one rank and no
communication. There is no global state: two models in one process may use two groups.

    dist.init_process_group("gloo", rank=r, world_size=k, init_method=f"tcp://127.0.0.1:{port}")
    group = TensorParallelGroup.from_world()        # rank r of k, the default process group
    group = with_kv_replicas(group, num_kv_heads)   # tp > Hkv: the ranks sharing this rank's KV head

With more ranks than KV heads, ``tp / Hkv`` consecutive ranks hold one KV head, each with part of its GQA
group's query heads (`heads.py`). The sparse policies decide per KV head from the group's mean block
logits, so those replicas all-reduce their partial means (`mean_over_replicas`, a subgroup of the tensor-
parallel group per KV head) before the entropy and the top blocks: every replica then picks the blocks one
rank would (one all-reduce of ``[1, nseg, nblocks]`` float32 per profiled layer and chunk; with `ranking:
queries` a second one, a max, of the query-ranking scores: `max_over_replicas`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    size: int
    process_group: dist.ProcessGroup | None = None  # None: torch.distributed's default group
    replicas: int = 1  # ranks holding this rank's KV head (`with_kv_replicas`)
    replica_group: dist.ProcessGroup | None = None  # those ranks (replicas > 1)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in 0 .. {self.size - 1}")

    @classmethod
    def from_world(cls, process_group: dist.ProcessGroup | None = None) -> TensorParallelGroup:
        """This process's rank in an initialised torch.distributed group (the default one if None)."""
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group), process_group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (a no-op on one rank); returns `x`."""
        if self.size > 1:
            dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` side by side along `dim`, in rank order (on every rank)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.process_group)
        return torch.cat(parts, dim=dim)

    def mean_over_replicas(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of `x` over the ranks that hold this rank's KV head, in place (a no-op without
        replicas); returns `x`. Every replica calls it with the same shape (`kernels.block_scoring`'s
        `LogitReduce`)."""
        if self.replicas > 1:
            dist.all_reduce(x, group=self.replica_group)
            x.div_(self.replicas)
        return x

    def max_over_replicas(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise max of `x` over the ranks that hold this rank's KV head, in place (a no-op
        without replicas); returns `x` (the query-ranking scores' `LogitReduce`)."""
        if self.replicas > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.replica_group)
        return x

    def global_rank(self, rank: int) -> int:
        return rank if self.process_group is None else int(dist.get_global_rank(self.process_group, rank))


def with_kv_replicas(group: TensorParallelGroup, num_kv_heads: int, **new_group: Any) -> TensorParallelGroup:
    """`group` with its KV-head replica subgroup when it has more ranks than `num_kv_heads` (else `group`).
    Every rank of the whole world calls it, in the same order (torch.distributed's rule for `new_group`;
    `new_group`: its backend / timeout)."""
    if group.size <= num_kv_heads:
        return group
    r = group.size // num_kv_heads
    subgroups = [
        dist.new_group([group.global_rank(i) for i in range(h * r, (h + 1) * r)], **new_group)
        for h in range(num_kv_heads)
    ]
    return dataclasses.replace(group, replicas=r, replica_group=subgroups[group.rank // r])


def rank_of(group: TensorParallelGroup | None) -> int:
    return 0 if group is None else group.rank


def size_of(group: TensorParallelGroup | None) -> int:
    return 1 if group is None else group.size
