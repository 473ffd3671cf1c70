"""The rendezvous of a rank group (`shard/parallel/launch.py`): rank 0's store is bound before any other
rank starts, on a port the OS picks, so no process can take the port between choosing and binding it (a
test run once failed with EADDRINUSE when the port was chosen first and bound later)."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from entropyinfer import LLM, SamplingParams
from entropyinfer.shard.config import LLMConfig
from entropyinfer.shard.parallel.launch import LocalRanks, RankSpec, master_store


def test_master_store_listens_before_anyone_joins_and_holds_its_port() -> None:
    store = master_store("127.0.0.1", 2)
    assert store.port > 0
    with socket.create_connection(("127.0.0.1", store.port), timeout=5):  # listening before anyone joins
        pass
    with socket.socket() as s, pytest.raises(OSError):  # taken: another process cannot bind it now
        s.bind(("127.0.0.1", store.port))
    peer = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timedelta(seconds=10))
    peer.set("joined/1", "1")
    assert store.get("joined/1") == b"1"


class _FailsAfterStarting(LocalRanks):
    """Starts every rank process, then fails (as a Ray placement that runs out of bundles part-way)."""

    def start(self, spec: RankSpec) -> None:
        super().start(spec)
        raise RuntimeError("no bundle for the last rank")


def test_a_group_whose_ranks_fail_to_start_stops_the_ones_that_did(tiny_checkpoint: Path) -> None:
    config = LLMConfig.from_keywords(
        {"model": str(tiny_checkpoint), "load_format": "dummy", "device": "cpu", "warm_up_kernels": False,
         "tensor_parallel_size": 2}
    )  # fmt: skip
    ranks = _FailsAfterStarting()
    with pytest.raises(RuntimeError, match="no bundle"):
        LLM.from_config(config, ranks=ranks)
    assert ranks.processes and not any(p.is_alive() for p in ranks.processes)
    assert not dist.is_initialized()
    with LLM.from_config(config) as llm:  # the next group starts in the same process
        assert llm.generate("ab", SamplingParams(max_tokens=2))[0].token_ids
