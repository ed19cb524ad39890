"""Omniglot N-way K-shot classification as a few-shot task distribution.

It serves every few-shot learner through the interface :class:`~metarl.fewshot.maml.GradientLearner`
uses (``sample``, ``test_tasks``, ``episodes``, ``make_model``, ``loss``, ``accuracy``) and the
metric learners (``make_encoder``).

A task is a JSON-able episode descriptor, ``Task.make("omniglot", split="train", index=i,
num_ways=N)``: episode ``i`` of the split's :class:`~metarl.fewshot.episodes.EpisodeSampler`
(seeded by ``episode_seed``), so the task alone fixes the episode's classes, drawings, rotations
and shifts; only ``num_shots`` and ``num_queries`` come with the call to :meth:`episodes`. Training
tasks get random indices from the runner's generator; the held-out tasks are episodes
``0 .. num_test_tasks - 1`` of the test split, the same for every learner and seed.

Protocol (MAML, Finn et al. 2017; ProtoNets, Snell et al. 2017): 28x28 images, each rotation by
90 degrees a class of its own (``rotations=True``, in training and test splits alike), conv4 with
64 filters. Splits are those of :func:`~metarl.fewshot.omniglot.split_characters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from envs.base import Task
from metarl.fewshot.episodes import EpisodeSampler
from metarl.fewshot.omniglot import load_omniglot, omniglot_sampler, split_characters
from metarl.fewshot.omniglot_runs import OfficialRun, load_official_runs, score_official_runs
from metarl.nn import Conv4, FunctionalModel

MAX_INDEX = 2**31 - 1
EVAL_CHUNK_SIZE = 50
OFFICIAL_RUN_WAYS = 20


class ClassificationBatch(NamedTuple):
    """Labelled images of several tasks, stacked on a task axis.

    Attributes:
        x: ``[B, N*P, 1, 28, 28]`` float32 images (ink 1), ``P`` shots or queries per class.
        y: ``[B, N*P]`` int64 labels in ``0..N-1``, class-major (``[0]*P + [1]*P + ...``).
    """

    x: torch.Tensor
    y: torch.Tensor


class OmniglotDistribution:
    """Omniglot episodes over one character split.

    Args:
        num_ways: N of the held-out episodes, and the width of :meth:`make_model`'s head.
        data_dir: directory with the Omniglot zips (default ``../shared/data``).
        subset: ``"minimal"``, ``"full"`` or ``"auto"`` (see :func:`load_omniglot`).
        split_seed: seed of the character split.
        rotations: whether each rotation by 90 degrees of a character is its own class.
        max_shift: training augmentation, random shifts of up to this many pixels (test: none).
        max_rotation: training augmentation, random turns of up to this many degrees (test: none).
        max_scale: training augmentation, random scaling by a factor in ``1 ± max_scale``
            (test: none).
        num_test_tasks: number of held-out episodes (600 in the benchmark).
        test_split: split of the held-out episodes: ``"test"`` or ``"val"``.
        train_split: split of the training episodes: ``"train"`` or ``"trainval"``.
        train_ways: N of the training episodes; ``None`` means ``num_ways``. Metric learners
            train with more ways than they test (ProtoNets: 60).
        channels: filters per conv4 block in :meth:`make_model` / :meth:`make_encoder` (64 in
            the papers; fewer for quick tests).
        episode_seed: seed of the episode samplers (episode ``i`` depends on it and ``i``).
        cache_dir: optional directory for the decoded images (see :func:`load_omniglot`).
    """

    name = "omniglot"
    # A per-task loop is faster than vmap for conv4 on CPU (metarl bench adapt; a MAML 5-way
    # meta-step with meta-batch 32 took about 3x longer with vmap on a 2-core CPU).
    batch_mode = "loop"
    # Learners evaluate this many held-out episodes at a time to bound memory; the episodes
    # do not depend on the generator, so chunking does not change the results.
    eval_chunk_size = EVAL_CHUNK_SIZE

    def __init__(
        self,
        num_ways: int = 5,
        data_dir: str | None = None,
        subset: str = "auto",
        split_seed: int = 0,
        rotations: bool = True,
        max_shift: int = 0,
        num_test_tasks: int = 600,
        test_split: str = "test",
        train_split: str = "train",
        train_ways: int | None = None,
        channels: int = 64,
        episode_seed: int = 0,
        cache_dir: str | None = None,
        max_rotation: float = 0.0,
        max_scale: float = 0.0,
    ):
        for name, value in (("num_ways", num_ways), ("num_test_tasks", num_test_tasks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1 (64 in the papers), got {channels}")
        if (train_split, test_split) not in (
            ("train", "test"),
            ("trainval", "test"),
            ("train", "val"),
        ):
            raise ValueError(
                f"train_split={train_split!r}, test_split={test_split!r}; expected 'train' or "
                "'trainval' with 'test', or 'train' with 'val' (trainval contains val)"
            )
        self.num_ways = num_ways
        self.train_ways = num_ways if train_ways is None else train_ways
        self.rotations, self.max_shift = rotations, max_shift
        self.max_rotation, self.max_scale = max_rotation, max_scale
        self.num_test_tasks = num_test_tasks
        self.test_split, self.train_split = test_split, train_split
        self.channels, self.split_seed, self.episode_seed = channels, split_seed, episode_seed
        self.dataset = load_omniglot(
            data_dir, subset, cache_dir=Path(cache_dir) if cache_dir else None
        )
        self.splits = split_characters(self.dataset, split_seed)
        self._samplers: dict[tuple[str, int, int, int], EpisodeSampler] = {}
        # Fail now, not at the first step, if a split is too small for the requested ways.
        self._sampler(train_split, self.train_ways, 1, 0)
        self._sampler(test_split, num_ways, 1, 0)

    def _sampler(
        self, split: str, num_ways: int, num_shots: int, num_queries: int
    ) -> EpisodeSampler:
        key = (split, num_ways, num_shots, num_queries)
        if key not in self._samplers:
            if split not in self.splits:
                raise ValueError(
                    f"task split {split!r} is unknown; expected one of {sorted(self.splits)}"
                )
            self._samplers[key] = omniglot_sampler(
                self.dataset,
                split,
                self.split_seed,
                num_ways,
                num_shots,
                num_queries,
                rotations=self.rotations,
                max_shift=self.max_shift if split == self.train_split else 0,
                seed=self.episode_seed,
                max_rotation=self.max_rotation if split == self.train_split else 0.0,
                max_scale=self.max_scale if split == self.train_split else 0.0,
            )
        return self._samplers[key]

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        """``n`` training episodes (``train_ways``-way) with indices drawn from ``rng``."""
        indices = rng.integers(0, MAX_INDEX, size=n)
        return [
            Task.make(self.name, split=self.train_split, index=int(i), num_ways=self.train_ways)
            for i in indices
        ]

    def test_tasks(self, num_ways: int | None = None) -> list[Task]:
        """The fixed held-out episodes ``0 .. num_test_tasks - 1`` (``num_ways``-way by default)."""
        ways = self.num_ways if num_ways is None else num_ways
        return [
            Task.make(self.name, split=self.test_split, index=i, num_ways=ways)
            for i in range(self.num_test_tasks)
        ]

    def episodes(
        self,
        tasks: list[Task],
        num_shots: int,
        num_queries: int,
        rng: np.random.Generator | None = None,
    ) -> tuple[ClassificationBatch, ClassificationBatch]:
        """Support and query sets of ``tasks``, stacked on a task axis.

        Args:
            tasks: episode descriptors of one way count (from :meth:`sample` or :meth:`test_tasks`).
            num_shots: K, support images per class.
            num_queries: query images per class (K + queries <= 20 drawings).
            rng: unused: the tasks fix their episodes. Kept for the few-shot interface.

        Returns:
            ``(support, query)``: :class:`ClassificationBatch` with ``x [B, N*K, 1, 28, 28]``,
            ``y [B, N*K]`` and ``x [B, N*Q, 1, 28, 28]``, ``y [B, N*Q]``.
        """
        if not tasks:
            raise ValueError("episodes got no tasks; pass at least one Task")
        ways = {t["num_ways"] for t in tasks}
        if len(ways) != 1:
            raise ValueError(
                f"tasks mix way counts {sorted(ways)}; stack tasks of one num_ways per call"
            )
        num_ways = ways.pop()
        eps = [
            self._sampler(t["split"], num_ways, num_shots, num_queries).episode(t["index"])
            for t in tasks
        ]
        support = ClassificationBatch(
            torch.stack([e.support_x for e in eps]), torch.stack([e.support_y for e in eps])
        )
        query = ClassificationBatch(
            torch.stack([e.query_x for e in eps]), torch.stack([e.query_y for e in eps])
        )
        return support, query

    def make_model(self) -> FunctionalModel:
        """Conv4 with a ``num_ways``-way linear head (the gradient learners' classifier)."""
        if self.train_ways != self.num_ways:
            raise ValueError(
                f"train_ways={self.train_ways} differs from num_ways={self.num_ways}, but a classifier "
                "head has one width; set train_ways equal to num_ways (or leave it out) for "
                "gradient-based learners. Only metric learners train with more ways than they test."
            )
        return FunctionalModel(Conv4(self.num_ways, channels=self.channels))

    def make_encoder(self) -> FunctionalModel:
        """Conv4 without a head: ``[B, 1, 28, 28] -> [B, channels]`` embeddings (metric learners)."""
        return FunctionalModel(Conv4(0, channels=self.channels))

    @staticmethod
    def loss(pred: torch.Tensor, batch: ClassificationBatch) -> torch.Tensor:
        """Cross-entropy of logits ``pred [P, N]`` against ``batch.y [P]``."""
        return F.cross_entropy(pred, batch.y)

    @staticmethod
    def accuracy(pred: torch.Tensor, batch: ClassificationBatch) -> torch.Tensor:
        """Fraction of ``pred [P, N]`` whose arg-max is ``batch.y [P]``."""
        return (pred.argmax(-1) == batch.y).to(torch.float32).mean()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "subset": self.dataset.subset,
            "num_ways": self.num_ways,
            "train_ways": self.train_ways,
            "rotations": self.rotations,
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "train_split": self.train_split,
            "test_split": self.test_split,
            "test_tasks": self.num_test_tasks,
        }


