"""One local Ray + Serve + entropyinfer app (real SmolLM2 on CPU) for the whole serving test session.

Started in-process with `ray.init()` through the embedded launcher and shut down with `ray.shutdown()`
at the end (never the Ray CLI's stop command, which would kill every Ray instance on the machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

API_KEY = "test-key-123"
OTHER_KEY = "test-key-other-456"  # a second tenant: it must not see or cancel API_KEY's jobs


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("ray")
    from entropyinfer.cluster.config import (
        AuthConfig,
        JobsConfig,
        LimitsConfig,
        PolicyActorConfig,
        ReplicaConfig,
        ServeAppConfig,
    )
    from entropyinfer.cluster.launcher import EmbeddedServer, free_port
    from entropyinfer.shard.config import LLMConfig

    db: Path = tmp_path_factory.mktemp("jobs") / "jobs.sqlite"
    config = ServeAppConfig(
        engine=ReplicaConfig(
            llm=LLMConfig.from_keywords({"model": "smollm2-135m", "policy": "dense"}),
            policies=("dense", "entropy", "fixed"),
        ),
        jobs=JobsConfig(db_path=str(db), poll_s=0.2, progress_interval_s=0.1, lease_s=30.0),
        limits=LimitsConfig(
            max_body_bytes=1 << 20,
            max_batch_documents=4,
            max_questions=2,
            max_tokens=64,
            max_document_tokens=4000,
            max_waiting_requests=24,  # 16 running + 24 waiting: the load test's 32 clients queue, 80 do not
        ),
        auth=AuthConfig(api_key=API_KEY, api_keys=(OTHER_KEY,), api_key_env=None),
        # the policy actor (tests/cluster/test_policy_actor.py): a table per 2 entropy requests
        policy=PolicyActorConfig(
            enabled=True,
            rebalance_heads=True,
            every_requests=2,
            every_s=0.0,
            warmup_requests=2,
            pull_interval_s=0.2,
            retry_s=2.0,
        ),
    )
    srv = EmbeddedServer(config, port=None, metrics_port=free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def app_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The app in a process of its own with a random-weight Llama (tests/cluster/app_process.py): for
    the fault tests (which kill parts of it, or all of it) and the load test (a model fast enough for
    200 completions on 2 cores)."""
    from .app_process import App

    root = tmp_path_factory.mktemp("app_process")
    app = App(root / "jobs.sqlite", root / "model", root / "fault_app.log")
    try:
        yield app
    finally:
        app.kill()
