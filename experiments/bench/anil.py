"""``metarl bench anil``: ANIL on cached body features against ANIL through the whole model.

ANIL adapts only the head, so the conv4 body gives the same features at every inner step.
``GradientLearner`` therefore runs the body once per set of images and takes the inner steps on the
head alone (``FunctionalModel.split``). The reference is the generic path, where every inner step
runs the whole model and only the head's parameters are adapted (``meta_objective`` with
``names``): what ANIL cost before. Both run the same ``GradientLearner`` code on the same synthetic
Omniglot-shaped episodes (random 28×28 images; speed does not depend on the pixels), in one process:

* training: one second-order meta-step (meta-loss and backward), the 20-way 5-shot settings of the
  results table (5 inner steps at rate 0.1, 5 queries per class) on ``--tasks`` tasks;
* scoring: held-out scoring of ``--tasks`` tasks after 0, 1, 3, 5 and 10 steps with 15 queries per
  class, as each table cell is scored.

Reported: median ms of each, the speed-up (reference / cached), and the largest difference between
the two paths' losses (float32 noise). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.adapt import time_ms
from metarl.fewshot.maml import GradientLearner, GradientLearnerConfig
from metarl.fewshot.omniglot_tasks import ClassificationBatch, OmniglotDistribution
from metarl.nn import Conv4, FunctionalModel
from metarl.runtime import machine


class SyntheticEpisodes:
    """The parts of a few-shot task distribution ``GradientLearner`` uses, with random images."""

    def __init__(self, ways: int, channels: int):
        self.ways, self.channels = ways, channels

    def make_model(self) -> FunctionalModel:
        return FunctionalModel(Conv4(self.ways, channels=self.channels))

    def episodes(
        self, tasks: list[Any], num_shots: int, num_queries: int, rng: np.random.Generator
    ) -> tuple[ClassificationBatch, ClassificationBatch]:
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))

        def batch(per_class: int) -> ClassificationBatch:
            x = torch.rand(len(tasks), self.ways * per_class, 1, 28, 28, generator=g)
            y = torch.arange(self.ways).repeat_interleave(per_class).expand(len(tasks), -1)
            return ClassificationBatch(x, y.contiguous())

        return batch(num_shots), batch(num_queries)

    loss = staticmethod(OmniglotDistribution.loss)
    accuracy = staticmethod(OmniglotDistribution.accuracy)


def bench(ways: int, shots: int, tasks: int, channels: int, repeats: int, warmup: int) -> dict[str, Any]:
    config = GradientLearnerConfig(
        method="anil", meta_batch_size=tasks, num_shots=shots, num_queries=shots,
        num_eval_queries=15, inner_lr=0.1, adapt_steps=5, eval_adapt_steps=(0, 1, 3, 5, 10),
        outer_lr=1e-9, batch="loop",  # a negligible outer rate: every repeat does the same work
    )
    episodes = SyntheticEpisodes(ways, channels)
    cached, reference = GradientLearner(config, episodes, 0), GradientLearner(config, episodes, 0)
    reference.split = None
    if cached.split is None:
        raise RuntimeError("conv4 did not split into body and head; nothing to compare")
    batch: list[Any] = [None] * tasks  # SyntheticEpisodes ignores the tasks themselves
    out: dict[str, Any] = {"ways": ways, "shots": shots, "tasks": tasks, "channels": channels}
    losses = {}
    for name, learner in (("reference", reference), ("cached", cached)):
        losses[name] = learner.step(batch)["train/query_loss"]
        scored = learner.evaluate(batch, np.random.default_rng(1))["loss"]
        losses[name + "_scores"] = scored
        out[f"{name}_train_ms"] = time_ms(partial(learner.step, batch), repeats, warmup)
        out[f"{name}_score_ms"] = time_ms(
            partial(learner.evaluate, batch, np.random.default_rng(1)), repeats, warmup
        )
    out["train_speedup"] = out["reference_train_ms"] / out["cached_train_ms"]
    out["score_speedup"] = out["reference_score_ms"] / out["cached_score_ms"]
    out["max_loss_difference"] = float(
        max(abs(losses["cached"] - losses["reference"]),
            np.abs(losses["cached_scores"] - losses["reference_scores"]).max())
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metarl bench anil", description=__doc__.split("\n")[0])
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-step and scored")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", help="also write OUT.json and OUT.md (e.g. experiments/results/bench_anil)")
    args = parser.parse_args(argv)
    result = bench(args.ways, args.shots, args.tasks, args.channels, args.repeats, args.warmup)
    result["machine"] = machine()
    print(f"ANIL {args.ways}-way {args.shots}-shot: training x{result['train_speedup']:.2f}, "
          f"scoring x{result['score_speedup']:.2f} (max loss difference {result['max_loss_difference']:.1e})",
          flush=True)
    if args.out:
        write_report(result, Path(args.out), " ".join(["metarl bench anil", *(argv or [])]))
    print(json.dumps(result))
    return 0


def write_report(r: dict[str, Any], out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **r}, indent=1))
    lines = [
        "# ANIL speed: body features computed once per task against the whole model at every step",
        "",
        f"Command: `{command}`. Machine: {r['machine']}.",
        "",
        f"conv4 ({r['channels']} filters), {r['ways']}-way {r['shots']}-shot, {r['tasks']} tasks, "
        "synthetic images; median ms over the repeats, both paths timed in the same process run. "
        "Training: one second-order meta-step, 5 inner steps. Scoring: held-out scores after 0, 1, 3, "
        "5 and 10 steps, 15 queries per class.",
        "",
        "| work | whole model per step (ms) | cached features (ms) | speed-up |",
        "|---|---|---|---|",
        f"| training meta-step | {r['reference_train_ms']:.0f} | {r['cached_train_ms']:.0f} | "
        f"{r['train_speedup']:.2f}× |",
        f"| scoring | {r['reference_score_ms']:.0f} | {r['cached_score_ms']:.0f} | "
        f"{r['score_speedup']:.2f}× |",
        "",
        f"Largest difference between the two paths' losses: {r['max_loss_difference']:.1e} (float32 "
        "rounding; `tests/test_fewshot_learners.py` checks the losses, gradients and scores agree).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
