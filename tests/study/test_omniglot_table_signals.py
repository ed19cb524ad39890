"""The Omniglot table stopped by a signal: its cell is checkpointed, no worker outlives it, and it resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from resume_helpers import processes_mentioning, signal_midway

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_omniglot_table_stopped_by_sigterm_checkpoints_its_cell_leaves_no_worker_and_resumes(tmp_path):
    """A kill of the table command reaches its worker process: the cell stops after a whole
    iteration with a checkpoint there, no worker keeps training, and the same command resumes."""
    import re
    import signal

    from metarl.logger import load_checkpoint

    root = tmp_path / "runs"
    command = [sys.executable, "-m", "experiments.tables.omniglot", "--methods", "protonet", "--settings", "5w1s",
               "--seeds", "1", "--iterations", "60", "--workers", "1", "--root", str(root),
               "--cells", str(tmp_path / "cells"), "--out", str(tmp_path / "omniglot")]
    for item in ("tasks.channels=4", "tasks.num_test_tasks=2", "run.log_every=1", "run.checkpoint_every=10"):
        command += ["--set", item]
    run_dir = root / "protonet-5w1s-s0"
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal_midway(proc, run_dir, signal.SIGTERM)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, stderr
    said = re.search(r"checkpoints saved for protonet 5w1s seed=0 at iteration (\d+)", stderr)
    assert said and "Traceback" not in stderr and "run the same command again" in stderr
    iteration = int(said.group(1))
    assert 0 < iteration < 60, "the cell must be stopped midway for this test to mean anything"
    assert load_checkpoint(run_dir / "checkpoint.pt")["iteration"] == iteration
    assert not processes_mentioning(str(root)), "a worker outlived the command"
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 61))
