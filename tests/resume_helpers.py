"""Stopping a training run midway, for the SIGKILL / SIGTERM + resume tests.

Every wait here waits on an event (a file appearing, a line logged, a process's state), polled,
never on a guessed duration; the deadlines only end a test that would otherwise hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait(proc: subprocess.Popen, run_dir: Path, condition: Callable[[], bool], deadline: float) -> None:
    """Polls ``condition`` (not a fixed sleep, so that neither a fast machine, where the run ends
    first, nor a loaded one, where nothing is logged yet, voids the test)."""
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be stopped midway")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no progress in {run_dir} by the deadline")
        time.sleep(0.001)


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen | None = None,
             timeout_s: float = 300.0) -> None:
    """Polls ``condition`` until it holds; fails if ``proc`` ends first, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"no {what} in {timeout_s} s")
        time.sleep(0.001)


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 300.0) -> None:
    """SIGKILLs ``proc`` once ``run_dir`` holds a checkpoint and at least one metrics line logged
    after it was seen, so the resume has lines to drop."""
    checkpoint, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    _wait(proc, run_dir, checkpoint.exists, deadline)
    seen = _lines(metrics)
    _wait(proc, run_dir, lambda: _lines(metrics) > seen, deadline)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def signal_midway(
    proc: subprocess.Popen, run_dir: Path | list[Path], signum: int, timeout_s: float = 300.0
) -> None:
    """Sends ``signum`` to ``proc`` once ``run_dir`` (each of them, if several) holds two metrics
    lines (training is under way, past its first log)."""
    dirs = run_dir if isinstance(run_dir, list) else [run_dir]
    deadline = time.monotonic() + timeout_s
    for d in dirs:
        _wait(proc, d, lambda d=d: _lines(d / "metrics.jsonl") >= 2, deadline)
    os.kill(proc.pid, signum)


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line holds ``text`` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return found
