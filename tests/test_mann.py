"""MANN (memory-augmented neural network): LRUA memory access against hand arithmetic, the label
offset of the episode sequence, learning on sinusoid and tiny Omniglot, resume and the runner."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl.errors import NonFiniteLossError
from metarl.fewshot.mann import MANNConfig, MemoryAugmentedNetwork, offset_labels
from metarl.fewshot.mann_memory import cosine_read, least_used, lru_write, update_usage
from metarl.fewshot.omniglot_tasks import OmniglotDistribution
from metarl.fewshot.sinusoid import RegressionBatch, SinusoidDistribution

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(memory_slots=16, memory_width=8, num_reads=2, controller_size=32)


@pytest.fixture(autouse=True)
def _one_thread():
    """The recurrent loop runs many small ops; extra threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def omniglot(shared_data_dir) -> OmniglotDistribution:
    return OmniglotDistribution(
        num_ways=5, data_dir=str(shared_data_dir), subset="minimal", channels=8, num_test_tasks=4
    )


def test_cosine_read_is_softmax_of_cosines_and_weighted_rows():
    memory = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]])
    keys = torch.tensor([[[3.0, 0.0], [-1.0, -1.0]]])  # two heads
    cosines = [[1.0, 0.0, 1 / math.sqrt(2), 0.0], [-1 / math.sqrt(2), -1 / math.sqrt(2), -1.0, 0.0]]
    weights, reads = cosine_read(memory, keys)
    for head, sims in enumerate(cosines):
        total = sum(math.exp(s) for s in sims)
        expected = [math.exp(s) / total for s in sims]
        assert weights[0, head].tolist() == pytest.approx(expected, abs=1e-6)
        by_hand = [expected[0] + expected[2], 2 * expected[1] + expected[2]]
        assert reads[0, head].tolist() == pytest.approx(by_hand, abs=1e-6)


def test_lru_write_zeroes_and_fills_the_least_used_slot():
    memory = torch.ones(1, 4, 2)
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3]])  # slot 1 least used
    prev_read = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]])  # one head, last read slot 2
    key = torch.tensor([[[1.0, 2.0]]])
    new, write = lru_write(memory, usage, prev_read, key, torch.zeros(1, 1))  # σ(0) = 0.5
    assert write[0, 0].tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])
    # slot 1 was zeroed, then got 0.5 key; slot 2 keeps its content plus 0.5 key
    expected = [[1.0, 1.0], [0.5, 1.0], [1.5, 2.0], [1.0, 1.0]]
    assert torch.allclose(new[0], torch.tensor(expected))
    read = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    usage_next = update_usage(usage, read, write, 0.95)
    by_hand = [0.95 * 0.5 + 0.1, 0.95 * 0.1 + 0.2 + 0.5, 0.95 * 0.9 + 0.3 + 0.5, 0.95 * 0.3 + 0.4]
    assert usage_next[0].tolist() == pytest.approx(by_hand, abs=1e-6)


