"""The Serve app in a process of its own, for tests/cluster/test_faults.py: a random-weight Llama (fast to
load again after a fault) on local Ray, a job store at `--db`, HTTP on 127.0.0.1:`--port`.

    python tests/cluster/fault_app.py --db jobs.sqlite --port 8123 --model /tmp/ckpt

Prints `READY <url>` once it serves, then reads commands on stdin, each answered `DONE <command> <pid>`:
`kill-shard` (SIGKILL the shard actor's process), `kill-replica` (SIGKILL the engine replica's). The
whole process is SIGKILLed by the test itself; started again on the same `--db`, it resumes the jobs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    from entropyinfer.cluster.config import (
        AuthConfig,
        JobsConfig,
        LimitsConfig,
        ReplicaConfig,
        ServeAppConfig,
    )
    from entropyinfer.cluster.launcher import EmbeddedServer
    from entropyinfer.shard.config import LLMConfig
    from entropyinfer.shard.dummy_checkpoint import write_dummy_checkpoint

    model = Path(args.model)
    if not (model / "config.json").exists():
        write_dummy_checkpoint(model, FAULT_LLAMA)
    llm = {"model": str(model), "load_format": "dummy", "policy": "dense", "warm_up_kernels": False}
    config = ServeAppConfig(
        engine=ReplicaConfig(
            llm=LLMConfig.from_keywords(llm), policies=("dense",), health_check_period_s=1.0, cpu_threads=2
        ),
        jobs=JobsConfig(
            db_path=args.db,
            poll_s=0.1,
            progress_interval_s=0.05,
            lease_s=4.0,
            max_attempts=6,
            retry_backoff_s=1.0,
            system_prompt=None,
        ),
        limits=LimitsConfig(max_tokens=512),
        auth=AuthConfig(api_key=API_KEY, api_key_env=None),
    )
    server = EmbeddedServer(config, port=args.port, num_cpus=4)
    server.start()
    print(f"READY {server.url}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        cls = {"kill-shard": "ShardActor", "kill-replica": ":Engine"}.get(command)
        if cls is None:
            continue
        pid = _actor_pid(cls)
        os.kill(pid, signal.SIGKILL)
        print(f"DONE {command} {pid}", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
