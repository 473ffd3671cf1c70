"""Spawning gloo ranks for the parallelism tests: ``spawn(world, fn, *args, group=Factory)`` runs
``fn(Factory.from_world(), *args)`` on `world` processes and fails the test if any rank raises.

Ranks fork from multiprocessing's fork server, which imports torch and the engine once for every test of
the session; each rank has one torch thread (the CI machine has two cores) and joins a gloo group on a free
port of 127.0.0.1. `Factory` is a class with a ``from_world()`` classmethod (`TensorParallelGroup`,
`SequenceParallelGroup`): the group object `fn` gets, over torch.distributed's default group.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropyinfer.shard.parallel.group import TensorParallelGroup
from entropyinfer.shard.parallel.launch import free_port

PRELOAD = ["torch", "entropyinfer.shard.engine", "entropyinfer.shard.weights"]


class GroupFactory(Protocol):
    @classmethod
    def from_world(cls) -> Any: ...


def _rank_main(
    rank: int, world: int, port: int, factory: GroupFactory, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(factory.from_world(), *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn: Callable[..., None], *args: Any, group: GroupFactory = TensorParallelGroup) -> None:
    """Run ``fn(group.from_world(), *args)`` on `world` gloo ranks (see the module docstring)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    mp.start_processes(
        _rank_main, args=(world, free_port(), group, fn, args), nprocs=world, join=True,
        start_method="forkserver",
    )  # fmt: skip
