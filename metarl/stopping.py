"""Stopping a training run on SIGINT / SIGTERM at the end of the current iteration.

``Experiment.run`` checks :func:`stop_signals` after every iteration: on the first Ctrl-C (or a
``kill``), it finishes the iteration it is in, saves a checkpoint there and raises
:class:`TrainingStopped`, so ``metarl run --resume`` continues exactly where it stopped, with no
iteration lost or repeated. A second signal interrupts at once; the last checkpoint stays intact.

:class:`StoppablePool` brings the same to commands that train several runs in worker processes
(``metarl sweep``, ``omniglot_table``, ``sinusoid_table``): a signal to the parent reaches each
worker once, each stops its run the same way, runs not yet started are not started, and no worker
outlives the parent. A second signal stops the workers and the command at once (exit status
128 + signal number, no traceback); every checkpoint already saved stays intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.queues
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The parent passes its first stop signal on to the workers as a request of its own (SIGUSR1 for a
# SIGTERM, SIGUSR2 for a SIGINT), which a worker that got the signal directly as well (``pkill -f``
# matches forked workers too) does not count twice: two counted signals would stop its run at
# once, losing the iterations since its last checkpoint. The parent's second signal reaches them
# as AT_ONCE. A worker counts the stop signals sent to it directly apart: a second one stops it
# at once too.
FORWARDED = {signal.SIGINT: signal.SIGUSR2, signal.SIGTERM: signal.SIGUSR1}
AT_ONCE = signal.SIGHUP
PR_SET_PDEATHSIG = 1  # Linux prctl option: signal this process when its parent dies

# In a pool worker: the stop signal received outside a training run, or the one that stopped a
# run. The worker then refuses the jobs still queued for it, and a run it has begun stops after
# its first iteration.
_worker_stopping: list[str] = []
_in_worker: list[bool] = []  # holds True in a pool worker (set by its initializer)


class TrainingStopped(KeyboardInterrupt):
    """Training was stopped by a signal after a whole iteration, saved as a checkpoint."""

    def __init__(self, signal_name: str, iteration: int, run_dir: str | Path):
        self.signal_name, self.iteration, self.run_dir = signal_name, iteration, Path(run_dir)
        self.exit_code = 128 + int(signal.Signals[signal_name])
        super().__init__(
            f"stopped by {signal_name} after iteration {iteration}; its checkpoint is saved in "
            f"{run_dir}; continue with `metarl run --resume {run_dir}`"
        )

    def __reduce__(self) -> tuple:  # crosses from a pool worker to its parent
        return type(self), (self.signal_name, self.iteration, str(self.run_dir))

    def where(self) -> str:
        """Where the run stopped, for a pool's report."""
        return f"at iteration {self.iteration}"


class ScoringStopped(TrainingStopped):
    """Held-out scoring of a trained run was stopped by a signal; the episodes scored so far are
    saved in the run directory, and scoring it again scores only the rest."""

    def __init__(self, signal_name: str, iteration: int, run_dir: str | Path, scored: int, total: int):
        self.signal_name, self.iteration, self.run_dir = signal_name, iteration, Path(run_dir)
        self.scored, self.total = scored, total
        self.exit_code = 128 + int(signal.Signals[signal_name])
        KeyboardInterrupt.__init__(
            self,
            f"stopped by {signal_name} while scoring the model of iteration {iteration}: {scored} "
            f"of {total} held-out episodes are scored and saved in {run_dir}; run the same command "
            "again to score the rest",
        )

    def __reduce__(self) -> tuple:
        return type(self), (
            self.signal_name, self.iteration, str(self.run_dir), self.scored, self.total
        )

    def where(self) -> str:
        return f"while scoring ({self.scored} of {self.total} held-out episodes saved)"


