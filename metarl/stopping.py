"""Stopping a training run on SIGINT / SIGTERM at the end of the current iteration.

``Experiment.run`` checks :func:`stop_signals` after every iteration: on the first Ctrl-C (or a
``kill``), it finishes the iteration it is in, saves a checkpoint there and raises
:class:`TrainingStopped`, so ``metarl run --resume`` continues exactly where it stopped, with no
iteration lost or repeated. A second signal interrupts at once; the last checkpoint stays intact.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path


class TrainingStopped(KeyboardInterrupt):
    """Training was stopped by a signal after a whole iteration, saved as a checkpoint."""

    def __init__(self, signal_name: str, iteration: int, run_dir: str | Path):
        self.signal_name, self.iteration, self.run_dir = signal_name, iteration, Path(run_dir)
        self.exit_code = 128 + int(signal.Signals[signal_name])
        super().__init__(
            f"stopped by {signal_name} after iteration {iteration}; its checkpoint is saved in "
            f"{run_dir}; continue with `metarl run --resume {run_dir}`"
        )


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """Catches SIGINT and SIGTERM while the block runs, recording their names in the yielded list.

    Outside the main thread (where Python cannot install handlers) the list stays empty and the
    signals keep their usual effect. The previous handlers are restored on exit.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if received:  # a second signal: stop now, without waiting for the iteration to end
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
