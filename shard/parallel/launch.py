"""A tensor-parallel group on this machine, without Ray: rank 0 in the calling process, ranks 1..k-1 in
processes started here (torch.multiprocessing's forkserver, daemonic).

    engine, executor = start_group(config, checkpoint, full_arch, device, dtype, max_context)
    core = EngineCore(engine, tokenizer, eos_ids, max_context, executor=executor)
    ...
    executor.close()            # stops the workers, destroys the process group

CPU: gloo, each rank with ``cpu_count // k`` torch threads (at least one), so 4 ranks share 2 cores. GPU:
NCCL for the model's collectives, rank r on ``cuda:r``. Plans always travel over a separate gloo group
(host tensors) whose timeout is long, since idle workers wait on it; the model group's collectives time
out after `COLLECTIVE_TIMEOUT_S`. The address is 127.0.0.1 and the port a free one chosen now. One group per
process at a time (it is torch.distributed's default group): close one before starting the next.

This is the first step of issue 11's shard group; the Ray version (`cluster/shard_group.py`: one actor
per rank in the replica's placement group) starts the same `worker_main` in each actor.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.distributed as dist

from entropyinfer.errors import ConfigError
from entropyinfer.shard.arch import ModelArch
from entropyinfer.shard.attention import warm_up_sparse_prefill
from entropyinfer.shard.config import LLMConfig
from entropyinfer.shard.engine import Engine
from entropyinfer.shard.parallel.group import TensorParallelGroup
from entropyinfer.shard.parallel.lockstep import LockstepExecutor, WorkerLoop
from entropyinfer.shard.weights import build_model

COLLECTIVE_TIMEOUT_S = 30.0  # a model collective that waits longer fails (a hung rank)
PLAN_TIMEOUT = timedelta(days=7)  # idle workers wait this long for the next plan


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
    timeout_s: float = COLLECTIVE_TIMEOUT_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_device(device: str, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if device == "cuda" else torch.device(device)


def join_group(spec: RankSpec, rank: int) -> tuple[TensorParallelGroup, dist.ProcessGroup | None]:
    """Initialise torch.distributed for `rank`: the model group (default) and the plan group (gloo)."""
    cuda = spec.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{spec.port}",
        rank=rank,
        world_size=spec.world,
        timeout=timedelta(seconds=spec.timeout_s),
    )
    plan_group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)
    return TensorParallelGroup.from_world(), plan_group


def build_engine(
    config: LLMConfig,
    checkpoint: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int,
    group: TensorParallelGroup | None = None,
) -> Engine:
    """The model runner of this rank (its slice of the checkpoint; all of it without a group), with the
    sparse kernels warmed up on GPU (`EngineConfig.warm_up_kernels`)."""
    model = build_model(checkpoint, device, dtype, config.model.load_format, group=group)
    engine = Engine(model, config.engine)
    if config.engine.warm_up_kernels:
        a = engine.arch  # the rank's heads
        warm_up_sparse_prefill(
            config.sparse, a.num_heads, a.num_kv_heads, a.head_dim, max_context, device, dtype
        )
    return engine


def worker_main(spec: RankSpec, rank: int) -> None:
    """A rank > 0: join, build, run plans until rank 0 shuts the group down (or goes away)."""
    torch.set_num_threads(spec.threads)
    group, plan_group = join_group(spec, rank)
    try:
        device = rank_device(spec.device, rank)
        engine = build_engine(spec.config, spec.checkpoint, device, spec.dtype, spec.max_context, group)
        full = ModelArch.from_folder(spec.checkpoint)
        WorkerLoop(engine, group, plan_group, full, spec.max_context).run()
    finally:
        dist.destroy_process_group()


def cpu_threads(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def start_group(
    config: LLMConfig,
    checkpoint: str | Path,
    full_arch: ModelArch,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int,
) -> tuple[Engine, LockstepExecutor]:
    """Start ranks 1..k-1, join as rank 0, build rank 0's engine and its `LockstepExecutor`."""
    world = config.parallel.world_size
    full_arch.local(world)  # ConfigError naming the sizes that work, before any process starts
    if dist.is_initialized():
        raise ConfigError(
            "a tensor-parallel group already runs in this process (torch.distributed is initialised): "
            "close() that LLM first"
        )
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(
            f"tensor_parallel_size={world} needs {world} GPUs, this machine has {torch.cuda.device_count()}"
        )
    threads = cpu_threads(world) if device.type == "cpu" else torch.get_num_threads()
    spec = RankSpec(config, str(checkpoint), world, free_port(), device.type, dtype, max_context, threads)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "entropyinfer.shard.parallel.launch"])
    procs: list[BaseProcess] = [
        ctx.Process(target=worker_main, args=(spec, r), daemon=True, name=f"tp-rank-{r}")
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        group, plan_group = join_group(spec, 0)
    except Exception:
        _stop(procs)
        torch.set_num_threads(old_threads)
        raise

    def live() -> str | None:
        dead = [(r, p.exitcode) for r, p in enumerate(procs, start=1) if not p.is_alive()]
        if not dead:
            return None
        return ", ".join(f"rank {r} exited (code {code})" for r, code in dead)

    def on_close(graceful: bool) -> None:
        _stop(procs, 5.0 if graceful else 0.2)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(old_threads)

    try:
        engine = build_engine(config, checkpoint, device, dtype, max_context, group)
        executor = LockstepExecutor(engine, group, plan_group, full_arch, max_context, live, on_close)
    except Exception:
        on_close(False)
        raise
    executor.processes = procs
    return engine, executor


def _stop(procs: list[BaseProcess], wait_s: float = 5.0) -> None:
    for p in procs:
        p.join(timeout=wait_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=wait_s)