class NotStarted(KeyboardInterrupt):
    """A pool job refused because its worker had been told to stop before the job began."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(f"not started: stop requested by {signal_name}")

    def __reduce__(self) -> tuple:  # crosses from a pool worker to its parent
        return type(self), (self.signal_name,)


class PoolStopped(KeyboardInterrupt):
    """Several runs in a pool were stopped by a signal; each saved a checkpoint or never began."""

    def __init__(self, signal_name: str, finished: int, stopped: list[str], not_started: int = 0):
        self.signal_name, self.exit_code = signal_name, 128 + int(signal.Signals[signal_name])
        super().__init__(
            f"stopped by {signal_name}: {finished} runs finished; "
            + (f"checkpoints saved for {', '.join(stopped)}; " if stopped else "")
            + (f"{not_started} runs not started; " if not_started else "")
            + "run the same command again to resume"
        )


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """Catches SIGINT and SIGTERM while the block runs, recording their names in the yielded list.

    Outside the main thread (where Python cannot install handlers) the list stays empty and the
    signals keep their usual effect. The previous handlers are restored on exit. In a pool worker
    already told to stop, the list starts with that signal; and a signal the block caught (whether
    or not it acted on it) stays with the worker, which then starts none of its queued jobs.
    """
    received: list[str] = list(_worker_stopping)  # a pool worker told to stop before the run began
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    direct: list[str] = []  # SIGINT and SIGTERM count together: a Ctrl-C, then a kill, stops at once
    previous = {s: signal.signal(s, _recorder(received, direct)) for s in STOP_SIGNALS}
    if _in_worker:
        previous.update({s: signal.signal(s, _request_recorder(received)) for s in FORWARDED.values()})
        previous[AT_ONCE] = signal.signal(AT_ONCE, _at_once)
        if _worker_stopping and not received:  # came between the copy above and the handlers
            received.append(_worker_stopping[0])
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if received and _in_worker and not _worker_stopping:
            _worker_stopping.append(received[0])


def _recorder(received: list[str], direct: list[str]) -> Callable[[int, object], None]:
    """A signal handler that records the first stop signal's name in ``received`` (unless a stop
    is recorded there already), and at the second signal sent to this process (``direct`` holds
    those) interrupts at once, without waiting for the iteration to end."""

    def handler(signum: int, frame: object) -> None:
        if direct:
            raise KeyboardInterrupt
        direct.append(signal.Signals(signum).name)
        if not received:
            received.append(direct[0])

    return handler


def _at_once(signum: int, frame: object) -> None:
    """A worker's handler of :data:`AT_ONCE`: the parent got a second stop signal."""
    raise KeyboardInterrupt


def _request_recorder(received: list[str]) -> Callable[[int, object], None]:
    """A worker's handler of the parent's stop request (:data:`FORWARDED`): records the parent's
    signal unless a stop signal is recorded already."""
    names = {forwarded: original.name for original, forwarded in FORWARDED.items()}

    def handler(signum: int, frame: object) -> None:
        if not received:
            received.append(names[signal.Signals(signum)])

    return handler


def _init_worker(pids: multiprocessing.queues.SimpleQueue[int]) -> None:
    """Runs first in each pool worker. Its own process group keeps a Ctrl-C in the terminal from
    reaching it directly (the parent forwards it, once); a signal between runs marks the worker as
    stopping (a second one interrupts it); and on Linux it receives SIGTERM if the parent dies.
    Last, once its handlers are in place, it puts its pid in ``pids``, the parent's list of the
    workers to forward a signal to."""
    os.setpgrp()
    _in_worker.append(True)
    direct: list[str] = []
    for s in STOP_SIGNALS:
        signal.signal(s, _recorder(_worker_stopping, direct))
    for s in FORWARDED.values():
        signal.signal(s, _request_recorder(_worker_stopping))
    signal.signal(AT_ONCE, _at_once)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    pids.put(os.getpid())


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """A pool job: ``fn(*args)`` unless the worker was told to stop; a stopped run stops the worker."""
    if _worker_stopping:
        raise NotStarted(_worker_stopping[0])
    try:
        return fn(*args)
    except TrainingStopped as stopped:
        _worker_stopping.append(stopped.signal_name)
        raise


