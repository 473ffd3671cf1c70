"""The fault app's driver (tests/cluster/app_process.py) explains a failed start: the RuntimeError carries
the end of fault_app.py's log (CI shows the exception, not the log file in pytest's temporary folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .app_process import App


def test_a_fault_app_that_exits_at_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as e:
        App(tmp_path / "jobs.sqlite", tmp_path / "model", tmp_path / "fault_app.log", "--no-such-flag")
    message = str(e.value)
    assert "fault_app exited with 2 waiting for 'READY'" in message
    assert "unrecognized arguments: --no-such-flag" in message  # argparse's line, from the log
