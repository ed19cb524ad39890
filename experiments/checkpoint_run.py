"""Opening a trained run's checkpoint for a probe, leaving the run directory untouched."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metarl.experiment import Experiment
from metarl.logger import load_checkpoint


@contextmanager
def checkpoint_experiment(run_dir: Path, document: dict[str, Any]) -> Iterator[Experiment]:
    """The run's experiment built from ``document`` (its config, possibly changed) in a scratch
    directory, with ``run_dir/checkpoint.pt`` loaded; closed on leaving."""
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(document, Path(scratch))
        try:
            experiment.load_state(load_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
            yield experiment
        finally:
            experiment.close()
