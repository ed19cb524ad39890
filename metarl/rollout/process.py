"""The multiprocessing backend: persistent worker processes, each owning several environments.

Each worker process holds a :class:`~metarl.rollout.worker.RolloutWorker` for the whole life of the
sampler. Per call, a worker receives its contiguous share of the episodes and the parameter sets
that share uses in one message, steps its environments in lockstep with one batched policy
forward per step, and answers with one message holding all its arrays. The policy object is sent
only when it changes.

Failures are detected by waiting on the result pipes and the process sentinels together under a
deadline, so a dead or hung worker is noticed within ``timeout_s`` and never blocks the caller. The
deadline measures silence, not the share's length: a worker that finishes an episode says so (at
most every ``_BEAT_S`` seconds), which moves its deadline on, so a long share (a held-out
evaluation of hundreds of tasks) runs as long as its episodes keep ending.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
import torch

from envs.base import TaskDistribution
from metarl.rollout.sampler import WorkerError, params_from_numpy, share_params, split_shares
from metarl.rollout.worker import Batch, EpisodeSpec, RolloutWorker, describe_exception

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 5.0
_BEAT_S = 0.25  # the most often a worker reports a finished episode during its share


def _worker_main(conn: Connection, distribution: TaskDistribution, max_envs: int | None) -> None:
    """Body of a worker process: answer requests until told to close or the sampler goes away."""
    # Ctrl-C reaches the whole process group; the sampler, not its workers, decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    worker = RolloutWorker(distribution, max_envs=max_envs)
    policy: Any = None
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message[0] == "close":
                return
            if message[0] == "policy":
                policy = message[1]
                continue
            _, request, arrays, episodes, horizon = message
            try:
                with torch.no_grad():
                    batch = worker.run(
                        policy, params_from_numpy(arrays), episodes, horizon, _beat(conn, request)
                    )
            except Exception as exc:
                # Forwarded to the sampler, which raises it as a WorkerError.
                conn.send(("error", request, describe_exception(exc)))
                continue
            conn.send(("ok", request, batch))
    finally:
        worker.close()


def _beat(conn: Connection, request: int) -> Callable[[], None]:
    """Called by the worker as episodes end: tells the sampler, at most every ``_BEAT_S`` s, that
    request ``request`` is making progress."""
    last = time.monotonic()

    def beat() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _BEAT_S:
            conn.send(("alive", request, None))
            last = now

    return beat


def _exit_cause(process: mp.process.BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"worker process {process.pid} was killed by {signal.Signals(-code).name}"
    return f"worker process {process.pid} exited with code {code}"


class _Handle:
    """One worker process and the parent's end of its pipe."""

    def __init__(
        self, ctx: Any, index: int, distribution: TaskDistribution, max_envs: int | None
    ) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_conn, distribution, max_envs),
            name=f"metarl-rollout-{index}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.policy: Any = None

    def submit(self, policy: Any, message: tuple) -> None:
        if self.policy is not policy:
            self.conn.send(("policy", policy))
            self.policy = policy
        self.conn.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(_JOIN_TIMEOUT_S)
        self.conn.close()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("close",))
            except OSError:
                pass  # already gone; the kill below covers it
            self.process.join(_JOIN_TIMEOUT_S)
        self.kill()


def _stop_all(handles: list[_Handle | None]) -> None:
    for i, handle in enumerate(handles):
        if handle is not None:
            handle.stop()
            handles[i] = None


