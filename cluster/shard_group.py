"""The other ranks of a tensor (x sequence) parallel engine as Ray actors, one per rank, in the replica's
placement group (the second step of issue 11's shard group; `shard/parallel/launch.py: LocalRanks` is the
first).

    ranks = RayRanks(placement_group=pg, cpus_per_rank=0.5)          # bundles 1..k-1 of pg
    llm = LLM.from_config(config, ranks=ranks)                        # rank 0 here, in the shard actor

Each actor (`RankActor`) runs `launch.worker_main` in one long actor call: it joins rank 0's
torch.distributed group (rank 0's node address, the port the OS gave rank 0's store), builds its slice of
the model and runs plans until rank 0 shuts the group down, so no Ray call happens per step. A rank whose call
ends (an error, a killed actor or node) shows up in `dead()`, which rank 0 checks before every plan. On
CPU the actors take fractional CPUs and set their torch threads (`RankSpec.threads`); on GPU each takes
one GPU of its bundle and sees it as ``cuda:0``. With a `name`, rank r's actor is the named actor
``{name}-{group}-rank{r}`` in the namespace RANK_NAMESPACE (`actor_names()`; `group` is new for each
group started): the Serve shard actor names its ranks so that /healthz can say which one failed, and an
operator (or a test) can find one with `ray.get_actor(name, namespace=RANK_NAMESPACE)`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from entropyinfer.shard.config import LLMConfig
from entropyinfer.shard.parallel.launch import Ranks, RankSpec, worker_main

if TYPE_CHECKING:
    from entropyinfer.shard.llm import LLM

log = logging.getLogger(__name__)

RANK_NAMESPACE = "entropyinfer-ranks"  # where named rank actors live


class RankActor:
    """One rank > 0 (its process is a Ray worker)."""

    def run(self, spec: RankSpec, rank: int) -> int:
        worker_main(spec, rank)
        return rank

    def pid(self) -> int:
        import os

        return os.getpid()


class RayRanks:
    """`launch.Ranks` as Ray actors; rank r in bundle ``first_bundle + r - 1`` of `placement_group` (None:
    wherever Ray places them)."""

    def __init__(
        self,
        placement_group: Any = None,
        cpus_per_rank: float = 1.0,
        gpu: bool = False,
        first_bundle: int = 1,
        name: str | None = None,
    ) -> None:
        self.placement_group, self.cpus, self.gpu, self.first_bundle = (
            placement_group, cpus_per_rank, gpu, first_bundle,
        )  # fmt: skip
        self.name = name
        self.host = ray.util.get_node_ip_address()
        self.gpus_per_process = 1 if gpu else 0
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self.names: list[str | None] = []

    def start(self, spec: RankSpec) -> None:
        remote: Any = ray.remote(RankActor)  # Ray's actor classes and handles are untyped
        group = uuid.uuid4().hex[:8]  # a killed actor's name may stay taken a moment: never reuse one
        for rank in range(1, spec.world):
            strategy = (
                PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group,
                    placement_group_bundle_index=self.first_bundle + rank - 1,
                )
                if self.placement_group is not None
                else None
            )
            name = f"{self.name}-{group}-rank{rank}" if self.name else None
            named = {"name": name, "namespace": RANK_NAMESPACE} if name else {}
            actor = remote.options(
                num_cpus=self.cpus, num_gpus=1 if self.gpu else 0, scheduling_strategy=strategy,
                max_concurrency=2, **named,
            ).remote()  # fmt: skip
            self.actors.append(actor)
            self.names.append(name)
            self.runs.append(actor.run.remote(spec, rank))

    def alive(self) -> list[bool]:
        """Per rank 1..k-1: whether its actor still runs the group (its one long call has not ended)."""
        if not self.runs:
            return []
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return [ref not in done for ref in self.runs]

    def actor_names(self) -> list[str | None]:
        """Per rank 1..k-1: its actor's name in RANK_NAMESPACE (None without a `name`)."""
        return list(self.names)

    def dead(self) -> str | None:
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        if not done:
            return None
        out = []
        for ref in done:
            rank = self.runs.index(ref) + 1
            try:
                ray.get(ref, timeout=0)
                out.append(f"rank {rank} left the group")
            except Exception as e:  # the actor died or its call raised
                out.append(f"rank {rank} exited ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return ", ".join(out)

    def stop(self, graceful: bool) -> None:
        if graceful and self.runs:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=5.0)
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.runs, self.names = [], [], []