def test_two_heads_write_to_the_two_least_used_slots_and_zero_only_the_least():
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    assert least_used(usage, 2)[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    memory = torch.full((1, 4, 2), 2.0)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    gates = torch.full((1, 2), -1e4)  # σ(α) = 0: least-used slots only
    new, write = lru_write(memory, usage, torch.rand(1, 2, 4), keys, gates)
    assert write[0].tolist() == [[0.0, 1.0, 0.0, 1.0]] * 2
    assert torch.allclose(new[0], torch.tensor([[2.0, 2.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))


def test_offset_labels_by_hand():
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert offset_labels(labels)[0].tolist() == [[0, 0], [1, 0], [0, 1]]


class _FixedEpisodes(SinusoidDistribution):
    """Sinusoid distribution that always returns the same hand-made episode (for one task)."""

    def __init__(self, support: RegressionBatch, query: RegressionBatch):
        super().__init__(num_test_tasks=1)
        self.support, self.query = support, query

    def episodes(self, tasks, num_shots, num_queries, rng):
        return self.support, self.query


def _record_controller_inputs(learner: MemoryAugmentedNetwork) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    learner.network.controller.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    return seen


def test_input_carries_the_previous_label_and_never_a_query_label():
    xs = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0])
    support = RegressionBatch(xs[None, :, None], (xs * 10 + 1)[None, :, None])
    query = RegressionBatch(torch.tensor([[[1.5], [-2.5]]]), torch.full((1, 2, 1), 1000.0))
    distribution = _FixedEpisodes(support, query)
    learner = MemoryAugmentedNetwork(
        MANNConfig(num_shots=5, num_queries=2, **SMALL), distribution, 0
    )
    seen = _record_controller_inputs(learner)
    learner.step(distribution.sample(1, np.random.default_rng(0)))
    assert len(seen) == 6  # five support steps, then all queries in one batched step
    order = [float(row[0, 0]) for row in seen[:5]]
    assert sorted(order) == xs.tolist()  # the support, shuffled
    fed = [float(row[0, 1]) for row in seen[:5]]
    assert fed == [0.0] + [x * 10 + 1 for x in order[:-1]]  # label of t-1, nothing at t = 0
    queries = seen[5]
    assert queries[:, 0].tolist() == [1.5, -2.5]
    assert queries[:, 1].tolist() == [order[-1] * 10 + 1] * 2  # the last support label
    assert all(not (row == 1000.0).any() for row in seen)  # query targets are never fed


def test_query_predictions_ignore_other_queries_and_empty_memory_ignores_support():
    learner = MemoryAugmentedNetwork(MANNConfig(**SMALL), SinusoidDistribution(), 0)
    data = RegressionBatch(torch.linspace(-4, 4, 6)[:, None], torch.randn(6, 1))
    state = learner.adapt(None, data)
    grid = torch.linspace(-5, 5, 7)[:, None]
    assert torch.allclose(learner.predict(state, grid)[2:3], learner.predict(state, grid[2:3]))
    other = RegressionBatch(data.x, data.y + 3)
    assert not torch.allclose(
        learner.predict(state, grid), learner.predict(learner.adapt(None, other), grid)
    )
    empty = learner.adapt(None, data, steps=0)
    assert torch.equal(
        learner.predict(empty, grid), learner.predict(learner.adapt(None, other, steps=0), grid)
    )


def test_classification_feeds_each_support_label_once_as_one_hot(omniglot):
    learner = MemoryAugmentedNetwork(MANNConfig(num_shots=1, num_queries=2, **SMALL), omniglot, 0)
    seen = _record_controller_inputs(learner)
    learner.step(omniglot.sample(1, np.random.default_rng(0)))
    features = omniglot.channels
    labels = [row[:, features : features + 5] for row in seen]
    assert labels[0].abs().sum() == 0
    fed = torch.cat([labels[t][0:1] for t in range(1, 5)] + [labels[5][0:1]])
    assert torch.equal(fed.sort(0).values, torch.eye(5).sort(0).values)  # each class once
    assert torch.equal(labels[5], labels[5][0:1].expand(10, 5))  # every query: last support label


def test_loss_decreases_on_a_fixed_sinusoid_stream():
    distribution = SinusoidDistribution()
    tasks = distribution.sample(8, np.random.default_rng(0))
    fixed = _FixedEpisodes(*distribution.episodes(tasks, 10, 10, np.random.default_rng(1)))
    config = MANNConfig(meta_batch_size=8, num_shots=10, num_queries=10, outer_lr=3e-2, **SMALL)
    learner = MemoryAugmentedNetwork(config, fixed, 0)
    losses = [learner.step(tasks)["train/query_loss"] for _ in range(50)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_loss_decreases_on_a_fixed_tiny_omniglot_stream(omniglot):
    config = MANNConfig(meta_batch_size=2, num_shots=1, num_queries=3, outer_lr=3e-3, **SMALL)
    learner = MemoryAugmentedNetwork(config, omniglot, 0)
    tasks = omniglot.sample(2, np.random.default_rng(3))
    losses = [learner.step(tasks)["train/query_loss"] for _ in range(20)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_evaluate_gives_two_columns_and_chance_from_empty_memory(omniglot):
    learner = MemoryAugmentedNetwork(MANNConfig(num_eval_queries=3, **SMALL), omniglot, 0)
    result = learner.evaluate(omniglot.test_tasks(), np.random.default_rng(0))
    assert result["adaptation_steps"] == [0, 1]
    assert result["loss"].shape == (4, 2) and result["accuracy"].shape == (4, 2)
    assert np.all((result["accuracy"] >= 0) & (result["accuracy"] <= 1))
    sinusoid = MemoryAugmentedNetwork(MANNConfig(num_shots=5, **SMALL), SinusoidDistribution(), 0)
    result = sinusoid.evaluate(
        SinusoidDistribution(num_test_tasks=3).test_tasks(), np.random.default_rng(0)
    )
    assert result["accuracy"] is None and result["loss"].shape == (3, 2)


def test_checkpoint_round_trip_gives_identical_next_metrics():
    distribution = SinusoidDistribution()
    config = MANNConfig(meta_batch_size=4, num_shots=5, num_queries=5, **SMALL)
    learner = MemoryAugmentedNetwork(config, distribution, 0)
    rng = np.random.default_rng(0)
    for _ in range(2):
        learner.step(distribution.sample(4, rng))
    state = learner.state_dict()
    restored = MemoryAugmentedNetwork(config, distribution, 1)
    restored.load_state_dict(state)
    tasks = distribution.sample(4, rng)
    assert learner.step(tasks) == restored.step(tasks)
    a = learner.evaluate(tasks, np.random.default_rng(9))["loss"]
    assert np.array_equal(a, restored.evaluate(tasks, np.random.default_rng(9))["loss"])


def test_non_finite_loss_raises_before_parameters_change():
    support = RegressionBatch(torch.zeros(1, 3, 1), torch.zeros(1, 3, 1))
    query = RegressionBatch(torch.zeros(1, 2, 1), torch.full((1, 2, 1), float("nan")))
    distribution = _FixedEpisodes(support, query)
    learner = MemoryAugmentedNetwork(
        MANNConfig(num_shots=3, num_queries=2, **SMALL), distribution, 0
    )
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="parameters unchanged"):
        learner.step(distribution.sample(1, np.random.default_rng(0)))
    for name, value in learner.network.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_reads": 0}, "num_reads must be >= 1"),
        ({"memory_slots": 2, "num_reads": 4}, "exceeds memory_slots"),
        ({"usage_decay": 1.5}, "usage_decay"),
        ({"encoder": "resnet"}, "encoder must be"),
        ({"outer_lr": 0.0}, "outer_lr"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(MANNConfig(), **change)


def test_wider_training_episodes_are_refused(shared_data_dir):
    distribution = OmniglotDistribution(
        num_ways=5, train_ways=10, data_dir=str(shared_data_dir), channels=8
    )
    with pytest.raises(ValueError, match="train_ways=10"):
        MemoryAugmentedNetwork(MANNConfig(**SMALL), distribution, 0)


@pytest.mark.parametrize("config", ["sinusoid_mann", "omniglot_mann"])
def test_runner_trains_and_evaluates(tmp_path, monkeypatch, config, cli):
    monkeypatch.chdir(ROOT)
    tiny = [
        "run.num_iterations=2",
        "run.log_every=1",
        "run.checkpoint_every=2",
        "run.eval_at_end=false",
    ]
    tiny += ["tasks.num_test_tasks=4", "agent.meta_batch_size=2", "agent.controller_size=16"]
    tiny += ["tasks.channels=8"] if config == "omniglot_mann" else []
    args = ["run", f"experiments/{config}.toml", "--out", str(tmp_path / "r"), "--no-progress"]
    cli(*args, *(item for s in tiny for item in ("--set", s)))
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads(cli("eval", str(tmp_path / "r")).strip().splitlines()[-1])
    assert summary["adaptation_steps"] == [0, 1] and summary["num_tasks"] == 4
    assert len(summary["loss_mean"]) == 2


def test_items_of_the_wrong_shape_are_refused():
    learner = MemoryAugmentedNetwork(MANNConfig(**SMALL), SinusoidDistribution(), 0)
    with pytest.raises(ValueError, match=r"expected \[num_items, 1\]"):
        learner.adapt(None, RegressionBatch(torch.zeros(1, 5, 1), torch.zeros(1, 5, 1)))
    state = learner.adapt(None, RegressionBatch(torch.zeros(5, 1), torch.zeros(5, 1)))
    with pytest.raises(ValueError, match="query x has shape"):
        learner.predict(state, torch.zeros(5))


def test_support_loss_counts_only_classes_seen_before(omniglot):
    config = MANNConfig(meta_batch_size=2, num_shots=2, num_queries=1, support_loss=True, **SMALL)
    learner = MemoryAugmentedNetwork(config, omniglot, 0)
    mask = learner._seen_before(torch.tensor([[0, 1, 0, 2, 1, 1]]))
    assert mask.tolist() == [[False, False, True, False, True, True]]
    metrics = learner.step(omniglot.sample(2, np.random.default_rng(0)))
    assert (
        np.isfinite(metrics["train/loss"]) and metrics["train/loss"] != metrics["train/query_loss"]
    )