class ProcessBackend:
    """Persistent worker processes over ``multiprocessing``.

    Args:
        distribution: the task family (must be picklable).
        num_workers: number of worker processes.
        envs_per_worker: environments per worker; ``None`` holds one per episode of its share.
        timeout_s: the longest a worker may go without finishing an episode (its environment
            building on the first call included) before it is killed and reported; a share may
            take longer in all.
        on_failure: ``"raise"`` a :class:`WorkerError`, or ``"restart"`` the worker and re-collect
            its share (at most ``max_restarts`` times per call).
        start_method: ``"forkserver"`` or ``"spawn"``.
        max_restarts: restarts allowed per worker per call under ``on_failure="restart"``.
    """

    name = "process"

    def __init__(
        self,
        distribution: TaskDistribution,
        num_workers: int,
        envs_per_worker: int | None,
        timeout_s: float,
        on_failure: str,
        start_method: str = "forkserver",
        max_restarts: int = 2,
    ) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method={start_method!r}; use 'forkserver' or 'spawn' (fork is unsafe with torch threads)"
            )
        self.distribution = distribution
        self.num_workers = num_workers
        self.envs_per_worker = envs_per_worker
        self.timeout_s = float(timeout_s)
        self.on_failure = on_failure
        self.max_restarts = max_restarts
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(
                ["metarl.rollout.process", type(distribution).__module__]
            )
        self._request = 0
        self._request_of: dict[int, int] = {}
        self._handles: list[_Handle | None] = [None] * num_workers
        self._finalizer = weakref.finalize(self, _stop_all, self._handles)
        for w in range(num_workers):
            self._handles[w] = self._spawn(w)

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the live workers (``None`` where a worker is being rebuilt)."""
        return [h.process.pid if h is not None else None for h in self._handles]

    def _spawn(self, w: int) -> _Handle:
        return _Handle(self._ctx, w, self.distribution, self.envs_per_worker)

    def _submit(
        self,
        w: int,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        share: list[EpisodeSpec],
        horizon: int,
    ) -> None:
        handle = self._handles[w]
        if handle is None:
            handle = self._handles[w] = self._spawn(w)
        arrays, local = share_params(param_sets, share)
        self._request += 1
        handle.submit(policy, ("run", self._request, arrays, local, horizon))

    def _fail(self, w: int, share: list[EpisodeSpec], cause: str, attempts: dict[int, int]) -> bool:
        """Kills worker ``w``; returns True to retry its share, else raises :class:`WorkerError`."""
        handle = self._handles[w]
        if handle is not None:
            handle.kill()
        self._handles[w] = None
        tasks = sorted({e.task_index for e in share})
        if self.on_failure != "restart" or attempts[w] >= self.max_restarts:
            if self.on_failure == "restart":
                cause = f"{cause} (after {attempts[w]} restarts)"
            raise WorkerError(w, tasks, cause)
        attempts[w] += 1
        logger.warning("rollout worker %d failed on tasks %s (%s); restarting it", w, tasks, cause)
        return True

    def _receive(self, w: int) -> tuple[str, Any]:
        """Reads worker ``w``'s reply, or reports why there is none."""
        handle = self._handles[w]
        assert handle is not None
        alive = False
        while handle.conn.poll():
            try:
                kind, request, payload = handle.conn.recv()
            except (EOFError, OSError):
                handle.process.join(_JOIN_TIMEOUT_S)
                return "dead", _exit_cause(handle.process)
            if request != self._request_of[w]:
                raise RuntimeError(
                    f"worker {w} answered request {request}, expected {self._request_of[w]}"
                )
            if kind == "alive":
                alive = True
                continue
            if kind == "ok":
                return "ok", payload
            return "dead", f"its environment raised:\n{payload}"
        if alive:
            return "alive", None
        if not handle.process.is_alive():
            return "dead", _exit_cause(handle.process)
        return "busy", None

    def collect(
        self,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        episodes: list[EpisodeSpec],
        horizon: int,
    ) -> Batch:
        """Splits ``episodes`` over the workers and gathers their rows in order."""
        shares = [[episodes[i] for i in r] for r in split_shares(len(episodes), self.num_workers)]
        attempts = dict.fromkeys(range(len(shares)), 0)
        deadlines: dict[int, float] = {}
        results: dict[int, Batch] = {}
        try:
            pending = list(range(len(shares)))
            while pending or deadlines:
                for w in pending:
                    self._send(w, policy, param_sets, shares[w], horizon, attempts, deadlines)
                pending = self._wait_round(shares, attempts, deadlines, results)
        except BaseException:
            for w in deadlines:
                self._fail_quietly(w)
            raise
        return {k: np.concatenate([results[w][k] for w in range(len(shares))]) for k in results[0]}

    def _send(
        self,
        w: int,
        policy: Any,
        param_sets: list,
        share: list[EpisodeSpec],
        horizon: int,
        attempts: dict[int, int],
        deadlines: dict[int, float],
    ) -> None:
        while True:
            try:
                self._submit(w, policy, param_sets, share, horizon)
            except OSError as exc:
                self._fail(w, share, f"could not send its share: {exc!r}", attempts)
                continue
            self._request_of[w] = self._request
            deadlines[w] = time.monotonic() + self.timeout_s
            return

    def _wait_round(
        self,
        shares: list[list[EpisodeSpec]],
        attempts: dict[int, int],
        deadlines: dict[int, float],
        results: dict[int, Batch],
    ) -> list[int]:
        """Waits for the next event; returns the workers whose share must be sent again."""
        handles = {w: self._handles[w] for w in deadlines}
        objects = [h.conn for h in handles.values() if h] + [
            h.process.sentinel for h in handles.values() if h
        ]
        wait(objects, timeout=max(0.0, min(deadlines.values()) - time.monotonic()))
        retry: list[int] = []
        for w in list(deadlines):
            status, payload = self._receive(w)
            if status == "alive":
                deadlines[w] = time.monotonic() + self.timeout_s
                continue
            if status == "busy" and time.monotonic() < deadlines[w]:
                continue
            del deadlines[w]
            if status == "ok":
                results[w] = payload
                continue
            if status == "busy":
                payload = (
                    f"no episode finished within timeout_s={self.timeout_s:g} s (worker hung or "
                    "too slow)"
                )
            if self._fail(w, shares[w], payload, attempts):
                retry.append(w)
        return retry

    def _fail_quietly(self, w: int) -> None:
        """Kills a worker whose reply will never be read (the call is being abandoned)."""
        handle = self._handles[w]
        if handle is not None:
            handle.kill()
        self._handles[w] = None

    def close(self) -> None:
        """Asks every worker to stop, kills those that do not within a few seconds; idempotent."""
        self._finalizer()
