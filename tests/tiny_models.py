"""A tiny float64 regression model and task data shared by the adaptation-core tests."""

from __future__ import annotations

import torch

from metarl.nn import MLP, FunctionalModel


def tiny_mlp(dtype=torch.float64):
    model = FunctionalModel(MLP((1, 3, 1), activation="tanh"))
    params = {k: v.to(dtype) for k, v in model.init_params(seed=3).items()}
    return model, params


def mse(model):
    def loss(params, data):
        x, y = data
        return ((model(params, x) - y) ** 2).mean()

    return loss


def task_data(seed, num_tasks=4, num_points=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num_tasks, num_points, 1, generator=g, dtype=dtype) * 4 - 2
    y = torch.sin(2 * x + torch.rand(num_tasks, 1, 1, generator=g, dtype=dtype))
    return x, y
