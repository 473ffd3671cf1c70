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

FAULT_APP = Path(__file__).with_name("fault_app.py")
AUTH = {"Authorization": "Bearer fault-key"}
LOG_TAIL_LINES = 40


class App:
    """fault_app.py in its own session; `kill()` SIGKILLs it and every process it started, by pid."""

    def __init__(self, db: Path, model: Path, log: Path, *args: str) -> None:
        self.db, self.model, self.log, self.args = db, model, log, args
        self.start()

    def start(self) -> None:
        """Start fault_app.py (again) on the same job store and model folder; returns once it serves.
        The app picks its own HTTP port once its Ray runs (a port picked here could be taken by then by
        one of the Ray processes of this test session or of the app) and says it in `READY <url>`."""
        db, model, log = self.db, self.model, self.log
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(FAULT_APP), "--db", str(db), "--model", str(model), *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("a"),
            text=True,
            start_new_session=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.expect("READY", 180.0).split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str | tuple[str, ...], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"fault_app exited with {self.proc.returncode} waiting for {prefix!r}; "
                        + self.log_tail()
                    ) from None
                continue
            if line.startswith(prefix):
                return line
        raise TimeoutError(f"fault_app: no {prefix!r} within {timeout_s:g}s; " + self.log_tail())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the app's stderr (its log file), for an error that says why."""
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as e:
            return f"its log {self.log} unreadable ({e})"
        return f"the last {len(tail)} lines of {self.log}:\n" + "\n".join(tail)

    def command(self, command: str, timeout_s: float = 30.0) -> int:
        """Send a command (fault_app.py's docstring lists them); returns the pid it acted on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.expect((f"DONE {command} ", f"FAILED {command} "), timeout_s)
        if line.startswith("FAILED"):
            raise RuntimeError(f"fault_app: {line}")
        return int(line.split()[-1])

    def stop(self, timeout_s: float = 60.0) -> None:
        """A clean shutdown (fault_app's `stop`): returns once the app process has exited."""
        self.command("stop", timeout_s)
        self.proc.wait(timeout_s)

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