class StoppablePool:
    """A process pool whose jobs stop cleanly on SIGINT / SIGTERM to the parent (see module doc).

    ``received`` lists the stop signals the parent got. Read results with :meth:`result` (None for
    a job a signal stopped) and, after the jobs, :meth:`stop_report` for the message and exit code.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.received: list[str] = []
        # "LABEL at iteration N" of each run stopped with a checkpoint ("LABEL while scoring (...)"
        # for one stopped between two saves of its held-out scores)
        self.stopped: list[str] = []
        self._stopped_by: list[str] = []  # the signal that stopped each of those, or kept one from starting
        self._not_started = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(_call, fn, *args)

    def result(self, future: Future, label: str) -> Any:
        """``future.result()``, or None for a job a stop signal ended or kept from starting (one
        stopped with a checkpoint is recorded in ``stopped`` under ``label``). Other errors pass."""
        try:
            return future.result()
        except TrainingStopped as stopped:
            self.stopped.append(f"{label} {stopped.where()}")
            self._stopped_by.append(stopped.signal_name)
        except NotStarted as refused:
            self._not_started += 1
            self._stopped_by.append(refused.signal_name)
        except CancelledError:
            pass
        except KeyboardInterrupt:  # a worker stopped at once (a second signal sent to it)
            self.stopped.append(f"{label} at once (its last checkpoint kept)")
            self._stopped_by.append("SIGTERM")
        return None

    def stop_report(self, finished: int) -> PoolStopped | None:
        """After the jobs: what a stop signal left (None if none came), to print or raise. A
        signal sent to a worker alone (not through this process) stopped its run all the same:
        that is reported too, so that no stopped run passes for a finished command."""
        if not self.received and not self._stopped_by:
            return None
        return PoolStopped((self.received or self._stopped_by)[0], finished, self.stopped, self._not_started)

    def _forward(self, signum: int, frame: object) -> None:
        self.received.append(signal.Signals(signum).name)
        if len(self.received) == 1:
            print(
                f"{self.received[0]}: each worker stops after its current iteration and saves a "
                "checkpoint (a run being scored stops at its next save of scores, or finishes "
                "scoring); send it again to stop at once",
                file=sys.stderr,
                flush=True,
            )
        passed_on = FORWARDED[signal.Signals(signum)] if len(self.received) == 1 else AT_ONCE
        for pid in self._live_workers():
            with contextlib.suppress(ProcessLookupError):  # one that exited since
                os.kill(pid, passed_on)
        if len(self.received) == 2:  # the second signal: the workers stop at once, and so do we
            print(
                f"{self.received[1]} again: stopped at once; each run keeps its last saved checkpoint "
                "(a run under way loses the iterations since then); run the same command again to "
                "resume",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(128 + signum)  # an exit status, without a traceback

    def _live_workers(self) -> list[int]:
        """The pids of this pool's workers alive now: those that registered themselves (a worker
        started to replace another registers too) and are still running children of this
        process. A child not yet reaped keeps its pid, so no other process is signalled."""
        while not self._pid_queue.empty():
            self._worker_pids.add(self._pid_queue.get())
        self._worker_pids &= {child.pid for child in multiprocessing.active_children()}
        return sorted(self._worker_pids)

    def __enter__(self) -> StoppablePool:
        # A process forked after the parent touched CUDA cannot use it, and asking whether there is
        # a GPU (torch.cuda.is_available, as a run's device check does) already counts: on a
        # machine with a GPU the workers start fresh.
        import torch

        context = multiprocessing.get_context("spawn" if torch.cuda.is_available() else None)
        self._pid_queue: multiprocessing.queues.SimpleQueue[int] = context.SimpleQueue()
        self._worker_pids: set[int] = set()
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_worker, initargs=(self._pid_queue,)
        )
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._forward) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=bool(self.received))
        finally:
            for s, h in (self._previous or {}).items():
                signal.signal(s, h)
            self._pid_queue.close()
