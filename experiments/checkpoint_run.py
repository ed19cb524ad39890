"""Opening a trained run's checkpoint for a probe, leaving the run directory untouched."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metarl.experiment import Experiment, resume_point
from metarl.logger import load_checkpoint


@contextmanager
def checkpoint_experiment(run_dir: Path, document: dict[str, Any]) -> Iterator[Experiment]:
    """The run's experiment built from ``document`` (its config, possibly changed) in a scratch
    directory, with the checkpoint a resume would load (``checkpoint.pt``, else ``checkpoint.portable.pt``: all a
    committed PEARL run keeps, the networks without the replay, which a probe does not read) loaded;
    closed on leaving."""
    path = resume_point(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt or checkpoint.portable.pt")
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(document, Path(scratch))
        try:
            experiment.load_state(load_checkpoint(path), path)
            yield experiment
        finally:
            experiment.close()
