"""Both meta-adversarial agents resume from a state dict exactly: the steps after a checkpoint
give the metrics of a run that never stopped (the runner's checkpoint is this state dict)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from test_meta_adversarial import _generator, _tiny_imitation


def _seeded(metrics: dict[str, float]) -> str:
    """The metrics a seed fixes (no timings), as text: NaN compares equal to NaN."""
    return json.dumps({k: v for k, v in metrics.items() if not k.startswith("time/")}, sort_keys=True)


@pytest.mark.parametrize("make", [_tiny_imitation, _generator], ids=["meta_imitation", "task_generator"])
def test_the_steps_after_a_checkpoint_match_a_run_that_never_stopped(make):
    full = make()
    try:
        tasks = [full.distribution.sample(full.meta_batch_size, np.random.default_rng(i)) for i in range(3)]
        expected = [_seeded(full.step(t)) for t in tasks]
    finally:
        full.close()
    first = make()
    try:
        first.step(tasks[0])
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        first.step(tasks[1])  # moves on: the checkpoint must not share its tensors
    finally:
        first.close()
    resumed = make()
    try:
        buffer.seek(0)
        resumed.load_state_dict(torch.load(buffer, weights_only=False))
        assert [_seeded(resumed.step(t)) for t in tasks[1:]] == expected[1:]
    finally:
        resumed.close()
