"""Starting a tensor x sequence parallel group: rank 0 in the calling process, ranks 1..k-1 elsewhere.

    engine, executor = start_group(config, checkpoint, full_arch, device, dtype, max_context)
    core = EngineCore(engine, tokenizer, eos_ids, max_context, executor=executor)
    ...
    executor.close()            # stops the other ranks, destroys the process group

Where the other ranks run is a `Ranks`: `LocalRanks` (the default, no Ray) starts them as daemonic
processes of this machine (torch.multiprocessing's forkserver); `cluster/shard_group.py: RayRanks` as Ray
actors in a placement group. Each runs `worker_main`: join the group, build its slice of the model, run
plans (`WorkerLoop`) until rank 0 shuts the group down.

CPU: gloo, each rank with ``cpu_count // k`` torch threads (at least one; rank 0's process too, while the
group lives), so 4 ranks share 2 cores. GPU: NCCL for the model's collectives, rank r on ``cuda:r`` (or
``cuda:0`` where each process sees one GPU).
Plans travel over the default group (gloo, host tensors) whose timeout is long, since idle workers wait on
it; the model's collectives run in a group of their own that times out after `COLLECTIVE_TIMEOUT_S`.
Rank 0 binds its rendezvous store before the others start, on a port the OS picks (`master_store`), and
waits up to `JOIN_TIMEOUT_S` for them to connect to it at `Ranks.host`.
One group per process at a time (it is torch.distributed's default group): close one before starting
the next.

With ``sequence_parallel_size = sp > 1`` the group has ``tp x sp`` ranks: global rank ``r`` is tensor-parallel
rank ``r % tp`` of sequence-parallel rank ``r // tp`` (rank 0 is both ranks 0). The model's collectives run
in one tensor-parallel group per SP rank (ranks ``[j tp, (j + 1) tp)``), the sequence-parallel all-to-alls
and merges in one SP group per TP rank (ranks ``t, t + tp, ...``); the SP ranks of one TP rank load the same
slice of the checkpoint. With more TP ranks than KV heads (then ``sp == 1``), the ranks replicating one KV
head get a subgroup for the sparse policies' block logits (`group.with_kv_replicas`).
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from entropyinfer.errors import ConfigError
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.config import LLMConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.parallel.all_to_all import SequenceParallelGroup, check_sequence_parallel
from entropyinfer.shard.parallel.group import TensorParallelGroup, with_kv_replicas
from entropyinfer.shard.parallel.lockstep import LockstepExecutor, ShardGroupError, WorkerLoop
from entropyinfer.shard.sparse_warm_up import warm_up_sparse_prefill
from entropyinfer.shard.weights import build_model

COLLECTIVE_TIMEOUT_S = 30.0  # a model collective that waits longer fails (a hung rank)
PLAN_TIMEOUT = timedelta(days=7)  # idle workers wait this long for the next plan
JOIN_TIMEOUT_S = 300.0  # ranks that start slowly (a loaded machine imports torch slowly) may take this long


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to join the group and build its part of the engine."""

    config: LLMConfig
    checkpoint: str
    world: int
    port: int
    device: str  # "cpu" or "cuda" (rank r takes cuda:r)
    dtype: torch.dtype
    max_context: int
    threads: int
    host: str = "127.0.0.1"  # where rank 0 listens
    one_gpu: bool = False  # each rank's process sees only its own GPU (Ray actors): cuda:0
    timeout_s: float = COLLECTIVE_TIMEOUT_S


