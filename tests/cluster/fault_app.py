"""The Serve app in a process of its own, for tests/cluster/test_faults*.py: a random-weight Llama (fast to
load again after a fault) on local Ray, a job store at `--db`, HTTP on 127.0.0.1, the policy actor on.

    python tests/cluster/fault_app.py --db jobs.sqlite --model /tmp/ckpt [--port 8123]

Prints `READY <url>` once it serves (without --port, on a port it picks once its Ray runs), then reads
commands on stdin, each answered `DONE <command> <pid>` (or `FAILED <command> <error>`): `kill-shard`
(SIGKILL the shard actor's process), `kill-replica` (SIGKILL the engine replica's), `kill-policy`
(`ray.kill` of the policy actor, found by its name: not restarted, the shard makes a new one),
`deploy-tp` (a second app at /tp: the same model as a tensor-parallel group of 2 ranks, its own job store
`<db>.tp`), `deploy-sp` (the same at /sp as a sequence-parallel group of 2 ranks, prompts of 512 tokens
or more split), `kill-rank` (SIGKILL the process of the deployed group's rank 1; one group at a time),
`delete-tp`, `delete-sp`, `stop` (a clean
shutdown, `EmbeddedServer.stop`, answered once it is done; the process then exits). The whole process is
SIGKILLed by the test itself; started again on the same `--db`, it resumes the jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entropyinfer.cluster.config import ServeAppConfig

FAULT_LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=320,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
API_KEY = "fault-key"
GROUP_APPS = {"tp": (2, 1), "sp": (1, 2)}  # a second app at /<name>: (tensor, sequence) parallel sizes
SP_MIN_TOKENS = 512  # the /sp app splits prompts of at least this many tokens over its 2 ranks


def _actor_pid(class_part: str) -> int:
    """The pid of a live actor of this app, by its process title (Ray sets `ray::<Class>...`)."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and class_part in title:
            return int(p.pid)
    raise RuntimeError(f"no live actor of class {class_part!r}")


def _config(
    db: str, model: Path, tensor_parallel_size: int = 1, sequence_parallel_size: int = 1
) -> ServeAppConfig:
    from entropyinfer.cluster.config import (
        AuthConfig,
        JobsConfig,
        LimitsConfig,
        PolicyActorConfig,
        ReplicaConfig,
        ServeAppConfig,
    )
    from entropyinfer.shard.config import LLMConfig

    llm = {
        "model": str(model),
        "load_format": "dummy",
        "policy": "dense",
        "warm_up_kernels": False,
        "tensor_parallel_size": tensor_parallel_size,
        "sequence_parallel_size": sequence_parallel_size,
        "sequence_parallel_min_tokens": SP_MIN_TOKENS,
    }
    tp = tensor_parallel_size * sequence_parallel_size > 1  # ranks of a quarter CPU each, one thread each
    return ServeAppConfig(
        engine=ReplicaConfig(
            llm=LLMConfig.from_keywords(llm),
            policies=("dense", "entropy"),
            health_check_period_s=1.0,
            cpu_threads=1 if tp else 2,
            cpus_per_shard=0.25 if tp else 1.0,
            accelerator="cpu",
        ),
        jobs=JobsConfig(
            db_path=db,
            poll_s=0.1,
            progress_interval_s=0.05,
            lease_s=4.0,
            max_attempts=6,
            retry_backoff_s=1.0,
            system_prompt=None,
        ),
        limits=LimitsConfig(max_tokens=512),
        auth=AuthConfig(api_key=API_KEY, api_key_env=None),
        # the policy actor: a table per 2 entropy requests, pulled every 0.2 s, looked up again 1 s after
        # a failure (a killed one is made anew then)
        policy=PolicyActorConfig(
            enabled=not tp,
            every_requests=2,
            every_s=0.0,
            warmup_requests=2,
            pull_interval_s=0.2,
            timeout_s=1.0,
            retry_s=1.0,
        ),
    )


def _kill_policy_actor() -> int:
    """`ray.kill` the app's policy actor (no restart); its pid, asked of it just before."""
    import ray

    from entropyinfer.cluster.launcher import APP_NAME
    from entropyinfer.cluster.policy_actor import find_actor

    actor = find_actor(APP_NAME)
    if actor is None:
        raise RuntimeError("no policy actor")
    pid = int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
    ray.kill(actor)
    return pid


def _command(command: str, args: argparse.Namespace) -> int:
    """Run one stdin command; returns the pid it acted on (0: none)."""
    from ray import serve

    from entropyinfer.cluster.app import build_app

    if command in ("kill-shard", "kill-replica", "kill-rank"):
        cls = {"kill-shard": "ShardActor", "kill-replica": ":entropyinfer:Engine", "kill-rank": "RankActor"}
        pid = _actor_pid(cls[command])
        os.kill(pid, signal.SIGKILL)
        return pid
    if command == "kill-policy":
        return _kill_policy_actor()
    kind, _, name = command.partition("-")
    if kind in ("deploy", "delete") and name in GROUP_APPS:
        if kind == "deploy":
            config = _config(f"{args.db}.{name}", Path(args.model), *GROUP_APPS[name])
            serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        else:
            serve.delete(name)
        return 0
    raise ValueError(f"unknown command {command!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, default=0, help="0: a free one, picked once Ray runs")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    from entropyinfer.cluster.launcher import EmbeddedServer
    from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

    model = Path(args.model)
    if not (model / "config.json").exists():
        write_dummy_checkpoint(model, FAULT_LLAMA)
    server = EmbeddedServer(_config(args.db, model), port=args.port or None, num_cpus=4)
    server.start()
    print(f"READY {server.url}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if not command:
            continue
        if command == "stop":
            break
        try:
            print(f"DONE {command} {_command(command, args)}", flush=True)
        except Exception as e:  # the test fails with this; the app serves on
            print(f"FAILED {command} {type(e).__name__}: {e}".replace("\n", " "), flush=True)
    server.stop()
    print(f"DONE stop {os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
