"""Killing a training run midway, for the SIGKILL + resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 120.0) -> None:
    """SIGKILLs ``proc`` once ``run_dir`` holds a checkpoint and at least one metrics line logged
    after it was seen, so the resume has lines to drop; polling, not a fixed sleep, so that neither
    a fast machine (the run ends before the kill) nor a loaded one (nothing logged yet) voids it."""
    checkpoint, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s

    def wait(condition) -> None:
        while not condition():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed midway")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"no progress in {run_dir} within {timeout_s} s")
            time.sleep(0.001)

    wait(checkpoint.exists)
    seen = _lines(metrics)
    wait(lambda: _lines(metrics) > seen)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def signal_midway(proc: subprocess.Popen, run_dir: Path, signum: int, timeout_s: float = 120.0) -> None:
    """Sends ``signum`` to ``proc`` once ``run_dir`` holds two metrics lines (training is under
    way, past its first log), by polling like :func:`kill_after_checkpoint`."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while _lines(metrics) < 2:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be signalled")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no progress in {run_dir} within {timeout_s} s")
        time.sleep(0.001)
    os.kill(proc.pid, signum)
