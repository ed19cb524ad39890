"""The Ray backend: the rollout worker as a Ray actor, locally or on a cluster.

Only imported when ``backend="ray"`` is asked for, so Ray stays optional. The protocol is the
process backend's: one call per worker per sample with its share of the episodes, the policy sent
only when it changes, failures caught under a deadline.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import ray
import torch

from envs.base import TaskDistribution
from metarl.rollout.sampler import WorkerError, params_from_numpy, share_params, split_shares
from metarl.rollout.worker import Batch, EpisodeSpec, RolloutWorker

logger = logging.getLogger(__name__)


STARTUP_TIMEOUT_S = 300.0  # the longest the actors may take to start (before any timeout_s)


@ray.remote(num_cpus=1, max_restarts=0)
class RolloutActor:
    """A :class:`RolloutWorker` living in a Ray worker process."""

    def __init__(self, distribution: TaskDistribution, max_envs: int | None) -> None:
        torch.set_num_threads(1)
        self.worker = RolloutWorker(distribution, max_envs=max_envs)
        self.policy: Any = None

    def set_policy(self, policy: Any) -> None:
        self.policy = policy

    def run(
        self, arrays: list[dict[str, np.ndarray]], episodes: list[EpisodeSpec], horizon: int
    ) -> Batch:
        with torch.no_grad():
            return self.worker.run(self.policy, params_from_numpy(arrays), episodes, horizon)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.worker.close()


class RayBackend:
    """Rollout workers as Ray actors (one CPU each).

    Args:
        distribution: the task family (must be picklable).
        num_workers: number of actors.
        envs_per_worker: environments per actor; ``None`` holds one per episode of its share.
        timeout_s: the longest an actor may take for its share of one call.
        on_failure: ``"raise"`` or ``"restart"`` (at most ``max_restarts`` times per call).
        address: cluster address for ``ray.init``; ``None`` starts Ray locally unless it is running.
        max_restarts: restarts allowed per actor per call under ``on_failure="restart"``.
    """

    name = "ray"

    def __init__(
        self,
        distribution: TaskDistribution,
        num_workers: int,
        envs_per_worker: int | None,
        timeout_s: float,
        on_failure: str,
        address: str | None = None,
        max_restarts: int = 2,
    ) -> None:
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        self.distribution = distribution
        self.envs_per_worker = envs_per_worker
        self.timeout_s = float(timeout_s)
        self.on_failure = on_failure
        self.max_restarts = max_restarts
        self._policies: list[Any] = [None] * num_workers
        self._actors: list[Any] = [None] * num_workers
        self._closed = False
        self._start_missing()

    def _start_missing(self) -> None:
        """Starts the actors that are not running (all at once) and blocks until they answer, so
        that ``timeout_s`` measures sampling alone: an actor's start (a Python process importing
        torch and the environments) can take tens of seconds on a loaded machine."""
        new = [w for w, a in enumerate(self._actors) if a is None]
        if not new:
            return
        for w in new:
            self._actors[w] = self._spawn()
            self._policies[w] = None
        startup_s = max(STARTUP_TIMEOUT_S, self.timeout_s)
        try:
            ray.get([self._actors[w].pid.remote() for w in new], timeout=startup_s)
        except ray.exceptions.GetTimeoutError as exc:
            self.close()
            raise RuntimeError(
                f"Ray rollout actors {new} did not start within {startup_s:g} s; "
                "check `ray status` for free CPUs, or use backend='process'"
            ) from exc

    def _spawn(self) -> Any:
        return RolloutActor.remote(self.distribution, self.envs_per_worker)  # type: ignore[attr-defined]

    @property
    def pids(self) -> list[int]:
        """Process ids of the actors (blocks until they are up)."""
        return ray.get([a.pid.remote() for a in self._actors])

    def _submit(
        self,
        w: int,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        share: list[EpisodeSpec],
        horizon: int,
    ) -> Any:
        if self._actors[w] is None:
            self._start_missing()
        if self._policies[w] is not policy:
            self._actors[w].set_policy.remote(policy)
            self._policies[w] = policy
        arrays, local = share_params(param_sets, share)
        return self._actors[w].run.remote(arrays, local, horizon)

    def _kill(self, w: int) -> None:
        if self._actors[w] is not None:
            ray.kill(self._actors[w], no_restart=True)
        self._actors[w] = None

    def _fail(self, w: int, share: list[EpisodeSpec], cause: str, attempts: dict[int, int]) -> None:
        """Kills actor ``w``; returns to retry its share, else raises :class:`WorkerError`."""
        self._kill(w)
        tasks = sorted({e.task_index for e in share})
        if self.on_failure != "restart" or attempts[w] >= self.max_restarts:
            if self.on_failure == "restart":
                cause = f"{cause} (after {attempts[w]} restarts)"
            raise WorkerError(w, tasks, cause)
        attempts[w] += 1
        logger.warning("rollout actor %d failed on tasks %s (%s); restarting it", w, tasks, cause)

    def _outcome(self, ref: Any) -> tuple[bool, Any]:
        try:
            return True, ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            return False, f"its environment raised:\n{exc}"
        except ray.exceptions.RayError as exc:
            return False, f"the actor died: {exc!r}"

    def collect(
        self,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        episodes: list[EpisodeSpec],
        horizon: int,
    ) -> Batch:
        """Splits ``episodes`` over the actors and gathers their rows in order."""
        shares = [[episodes[i] for i in r] for r in split_shares(len(episodes), len(self._actors))]
        attempts = dict.fromkeys(range(len(shares)), 0)
        refs: dict[int, Any] = {}
        deadlines: dict[int, float] = {}
        results: dict[int, Batch] = {}
        try:
            self._start_missing()  # actors killed by a failed call start again here
            for w, share in enumerate(shares):
                refs[w] = self._submit(w, policy, param_sets, share, horizon)
                deadlines[w] = time.monotonic() + self.timeout_s
            while refs:
                timeout = max(0.0, min(deadlines.values()) - time.monotonic())
                ready, _ = ray.wait(list(refs.values()), num_returns=1, timeout=timeout)
                for w in [
                    w for w, ref in refs.items() if ref in ready or time.monotonic() >= deadlines[w]
                ]:
                    ref = refs.pop(w)
                    if ref in ready:
                        ok, payload = self._outcome(ref)
                    else:
                        ok, payload = (
                            False,
                            f"no result within timeout_s={self.timeout_s:g} s (actor hung or too slow)",
                        )
                    if ok:
                        results[w] = payload
                        continue
                    self._fail(w, shares[w], payload, attempts)
                    refs[w] = self._submit(w, policy, param_sets, shares[w], horizon)
                    deadlines[w] = time.monotonic() + self.timeout_s
        except BaseException:
            for w in refs:
                self._kill(w)
            raise
        return {k: np.concatenate([results[w][k] for w in range(len(shares))]) for k in results[0]}

    def close(self) -> None:
        """Kills the actors, and shuts Ray down if this backend started it; idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in range(len(self._actors)):
            self._kill(w)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
