"""Opening a trained run's checkpoint for a probe, leaving the run directory untouched, and the
command shared by the probes that read several runs."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metarl.experiment import Experiment, resume_point
from metarl.logger import load_checkpoint


@contextmanager
def checkpoint_experiment(run_dir: Path, document: dict[str, Any]) -> Iterator[Experiment]:
    """The run's experiment built from ``document`` (its config, possibly changed) in a scratch
    directory, with the checkpoint a resume would load loaded (``checkpoint.pt``, else
    ``checkpoint.portable.pt``: all a committed PEARL run keeps, its networks without the replay,
    which a probe does not read); closed on leaving."""
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


def probe_runs(
    command: str,
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: list[str] | None,
    probe: Callable[[Path], dict[str, Any]],
    lines: Callable[[dict[str, Any]], list[str]],
    markdown: Callable[[dict[str, Any]], str],
) -> int:
    """The probe ``command`` (``"python -m experiments.NAME"``) over ``args.run_dirs``: refuses a
    directory without a checkpoint (exit 2) before any work, prints each run's ``lines`` as it is probed, writes ``args.out``.json/.md
    when given (the table by ``markdown``) and prints one JSON object last."""
    for run_dir in args.run_dirs:
        if resume_point(run_dir) is None:
            parser.error(f"{run_dir} has no checkpoint; give run directories (e.g. SWEEP/base-s0)")
    results = []
    for run_dir in args.run_dirs:
        results.append(probe(run_dir))
        print("\n".join(lines(results[-1])), flush=True)
    if args.out:
        from experiments.bench import save_results

        save_results(args.out, command, argv, {"runs": results}, markdown)
    print(json.dumps(results[-1] if len(results) == 1 else {"runs": results}))
    return 0
