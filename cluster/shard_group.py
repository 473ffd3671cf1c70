"""The other ranks of a tensor-parallel engine as Ray actors, one per rank, in the replica's placement
group (the second step of issue 11's shard group; `shard/parallel/launch.py: LocalRanks` is the first).

    ranks = RayRanks(placement_group=pg, cpus_per_rank=0.5)          # bundles 1..k-1 of pg
    llm = LLM.from_config(config, ranks=ranks)                        # rank 0 here, in the shard actor

Each actor (`RankActor`) runs `launch.worker_main` in one long actor call: it joins rank 0's
torch.distributed group (rank 0's node address, a free port chosen there), builds its slice of the model
and runs plans until rank 0 shuts the group down, so no Ray call happens per step. A rank whose call
ends (an error, a killed actor or node) shows up in `dead()`, which rank 0 checks before every plan. On
CPU the actors take fractional CPUs and set their torch threads (`RankSpec.threads`); on GPU each takes
one GPU of its bundle and sees it as ``cuda:0``.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from entropyinfer.shard.parallel.launch import RankSpec, worker_main


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
    ) -> None:
        self.placement_group, self.cpus, self.gpu, self.first_bundle = (
            placement_group, cpus_per_rank, gpu, first_bundle,
        )  # fmt: skip
        self.host = ray.util.get_node_ip_address()
        self.gpus_per_process = 1 if gpu else 0
        self.actors: list[Any] = []
        self.runs: list[Any] = []

    def start(self, spec: RankSpec) -> None:
        remote: Any = ray.remote(RankActor)  # Ray's actor classes and handles are untyped
        for rank in range(1, spec.world):
            strategy = (
                PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group,
                    placement_group_bundle_index=self.first_bundle + rank - 1,
                )
                if self.placement_group is not None
                else None
            )
            actor = remote.options(
                num_cpus=self.cpus, num_gpus=1 if self.gpu else 0, scheduling_strategy=strategy,
                max_concurrency=2, name=None,
            ).remote()  # fmt: skip
            self.actors.append(actor)
            self.runs.append(actor.run.remote(spec, rank))

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
        self.actors, self.runs = [], []
