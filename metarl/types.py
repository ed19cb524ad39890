"""Typed containers that cross module boundaries."""

from __future__ import annotations

from typing import NamedTuple

import torch

Params = dict[str, torch.Tensor]
"""Parameters of a functional model by name, run with ``torch.func.functional_call``; the one
definition every module imports."""


class Trajectories(NamedTuple):
    """Fixed-horizon rollouts of several tasks, ready to be vmapped over the task axis.

    Shapes use ``N`` tasks, ``E`` episodes per task, ``T`` the horizon.

    Attributes:
        obs: ``[N, E, T, obs_dim]`` observation at each step (float32).
        actions: ``[N, E, T, act_dim]`` for continuous actions, ``[N, E, T]`` (int64) for discrete.
        rewards: ``[N, E, T]``.
        log_probs: ``[N, E, T]`` log-probability of the action under the sampling policy.
        mask: ``[N, E, T]`` 1.0 while the episode is alive (the step was taken), else 0.0.
        success: ``[N, E]`` 1.0 if the env reported success at any step, NaN where it reports none.
        task: ``[N, task_dim]`` each task's numeric parameters (``Task.vector()``).
        next_obs: ``[N, E, T, obs_dim]`` observation after each step.
        terminated: ``[N, E, T]`` 1.0 at a step that ended the episode by termination (not truncation).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    log_probs: torch.Tensor
    mask: torch.Tensor
    success: torch.Tensor
    task: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.obs.shape[0])

    def episode_returns(self) -> torch.Tensor:
        """``[N, E]`` undiscounted return of each episode."""
        return (self.rewards * self.mask).sum(-1)

    def task_slice(self, index: int | slice) -> Trajectories:
        """The trajectories of one task (index keeps a leading task axis of 1) or a slice of tasks."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Trajectories(*(t[index] for t in self))
