"""The rendezvous of a rank group (`shard/parallel/launch.py`): rank 0's store is bound before any other
rank starts, on a port the OS picks, so no process can take the port between choosing and binding it (a
test run once failed with EADDRINUSE when the port was chosen first and bound later)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from entropyinfer.shard.parallel.launch import master_store


def test_master_store_listens_before_anyone_joins_and_holds_its_port() -> None:
    store = master_store("127.0.0.1", 2)
    assert store.port > 0
    with socket.socket() as s, pytest.raises(OSError):  # taken: another process cannot bind it now
        s.bind(("127.0.0.1", store.port))
    peer = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timedelta(seconds=10))
    peer.set("joined/1", "1")
    assert store.get("joined/1") == b"1"
    other = master_store("127.0.0.1", 2)
    assert other.port != store.port
