"""The Serve app in a process of its own (tests/cluster/fault_app.py, a random-weight Llama), driven from
a test: started, told to kill its shard or replica, SIGKILLed with every process under it, started again.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from entropyinfer.cluster.launcher import free_port

FAULT_APP = Path(__file__).with_name("fault_app.py")
AUTH = {"Authorization": "Bearer fault-key"}


class App:
    """fault_app.py in its own session; `kill()` SIGKILLs it and every process it started, by pid."""

    def __init__(self, db: Path, model: Path, log: Path) -> None:
        self.db, self.model, self.log = db, model, log
        self.start()

    def start(self) -> None:
        """Start fault_app.py (again) on the same job store and model folder; returns once it serves."""
        db, model, log = self.db, self.model, self.log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(FAULT_APP),
                "--db",
                str(db),
                "--port",
                str(self.port),
                "--model",
                str(model),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("a"),
            text=True,
            start_new_session=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("READY", 180.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fault_app exited with {self.proc.returncode}")
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
        raise TimeoutError(f"fault_app: no {prefix!r} within {timeout_s:g}s")

    def command(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self.expect(f"DONE {command}", 30.0)

    def kill(self) -> None:
        """SIGKILL the app process and every process under it (Ray's own included), by their ids."""
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        psutil.wait_procs(procs, timeout=30)
