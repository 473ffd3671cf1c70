"""The tensor-parallel group a model runs in: its rank, its size, and the collectives the layers need.

A small frozen object passed into the model (`CausalLM(arch, group=...)`); `None` means one rank and no
communication. There is no global state: two models in one process may use two groups.

    dist.init_process_group("gloo", rank=r, world_size=k, init_method=f"tcp://127.0.0.1:{port}")
    group = TensorParallelGroup.from_world()        # rank r of k, the default process group
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    size: int
    process_group: dist.ProcessGroup | None = None  # None: torch.distributed's default group

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


def rank_of(group: TensorParallelGroup | None) -> int:
    return 0 if group is None else group.rank


def size_of(group: TensorParallelGroup | None) -> int:
    return 1 if group is None else group.size