class RankHealth(TypedDict):
    rank: int
    healthy: bool
    actor: str | None  # the rank's Ray actor name (None: rank 0, the shard actor itself)


class GroupHealth(TypedDict):
    """A shard group as /healthz reports it: its shape, each rank's health, what failed last."""

    tensor_parallel_size: int
    sequence_parallel_size: int
    state: Literal["ok", "rebuilding", "broken"]  # broken: the last rebuild failed (the next request retries)
    ranks: list[RankHealth]
    rebuilds: int  # groups built again after a failure
    failed_ranks: list[int]  # the ranks found dead at the last failure
    last_failure: str | None


class ShardGroup:
    """Rank 0's side of an engine replica's group (the shard actor holds one): builds the `LLM` with the
    ranks `make_ranks()` gives (None: `LocalRanks`), rebuilds it after a failure, reports its health."""

    def __init__(self, config: LLMConfig, make_ranks: Callable[[], Ranks] | None = None) -> None:
        self.config, self.make_ranks = config, make_ranks
        self.ranks: Ranks | None = None
        self.state: Literal["ok", "rebuilding", "broken"] = "ok"
        self.rebuilds = 0
        self.failed_ranks: list[int] = []
        self.last_failure: str | None = None

    def build(self) -> LLM:
        from entropyinfer.shard.llm import LLM

        self.ranks = self.make_ranks() if self.make_ranks is not None else None
        return LLM.from_config(self.config, ranks=self.ranks)

    def rebuild(self, llm: LLM, reason: str) -> LLM:
        """Close `llm`'s failed group and build a new one (raises, state "broken", if that fails)."""
        self.failed_ranks = [r for r, up in enumerate(self.alive(llm), start=1) if not up]
        self.last_failure, self.state, self.rebuilds = reason, "rebuilding", self.rebuilds + 1
        log.warning("tensor-parallel group failed (%s): rebuilding it", reason)
        try:
            llm.close()
        except Exception:
            log.exception("closing the failed tensor-parallel group")
        t0 = time.perf_counter()
        try:
            new = self.build()
        except BaseException:
            self.state = "broken"
            raise
        self.state = "ok"
        log.warning("tensor-parallel group rebuilt in %.1f s", time.perf_counter() - t0)
        return new

    def alive(self, llm: LLM) -> list[bool]:
        """Per rank 1..k-1: whether it still runs (`RayRanks.alive`; other `Ranks` by the executor)."""
        world = llm.config.parallel.world_size
        if isinstance(self.ranks, RayRanks) and self.ranks.runs:
            return self.ranks.alive()
        executor = llm.executor
        up = executor is not None and executor.broken is None and not executor.closed
        return [up and (self.ranks is None or self.ranks.dead() is None)] * (world - 1)

    def health(self, llm: LLM) -> GroupHealth:
        world = llm.config.parallel.world_size
        names = self.ranks.actor_names() if isinstance(self.ranks, RayRanks) else []
        names += [None] * (world - 1 - len(names))
        ok = self.state == "ok"
        ranks = [RankHealth(rank=0, healthy=self.state != "broken", actor=None)] + [
            RankHealth(rank=r, healthy=ok and up, actor=name)
            for r, (up, name) in enumerate(zip(self.alive(llm), names, strict=True), start=1)
        ]
        return {
            "tensor_parallel_size": llm.config.parallel.tensor_parallel_size,
            "sequence_parallel_size": llm.config.parallel.sequence_parallel_size,
            "state": self.state,
            "ranks": ranks,
            "rebuilds": self.rebuilds,
            "failed_ranks": list(self.failed_ranks),
            "last_failure": self.last_failure,
        }
