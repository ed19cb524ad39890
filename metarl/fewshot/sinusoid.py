"""Sinusoid regression, exactly as in MAML (Finn et al. 2017, arXiv 1703.03400, section 5.1).

Each task is ``y = A sin(x − φ)`` with amplitude ``A ~ U[0.1, 5.0]`` and phase
``φ ~ U[0, π]``; inputs ``x ~ U[−5, 5]``. The regressor is an MLP 1-40-40-1 with
ReLU, trained and evaluated with mean-squared error on K = 5 or 10 support points.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from envs.base import Task
from metarl.nn import MLP, FunctionalModel

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class RegressionBatch(NamedTuple):
    """Points of several tasks: ``x [B, P, 1]``, ``y [B, P, 1]``."""

    x: torch.Tensor
    y: torch.Tensor


class SinusoidDistribution:
    """The MAML sinusoid task family.

    Args:
        num_test_tasks: size of the fixed held-out set used for evaluation (600 in the benchmark).
        test_seed: seed of that held-out set; training tasks are drawn fresh from the runner's rng.
    """

    name = "sinusoid"
    batch_mode = "vmap"  # measured faster than a loop for this small MLP (metarl bench adapt)

    def __init__(self, num_test_tasks: int = 600, test_seed: int = 1_000_003):
        if num_test_tasks < 1:
            raise ValueError(f"num_test_tasks must be >= 1, got {num_test_tasks}")
        self.num_test_tasks = num_test_tasks
        self.test_seed = test_seed

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` tasks with amplitude U[0.1, 5] and phase U[0, π]."""
        amps = rng.uniform(*AMPLITUDE_RANGE, size=n)
        phases = rng.uniform(*PHASE_RANGE, size=n)
        return [Task.make(self.name, amplitude=float(a), phase=float(p)) for a, p in zip(amps, phases, strict=True)]

    def test_tasks(self) -> list[Task]:
        """The fixed held-out tasks."""
        return self.sample(self.num_test_tasks, np.random.default_rng(self.test_seed))

    @staticmethod
    def function(task: Task, x: np.ndarray) -> np.ndarray:
        """Ground truth ``A sin(x − φ)``."""
        return task["amplitude"] * np.sin(x - task["phase"])

    def points(self, tasks: list[Task], num_points: int, rng: np.random.Generator) -> RegressionBatch:
        """``num_points`` inputs per task drawn from U[−5, 5] with their targets."""
        x = rng.uniform(*INPUT_RANGE, size=(len(tasks), num_points, 1))
        y = np.stack([self.function(t, x[i]) for i, t in enumerate(tasks)])
        return RegressionBatch(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))

    def episodes(
        self, tasks: list[Task], num_shots: int, num_queries: int, rng: np.random.Generator
    ) -> tuple[RegressionBatch, RegressionBatch]:
        """Support (K points) and query points for each task, stacked on a task axis."""
        both = self.points(tasks, num_shots + num_queries, rng)
        support = RegressionBatch(both.x[:, :num_shots], both.y[:, :num_shots])
        query = RegressionBatch(both.x[:, num_shots:], both.y[:, num_shots:])
        return support, query

    def make_model(self, hidden_sizes: tuple[int, ...] = (40, 40)) -> FunctionalModel:
        """The MAML regressor MLP 1-40-40-1 ReLU."""
        return FunctionalModel(MLP((1, *hidden_sizes, 1), activation="relu"))

    @staticmethod
    def loss(pred: torch.Tensor, batch: RegressionBatch) -> torch.Tensor:
        """Mean-squared error."""
        return F.mse_loss(pred, batch.y)

    @staticmethod
    def accuracy(pred: torch.Tensor, batch: RegressionBatch) -> torch.Tensor | None:
        return None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "amplitude": AMPLITUDE_RANGE,
            "phase": PHASE_RANGE,
            "x": INPUT_RANGE,
            "test_tasks": self.num_test_tasks,
        }

    def plot_fits(self, learner, tasks: list[Task], path, seed: int = 0):
        """MAML figure 2 style: ground truth, pre-update and post-update fits with the K support points."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rng = np.random.default_rng(seed)
        grid = torch.linspace(*INPUT_RANGE, 200).unsqueeze(-1)
        k = learner.config.num_shots
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            support = self.points([task], k, rng)
            data = RegressionBatch(support.x[0], support.y[0])
            ax.plot(grid, self.function(task, grid.numpy()), "k-", label="ground truth")
            for steps, style in ((0, ":"), (1, "--"), (10, "-")):
                params = learner.adapt(task, data, steps=steps)
                with torch.no_grad():
                    ax.plot(grid, learner.model(params, grid), style, label=f"{steps} step(s)")
            ax.plot(data.x, data.y, "r^", label=f"K={k} support")
            ax.set_title(f"A={task['amplitude']:.2f}, φ={task['phase']:.2f}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