def _gradient_classifier(learner: Any, steps: int | None, head_steps: int) -> tuple[Callable, str]:
    """``classify_fn`` of a gradient learner for :func:`score_official_runs`, and its description."""
    params = {k: v.detach() for k, v in learner.params.items()}
    head = learner.model.head_names(params)
    width = params[head[0]].shape[0]
    if width == OFFICIAL_RUN_WAYS:
        num_steps = max(learner.config.eval_adapt_steps) if steps is None else steps

        def adapted(train_x: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
            support = ClassificationBatch(train_x, torch.arange(len(train_x), device=train_x.device))
            tuned = learner.adapt(None, support, steps=num_steps)
            with torch.no_grad():
                return learner.model(tuned, test_x).argmax(-1)

        return adapted, f"20-way learner adapted with its own inner rule for {num_steps} steps"

    encoder = {k.split(".", 1)[1]: v for k, v in params.items() if k not in head}
    lr = learner.config.inner_lr

    def fresh_head(train_x: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = functional_call(
                learner.model.module.encoder, encoder, (torch.cat([train_x, test_x]),)
            )
        train_f, test_f = features[: len(train_x)], features[len(train_x) :]
        weight = torch.zeros(len(train_x), train_f.shape[1], device=train_f.device)
        bias = torch.zeros(len(train_x), device=train_f.device)
        labels = torch.arange(len(train_x), device=train_f.device)
        for _ in range(head_steps):
            g_w, g_b = torch.func.grad(
                lambda w, b: F.cross_entropy(train_f @ w.T + b, labels), argnums=(0, 1)
            )(weight, bias)
            weight, bias = weight - lr * g_w, bias - lr * g_b
        return (test_f @ weight.T + bias).argmax(-1)

    return fresh_head, (
        f"{width}-way learner: head replaced by a zero-initialised 20-way head, trained alone "
        f"(ANIL-style) for {head_steps} steps at inner_lr {lr} on the frozen encoder's features"
    )


def official_runs_error(
    learner: Any,
    runs: Sequence[OfficialRun] | None = None,
    steps: int | None = None,
    head_steps: int = 100,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Error (%) of a trained learner on the 20 official 20-way one-shot runs (Lake et al. 2015).

    Metric learners (with ``classify``) use their own rule with the 20 training images as a 1-shot
    support set (ProtoNets: nearest prototype), averaging each image's embedding over shifted copies
    where the learner's ``official_run_shift`` is > 0. Gradient learners: a 20-way learner adapts on the
    20 training images with its inner rule (``steps``, default its largest ``eval_adapt_steps``); a
    learner of another width keeps its encoder and fits a zero-initialised 20-way head alone for
    ``head_steps`` steps of size ``inner_lr``. Train and test images are embedded together, so
    batch norm sees one run's 40 images (as in the held-out episodes).

    Returns:
        :func:`score_official_runs`' ``{"error_per_run", "mean_error", "num_runs"}`` plus ``"protocol"``.
    """
    runs = load_official_runs(data_dir) if runs is None else runs
    if hasattr(learner, "classify"):
        shift = int(getattr(learner.config, "official_run_shift", 0))

        def classify_fn(train_x: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
            return learner.classify(train_x, torch.arange(len(train_x)), test_x, shift=shift)

        protocol = f"{type(learner).__name__}: 1-shot support of the 20 training images"
        if shift:
            protocol += (
                f", embeddings averaged over {(2 * shift + 1) ** 2} shifts of each image "
                f"(up to {shift} px)"
            )
    else:
        classify_fn, protocol = _gradient_classifier(learner, steps, head_steps)
    device = getattr(learner, "device", torch.device("cpu"))

    def on_learner_device(train_x: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
        return classify_fn(train_x.to(device), test_x.to(device)).cpu()

    return {**score_official_runs(on_learner_device, runs), "protocol": protocol}
