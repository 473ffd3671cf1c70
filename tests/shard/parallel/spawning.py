"""Spawning gloo ranks for the parallelism tests: ``spawn(world, fn, *args, group=Factory)`` runs
``fn(Factory.from_world(), *args)`` on `world` processes and fails the test if any rank raises.

Ranks fork from multiprocessing's fork server, which imports torch and the engine once for every test of
the session; each rank has one torch thread (the CI machine has two cores) and joins a gloo group through a
store this process binds first (`master_store`: the OS picks its port, so no other process can take it).
`Factory` is a class with a ``from_world()`` classmethod (`TensorParallelGroup`, `SequenceParallelGroup`):
the group object `fn` gets, over torch.distributed's default group.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropyinfer.shard.parallel.group import TensorParallelGroup
from entropyinfer.shard.parallel.launch import master_store, rank_store

PRELOAD = ["torch", "entropyinfer.shard.engine", "entropyinfer.shard.weights"]


class GroupFactory(Protocol):
    @classmethod
    def from_world(cls) -> Any: ...


def _rank_main(
    rank: int, world: int, port: int, factory: GroupFactory, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=rank_store("127.0.0.1", port, world), rank=rank, world_size=world)
    try:
        fn(factory.from_world(), *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn: Callable[..., None], *args: Any, group: GroupFactory = TensorParallelGroup) -> None:
    """Run ``fn(group.from_world(), *args)`` on `world` gloo ranks (see the module docstring)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    store = master_store("127.0.0.1", world)  # lives until every rank has joined and finished
    mp.start_processes(
        _rank_main, args=(world, store.port, group, fn, args), nprocs=world, join=True,
        start_method="forkserver",
    )  # fmt: skip