def master_store(host: str, world: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the OS picks when it binds (``store.port``): no window
    between choosing a free port and binding it in which another process can take it."""
    return dist.TCPStore(
        host, 0, world, is_master=True, timeout=timedelta(seconds=JOIN_TIMEOUT_S), wait_for_workers=False
    )


def rank_store(host: str, port: int, world: int) -> dist.TCPStore:
    """A rank's connection to rank 0's `master_store` at ``host:port`` (waits up to `JOIN_TIMEOUT_S`)."""
    return dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S))


def rank_device(spec: RankSpec, rank: int) -> torch.device:
    if spec.device != "cuda":
        return torch.device(spec.device)
    return torch.device("cuda:0" if spec.one_gpu else f"cuda:{rank}")


def join_group(
    spec: RankSpec,
    rank: int,
    dead: Callable[[], str | None] | None = None,
    store: dist.TCPStore | None = None,
) -> tuple[TensorParallelGroup, SequenceParallelGroup | None, dist.ProcessGroup | None]:
    """Initialise torch.distributed for `rank`: the default group (gloo, `PLAN_TIMEOUT`) carries the plans
    (returned as None: the default group); the model's collectives get groups of their own (NCCL on GPU)
    that time out after `timeout_s`: this rank's tensor-parallel group, and its sequence-parallel group
    (None when ``sp == 1``). Rank 0 waits up to `JOIN_TIMEOUT_S` for every rank to check in, and fails at
    once when `dead()` names a rank that stopped meanwhile. Rank 0 passes the `master_store` it bound before
    the other ranks started (on `spec.port`); the others connect to it."""
    cuda = spec.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank_device(spec, rank))
    if store is None:
        if rank == 0:
            raise ValueError("rank 0 joins with the master_store it bound before starting the other ranks")
        store = rank_store(spec.host, spec.port, spec.world)
    if rank:
        store.set(f"joined/{rank}", "1")
    else:
        _wait_for_ranks(store, spec.world, dead)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.world, timeout=PLAN_TIMEOUT)
    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(seconds=spec.timeout_s)
    tp = spec.config.parallel.tensor_parallel_size
    sp = spec.world // tp
    if sp == 1:  # tp > Hkv (no SP then): the ranks that replicate a KV head get a subgroup
        model = dist.new_group(backend=backend, timeout=timeout)
        kv_heads = ModelArch.from_folder(spec.checkpoint).num_kv_heads
        group = with_kv_replicas(
            TensorParallelGroup.from_world(model), kv_heads, backend=backend, timeout=timeout
        )
        return group, None, None
    # every rank creates every group, in the same order (torch.distributed's rule)
    tps = [
        dist.new_group(list(range(j * tp, (j + 1) * tp)), backend=backend, timeout=timeout) for j in range(sp)
    ]
    sps = [
        dist.new_group(list(range(t, spec.world, tp)), backend=backend, timeout=timeout) for t in range(tp)
    ]
    tp_group = TensorParallelGroup.from_world(tps[rank // tp])
    return tp_group, SequenceParallelGroup.from_world(sps[rank % tp]), None


def _wait_for_ranks(store: dist.TCPStore, world: int, dead: Callable[[], str | None] | None) -> None:
    keys = [f"joined/{r}" for r in range(1, world)]
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not store.check(keys):
        gone = dead() if dead is not None else None
        if gone is not None:
            raise ShardGroupError(f"the tensor-parallel group did not start: {gone}")
        if time.monotonic() > deadline:
            raise ShardGroupError(f"ranks 1..{world - 1} did not join within {JOIN_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def build_engine(
    config: LLMConfig,
    checkpoint: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int,
    group: TensorParallelGroup | None = None,
) -> Engine:
    """The model runner of this rank (its slice of the checkpoint; all of it without a group), with the
    sparse kernels warmed up and the prefill graphs captured on GPU (`EngineConfig.warm_up_kernels`)."""
    model = build_model(checkpoint, device, dtype, config.model.load_format, group=group)
    engine = Engine(model, config.engine)
    if config.engine.warm_up_kernels:
        a, paged = engine.arch, config.engine.reads_prefix_in_place(device.type)  # a: the rank's heads
        warm_up_sparse_prefill(
            config.sparse, a.num_heads, a.num_kv_heads, a.head_dim, max_context, device, dtype,
            page_size=config.engine.kv_page_size if paged else None,
        )  # fmt: skip
        if engine.prefill_graphs is not None:  # before the KV pool takes the free memory
            engine.prefill_graphs.capture_all()
    return engine


def freeze_start_up_objects() -> None:
    """In a process that serves one engine for its whole life (a Serve shard actor, a rank process): move
    what start-up made (the model, compiled kernels, modules) out of the garbage collector's reach, so a full
    collection while serving walks only what requests made (as vLLM's engine process does; one took 0.4 s in
    the middle of a 128k prefill on an H200, benchmarks/stall_trace.py). Not for a library `LLM` in someone's
    process: frozen objects that later become cyclic garbage are never freed until the next call (a rebuilt
    engine: it unfreezes first) or exit, where they are collected again (nanobind reports what is never
    freed)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if not _FROZEN:
        atexit.register(gc.unfreeze)
        _FROZEN.append(True)


_FROZEN: list[bool] = []  # whether freeze_start_up_objects registered its exit hook


def worker_main(spec: RankSpec, rank: int) -> None:
    """A rank > 0: join, build, run plans until rank 0 shuts the group down (or goes away)."""
    torch.set_num_threads(spec.threads)
    group, sp, plan_group = join_group(spec, rank)
    try:
        device = rank_device(spec, rank)
        engine = build_engine(spec.config, spec.checkpoint, device, spec.dtype, spec.max_context, group)
        full = ModelArch.from_folder(spec.checkpoint)
        freeze_start_up_objects()
        WorkerLoop(engine, group, plan_group, full, spec.max_context, sp).run()
    finally:
        dist.destroy_process_group()


def cpu_threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


class Ranks(Protocol):
    """Where ranks 1..k-1 run: started with the group's `RankSpec` (each calls `worker_main`)."""

    host: str  # the address rank 0 listens on (this machine's, as the other ranks reach it)
    gpus_per_process: int  # GPUs each rank's process sees (local processes: all; Ray actors: one)

    def start(self, spec: RankSpec) -> None: ...

    def dead(self) -> str | None:
        """A sentence naming the ranks that stopped, None while all run."""
        ...

    def stop(self, graceful: bool) -> None: ...


class LocalRanks:
    """Ranks 1..k-1 as daemonic processes of this machine (forkserver: torch is imported once)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.processes: list[BaseProcess] = []
        self.gpus_per_process = torch.cuda.device_count()

    def start(self, spec: RankSpec) -> None:
        if spec.device == "cuda" and self.gpus_per_process < spec.world:
            raise ConfigError(
                f"tensor x sequence parallel size {spec.world} needs {spec.world} GPUs, this machine has "
                f"{self.gpus_per_process}"
            )
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "entropyinfer.shard.parallel.launch"])
        self.processes = [
            ctx.Process(target=worker_main, args=(spec, r), daemon=True, name=f"tp-rank-{r}")
            for r in range(1, spec.world)
        ]
        for p in self.processes:
            p.start()

    def dead(self) -> str | None:
        gone = [(r, p.exitcode) for r, p in enumerate(self.processes, start=1) if not p.is_alive()]
        return ", ".join(f"rank {r} exited (code {code})" for r, code in gone) if gone else None

    def stop(self, graceful: bool) -> None:
        wait_s = 5.0 if graceful else 0.2
        self.processes = [p for p in self.processes if p.pid is not None]  # those `start` got to start
        for p in self.processes:
            p.join(timeout=wait_s)
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)


def start_group(
    config: LLMConfig,
    checkpoint: str | Path,
    full_arch: ModelArch,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int,
    ranks: Ranks | None = None,
) -> tuple[Engine, LockstepExecutor]:
    """Start ranks 1..k-1 (`ranks`, default `LocalRanks`), join as rank 0, build rank 0's engine and its
    `LockstepExecutor` (whose `ranks` is `ranks`)."""
    world, tp = config.parallel.world_size, config.parallel.tensor_parallel_size
    full_arch.local(tp)  # ConfigError naming the sizes that work, before any process starts
    check_sequence_parallel(full_arch.num_kv_heads, tp, config.parallel.sequence_parallel_size)
    if dist.is_initialized():
        raise ConfigError(
            "a tensor-parallel group already runs in this process (torch.distributed is initialised): "
            "close() that LLM first"
        )
    ranks = ranks or LocalRanks()
    threads = cpu_threads(world) if device.type == "cpu" else torch.get_num_threads()
    store = master_store(ranks.host, world)
    spec = RankSpec(
        config, str(checkpoint), world, store.port, device.type, dtype, max_context, threads,
        host=ranks.host, one_gpu=ranks.gpus_per_process == 1,
    )  # fmt: skip
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    def on_close(graceful: bool) -> None:
        ranks.stop(graceful)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(old_threads)

    try:
        ranks.start(spec)  # inside: ranks that started before one failed are stopped
        group, sp, plan_group = join_group(spec, 0, ranks.dead, store)
        engine = build_engine(config, checkpoint, device, dtype, max_context, group)
        executor = LockstepExecutor(
            engine, group, plan_group, full_arch, max_context, ranks.dead, on_close, sp, config.parallel
        )
    except Exception:
        on_close(False)
        raise
    executor.ranks = ranks
    return engine, executor
