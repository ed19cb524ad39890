"""The sampler front end shared by every backend: validation, seeding, assembly into Trajectories.

A backend only runs a flat list of :class:`~metarl.rollout.worker.EpisodeSpec` and returns one
row per episode; the :class:`Sampler` decides which episodes exist, seeds them from
``(seed, call counter, task index, episode index)`` and shapes the result ``[tasks, episodes, T]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl.rollout.worker import Batch, EpisodeSpec, flat_dim
from metarl.types import Params, Trajectories


class WorkerError(RuntimeError):
    """A rollout worker died, hung past its timeout, or its environment raised.

    Attributes:
        worker: index of the worker.
        tasks: indices (within the sampler call) of the tasks the worker was collecting.
        cause: what went wrong, in words (exit code, timeout, or the remote traceback).
    """

    def __init__(self, worker: int, tasks: Sequence[int], cause: str) -> None:
        self.worker = worker
        self.tasks = list(tasks)
        self.cause = cause
        super().__init__(
            f"rollout worker {worker} failed while collecting tasks {self.tasks}: {cause}"
        )

    def __reduce__(self) -> tuple[type, tuple[int, list[int], str]]:
        # Crosses process boundaries intact (a sweep's runs live in pool processes).
        return (WorkerError, (self.worker, self.tasks, self.cause))


class Backend(Protocol):
    """Runs episodes somewhere; returns the rows of :func:`~metarl.rollout.worker.allocate_batch`."""

    name: str

    def collect(
        self, policy: Any, param_sets: list[Params], episodes: list[EpisodeSpec], horizon: int
    ) -> Batch: ...

    def close(self) -> None: ...


def split_shares(num_items: int, num_workers: int) -> list[range]:
    """Contiguous, balanced shares of ``range(num_items)``, empty shares dropped."""
    bounds = np.linspace(0, num_items, num_workers + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def share_params(
    param_sets: list[Params], episodes: list[EpisodeSpec]
) -> tuple[list[dict[str, np.ndarray]], list[EpisodeSpec]]:
    """The parameter sets one share uses, as numpy arrays, and its episodes re-indexed into them."""
    used = sorted({e.param_index for e in episodes})
    local = {p: i for i, p in enumerate(used)}
    arrays = [{k: v.detach().cpu().numpy() for k, v in param_sets[p].items()} for p in used]
    return arrays, [e._replace(param_index=local[e.param_index]) for e in episodes]


def params_from_numpy(arrays: list[dict[str, np.ndarray]]) -> list[Params]:
    """Inverse of the numpy conversion in :func:`share_params`."""
    # Arrays read from a shared object store are read-only; torch wants writable memory.
    return [
        {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in a.items()}
        for a in arrays
    ]


def _check_policy(policy: Any, distribution: TaskDistribution) -> None:
    obs_dim = flat_dim(distribution.observation_space)
    if getattr(policy, "obs_dim", None) != obs_dim:
        raise ValueError(
            f"policy obs_dim={getattr(policy, 'obs_dim', None)} does not match the observation space "
            f"{distribution.observation_space} of {distribution.name!r}; build the policy with "
            "metarl.policies.make_policy(distribution.observation_space, distribution.action_space)"
        )
    discrete = isinstance(distribution.action_space, gym.spaces.Discrete)
    if bool(getattr(policy, "discrete", False)) != discrete:
        raise ValueError(
            f"policy {policy!r} does not fit the action space {distribution.action_space}; "
            "use make_policy to choose the policy type from the spaces"
        )


def _param_sets(
    params: Params | Sequence[Params], num_tasks: int
) -> tuple[list[Params], list[int]]:
    """Distinct parameter sets and each task's index into them (shared dicts are batched together)."""
    if isinstance(params, dict):
        return [{k: v.detach() for k, v in params.items()}], [0] * num_tasks
    params = list(params)
    if len(params) != num_tasks:
        raise ValueError(
            f"got {len(params)} parameter dicts for {num_tasks} tasks; pass one dict for all tasks "
            "or a list with one dict per task"
        )
    distinct: dict[int, int] = {}
    sets: list[Params] = []
    for p in params:
        if id(p) not in distinct:
            distinct[id(p)] = len(sets)
            sets.append({k: v.detach() for k, v in p.items()})
    return sets, [distinct[id(p)] for p in params]


class Sampler:
    """Collects fixed-horizon trajectories of several tasks with one of the backends.

    Build it with :func:`metarl.rollout.make_sampler`. Use it as a context manager or call
    :meth:`close` to release workers.

    Args:
        distribution: the task family.
        backend: where episodes run.
        horizon: steps per episode ``T``; ``None`` uses ``distribution.horizon``.
        seed: root of every episode's seed.
    """

    def __init__(
        self, distribution: TaskDistribution, backend: Backend, horizon: int | None, seed: int
    ) -> None:
        self.distribution = distribution
        self.backend = backend
        self.horizon = int(horizon if horizon is not None else distribution.horizon)
        if self.horizon < 1:
            raise ValueError(
                f"horizon={self.horizon} must be at least 1; pass horizon= or set the distribution's horizon"
            )
        self.seed = int(seed)
        self.num_calls = 0

    def sample(
        self,
        policy: Any,
        params: Params | Sequence[Params],
        tasks: Sequence[Task],
        episodes_per_task: int,
    ) -> Trajectories:
        """Runs ``episodes_per_task`` episodes of each task under ``torch.no_grad()``.

        Args:
            policy: a policy from :mod:`metarl.policies`.
            params: one parameter dict for every task, or a list with one dict per task.
            tasks: the ``N`` tasks.
            episodes_per_task: ``E``.

        Returns:
            Detached :class:`~metarl.types.Trajectories` shaped ``[N, E, T, ...]``.
        """
        tasks = list(tasks)
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise ValueError(
                f"tasks must be a non-empty list of envs.base.Task, got {tasks!r:.200}"
            )
        if int(episodes_per_task) < 1:
            raise ValueError(f"episodes_per_task={episodes_per_task} must be at least 1")
        _check_policy(policy, self.distribution)
        param_sets, param_index = _param_sets(params, len(tasks))
        call_index = self.num_calls
        self.num_calls += 1
        episodes = [
            EpisodeSpec(task, i, e, param_index[i], self.seed, call_index)
            for i, task in enumerate(tasks)
            for e in range(int(episodes_per_task))
        ]
        with torch.no_grad():
            batch = self.backend.collect(policy, param_sets, episodes, self.horizon)
        return self._assemble(batch, tasks, int(episodes_per_task))

    def _assemble(self, batch: Batch, tasks: list[Task], num_episodes: int) -> Trajectories:
        lead = (len(tasks), num_episodes)
        fields = {k: torch.from_numpy(v.reshape(lead + v.shape[1:])) for k, v in batch.items()}
        vectors = [t.vector() for t in tasks]
        if len({v.shape for v in vectors}) != 1:
            raise ValueError(
                f"tasks have task vectors of different lengths {[v.shape[0] for v in vectors]}; "
                "sample tasks of one family in one call"
            )
        fields["task"] = torch.from_numpy(np.stack(vectors))
        return Trajectories(**fields)

    def state_dict(self) -> dict[str, int]:
        """The seed and call counter, so that a resumed run continues the same random stream."""
        return {"seed": self.seed, "num_calls": self.num_calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict`; the seed must match the one this sampler was built with."""
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"state was saved by a sampler with seed={state['seed']}, this one has seed={self.seed}; "
                "build the sampler with the saved seed"
            )
        self.num_calls = int(state["num_calls"])

    def close(self) -> None:
        """Stops the backend's workers; idempotent."""
        self.backend.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sampler(backend={self.backend.name!r}, family={self.distribution.name!r}, horizon={self.horizon}, seed={self.seed})"
