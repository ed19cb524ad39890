"""The learned inner optimizer: SGD equivalence at its initialisation, the published gradient
preprocessing by hand, vmap against a loop, meta-gradients against finite differences, learning
on sinusoid and on a tiny Omniglot stream, checkpoints, config checks and the runner."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import mse, task_data, tiny_mlp

from metarl.adaptation import adapt, meta_objective
from metarl.errors import NonFiniteLossError
from metarl.fewshot.learned_opt import (
    CoordinateLSTM,
    LearnedOptimizerConfig,
    LearnedOptimizerLearner,
    init_rule_params,
    preprocess,
)
from metarl.fewshot.omniglot_tasks import OmniglotDistribution
from metarl.fewshot.sinusoid import SinusoidDistribution

ROOT = Path(__file__).resolve().parents[1]


def rule_params(hidden_size=4, num_layers=2, lstm_output=0.0, seed=0):
    """SGD-initialised rule params in float64; ``lstm_output`` > 0 switches the LSTM path on."""
    params = {
        k: v.double() for k, v in init_rule_params(hidden_size, num_layers, 4, 0.3, seed).items()
    }
    if lstm_output:
        g = torch.Generator().manual_seed(seed + 1)
        params["out.weight"] = lstm_output * torch.randn(
            hidden_size, generator=g, dtype=torch.float64
        )
        params["out.bias"] = torch.tensor(0.05, dtype=torch.float64)
    return params


def test_preprocessing_matches_the_published_formula_by_hand():
    # p = 10: |g| >= e^-10 ≈ 4.54e-5 gives (log|g| / 10, sign g), smaller gives (-1, e^10 g).
    g = torch.tensor([0.5, -3.0, 1e-6, -2e-5, 0.0], dtype=torch.float64)
    expected = [
        [-0.0693147181, 1.0],  # ln 0.5 = -0.693147
        [0.1098612289, -1.0],  # ln 3 = 1.098612
        [-1.0, 0.0220264658],  # e^10 = 22026.4658
        [-1.0, -0.4405293160],
        [-1.0, 0.0],
    ]
    torch.testing.assert_close(preprocess(g), torch.tensor(expected, dtype=torch.float64))
    # Another p moves the threshold: e^-2 ≈ 0.135 so 0.1 is now "small".
    assert preprocess(torch.tensor([0.1]), p=2.0).tolist()[0] == pytest.approx(
        [-1.0, 0.1 * math.e**2]
    )


@pytest.mark.parametrize("scale, grad_weight", [(0.3, -1.0), (1.0, -0.3)])
def test_rule_initialised_to_sgd_equals_the_sgd_adaptation(scale, grad_weight):
    """Same params after several steps and the same meta-gradient w.r.t. the initialisation."""
    model, params = tiny_mlp()
    loss_fn = mse(model)
    (xs, ys), (xq, yq) = task_data(0, 1), task_data(1, 1)
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    rules = rule_params()  # random LSTM weights; zero weight from the LSTM to the output
    rules["out.grad_weight"] = torch.tensor(grad_weight, dtype=torch.float64)
    rule = CoordinateLSTM(rules, scale)
    sgd = adapt(loss_fn, params, support, steps=4, lr=0.3)
    learned = adapt(loss_fn, params, support, steps=4, update=rule)
    for k in params:
        assert torch.equal(learned[k], sgd[k]), k
    meta_grads = []
    for update in (None, rule):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        adapted = adapt(loss_fn, leaves, support, steps=4, lr=0.3, update=update)
        meta_grads.append(torch.autograd.grad(loss_fn(adapted, query), list(leaves.values())))
    for a, b in zip(*meta_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # The test can tell rules apart: switching on the LSTM path changes the result.
    other = adapt(
        loss_fn, params, support, 4, update=CoordinateLSTM(rule_params(lstm_output=1.0), scale)
    )
    assert not torch.equal(other["fc0.weight"], sgd["fc0.weight"])


def test_rule_step_equals_torch_lstm_run_on_each_coordinate():
    """Two steps of the rule against ``torch.nn.LSTM`` (gate order i, f, g, o) fed one coordinate
    per batch row: the same update ``α (w_h · h + b + w_g · g)`` and the same carried state."""
    hidden, scale = 5, 0.3
    rules = rule_params(hidden_size=hidden, lstm_output=1.0, seed=3)
    rules["out.grad_weight"] = torch.tensor(-0.7, dtype=torch.float64)
    reference = torch.nn.LSTM(4, hidden, num_layers=2).double()
    with torch.no_grad():
        for layer in range(2):
            getattr(reference, f"weight_ih_l{layer}").copy_(rules[f"lstm.{layer}.weight_ih"])
            getattr(reference, f"weight_hh_l{layer}").copy_(rules[f"lstm.{layer}.weight_hh"])
            getattr(reference, f"bias_ih_l{layer}").copy_(rules[f"lstm.{layer}.bias"])
            getattr(reference, f"bias_hh_l{layer}").zero_()
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.zeros(4).double()}
    rule, state, ref_state = CoordinateLSTM(rules, scale), None, None
    for step, loss in enumerate((torch.tensor(0.8).double(), torch.tensor(3e-6).double())):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        flat = torch.cat([grads["a"].reshape(-1), grads["b"]])  # coordinates in params' order
        inputs = torch.cat([preprocess(flat), preprocess(loss).expand(10, 2)], dim=1)
        out, ref_state = reference(inputs.unsqueeze(0), ref_state)  # sequence of 1, batch 10
        expected = scale * (out[0] @ rules["out.weight"] + rules["out.bias"] - 0.7 * flat)
        new, state = rule(params, grads, loss, step, state)
        got = torch.cat([(new["a"] - params["a"]).reshape(-1), new["b"] - params["b"]])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state[1][0].T, ref_state[0][1])  # top layer's hidden state
        params = new


def test_rule_state_is_carried_across_steps():
    """Step 2 of one unroll differs from a fresh step 1 at the same point (hidden state matters)."""
    model, params = tiny_mlp()
    xs, ys = task_data(0, 1)
    rule = CoordinateLSTM(rule_params(lstm_output=1.0), 0.3)
    loss_fn = mse(model)
    two = adapt(loss_fn, params, (xs[0], ys[0]), 2, update=rule)
    restarted = adapt(
        loss_fn,
        adapt(loss_fn, params, (xs[0], ys[0]), 1, update=rule),
        (xs[0], ys[0]),
        1,
        update=rule,
    )
    assert not torch.allclose(two["fc0.weight"], restarted["fc0.weight"])


def test_rule_under_vmap_equals_a_loop_in_value_and_meta_gradient():
    model, params = tiny_mlp()
    support, query = task_data(0, 3), task_data(1, 3)
    results = []
    for batch in ("vmap", "loop"):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        rules = {k: v.clone().requires_grad_() for k, v in rule_params(lstm_output=1.0).items()}
        losses = meta_objective(
            mse(model),
            leaves,
            support,
            query,
            steps=3,
            batch=batch,
            update=CoordinateLSTM(rules, 0.3),
        )
        wrt = list(leaves.values()) + list(rules.values())
        results.append((losses, torch.autograd.grad(losses.mean(), wrt)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["lstm.0.weight_ih", "lstm.1.weight_hh", "out.grad_weight"])
def test_meta_gradient_wrt_rule_weights_matches_finite_differences(name):
    model, params = tiny_mlp()
    support, query = task_data(0, 3), task_data(1, 3)
    base = rule_params(hidden_size=3, lstm_output=1.0)

    def meta_loss(rules):
        update = CoordinateLSTM(rules, 0.3)
        return meta_objective(mse(model), params, support, query, steps=3, update=update).mean()

    leaves = {k: v.clone().requires_grad_() for k, v in base.items()}
    (analytic,) = torch.autograd.grad(meta_loss(leaves), [leaves[name]])
    assert analytic.abs().max() > 1e-6  # a gradient that is really there
    eps, numeric = 1e-6, torch.zeros_like(analytic)
    for i in range(analytic.numel()):
        plus = {k: v.clone() for k, v in base.items()}
        minus = {k: v.clone() for k, v in base.items()}
        plus[name].view(-1)[i] += eps
        minus[name].view(-1)[i] -= eps
        numeric.view(-1)[i] = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_evaluation_scores_equal_separate_unrolls_beyond_the_training_length():
    dist = SinusoidDistribution(num_test_tasks=3)
    config = LearnedOptimizerConfig(
        adapt_steps=2, eval_adapt_steps=(0, 1, 4), num_eval_queries=7, hidden_size=4, num_layers=1
    )
    learner = LearnedOptimizerLearner(config, dist, seed=0)
    with torch.no_grad():
        learner.rule_params["out.weight"].fill_(0.5)  # make the LSTM part of the rule
    tasks = dist.test_tasks()
    result = learner.evaluate(tasks, np.random.default_rng(4))
    support, query = dist.episodes(tasks, config.num_shots, 7, np.random.default_rng(4))
    for i in range(len(tasks)):
        s, q = type(support)(*(t[i] for t in support)), type(query)(*(t[i] for t in query))
        for j, steps in enumerate((0, 1, 4)):
            adapted = learner.adapt(tasks[i], s, steps=steps)
            expected = dist.loss(learner.model(adapted, q.x), q).item()
            assert result["loss"][i, j] == pytest.approx(expected, rel=1e-5)
    assert result["adaptation_steps"] == [0, 1, 4] and result["accuracy"] is None


def _small_sinusoid_learner(dist, **changes):
    config = LearnedOptimizerConfig(
        meta_batch_size=10,
        adapt_steps=2,
        hidden_size=8,
        num_layers=1,
        eval_adapt_steps=(0, 2),
        **changes,
    )
    return LearnedOptimizerLearner(config, dist, seed=0)


def test_loss_decreases_on_sinusoid():
    torch.set_num_threads(1)
    dist = SinusoidDistribution(num_test_tasks=40)
    learner = _small_sinusoid_learner(dist, outer_lr=0.01)
    before = learner.evaluate(dist.test_tasks(), np.random.default_rng(1))["loss"].mean(0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        learner.step(dist.sample(10, rng))
    after = learner.evaluate(dist.test_tasks(), np.random.default_rng(1))["loss"].mean(0)
    assert after[1] < 0.8 * before[1], (before, after)


def test_loss_decreases_on_a_fixed_tiny_omniglot_stream(shared_data_dir):
    dist = OmniglotDistribution(
        num_ways=5, data_dir=str(shared_data_dir), subset="minimal", channels=8, num_test_tasks=4
    )
    config = LearnedOptimizerConfig(
        meta_batch_size=2,
        num_shots=1,
        num_queries=3,
        num_eval_queries=3,
        inner_lr=0.4,
        adapt_steps=2,
        eval_adapt_steps=(0, 1, 3),
        outer_lr=0.03,
        hidden_size=8,
    )
    learner = LearnedOptimizerLearner(config, dist, seed=0)
    tasks = dist.sample(2, np.random.default_rng(3))
    losses = [learner.step(tasks)["train/query_loss"] for _ in range(15)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    scores = learner.evaluate(dist.test_tasks(), np.random.default_rng(0))
    assert (
        scores["accuracy"].shape == (4, 3)
        and ((scores["accuracy"] >= 0) & (scores["accuracy"] <= 1)).all()
    )


def test_checkpoint_round_trip_resumes_exactly():
    dist = SinusoidDistribution(num_test_tasks=4)
    rng = np.random.default_rng(0)
    batches = [dist.sample(10, rng) for _ in range(3)]
    first = _small_sinusoid_learner(dist)
    for tasks in batches[:2]:
        first.step(tasks)
    resumed = _small_sinusoid_learner(dist)
    resumed.load_state_dict(first.state_dict())
    assert first.step(batches[2]) == resumed.step(batches[2])
    for attr in ("params", "rule_params"):
        for k, v in getattr(first, attr).items():
            assert torch.equal(v, getattr(resumed, attr)[k]), k


def test_non_finite_meta_loss_raises_and_leaves_parameters_unchanged():
    dist = SinusoidDistribution(num_test_tasks=4)
    learner = _small_sinusoid_learner(dist)
    before = {k: v.detach().clone() for k, v in {**learner.params, **learner.rule_params}.items()}

    def nan_loss(params, data):
        return dist.loss(learner.model(params, data.x), data) * float("nan")

    learner.loss_fn = nan_loss
    with pytest.raises(NonFiniteLossError, match="parameters unchanged"):
        learner.step(dist.sample(10, np.random.default_rng(0)))
    for k, v in {**learner.params, **learner.rule_params}.items():
        assert torch.equal(v, before[k]), k
    assert not learner.optimizer.state  # Adam took no step


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"adapt_steps": 0}, "adapt_steps must be >= 1"),
        ({"hidden_size": 0}, "hidden_size must be >= 1"),
        ({"inner_lr": -0.1}, "learning rates must be > 0"),
        ({"preprocess_p": 0.0}, "preprocess_p > 0"),
        ({"eval_adapt_steps": (0, -1)}, "non-negative step counts"),
        ({"batch": "threads"}, "batch must be"),
        ({"device": "tpu0"}, "not a torch device"),
    ],
)
def test_config_rejects_bad_settings(changes, match):
    with pytest.raises(ValueError, match=match):
        LearnedOptimizerConfig(**changes)


def test_update_rule_missing_a_key_is_reported():
    model, params = tiny_mlp()
    xs, ys = task_data(0, 1)

    def drops_bias(p, g, loss, step, state):
        return {k: v for k, v in p.items() if "bias" not in k}, state

    with pytest.raises(KeyError, match="no new value"):
        adapt(mse(model), params, (xs[0], ys[0]), 1, update=drops_bias)


@pytest.mark.parametrize("config", ["sinusoid_learnedopt", "omniglot_learnedopt"])
def test_runner_trains_and_evaluates(tmp_path, monkeypatch, request, config, cli):
    if config.startswith("omniglot"):
        request.getfixturevalue("shared_data_dir")  # fails clearly when the data is missing
    monkeypatch.chdir(ROOT)
    tiny = [
        "run.num_iterations=2",
        "run.log_every=1",
        "run.checkpoint_every=2",
        "run.eval_at_end=false",
        "tasks.num_test_tasks=3",
        "agent.meta_batch_size=2",
        "agent.hidden_size=4",
        "agent.adapt_steps=2",
    ]
    if config.startswith("omniglot"):
        tiny += ["tasks.channels=8"]
    args = ["run", f"experiments/{config}.toml", "--out", str(tmp_path / "r"), "--no-progress"]
    cli(*args, *(item for s in tiny for item in ("--set", s)))
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads(cli("eval", str(tmp_path / "r")).strip().splitlines()[-1])
    expected = [0, 1, 2, 3, 5, 10] if config.startswith("sinusoid") else [0, 1, 3, 5, 10]
    assert summary["adaptation_steps"] == expected and summary["num_tasks"] == 3


def test_vmap_and_loop_learners_take_the_same_step():
    dist = SinusoidDistribution(num_test_tasks=4)
    vmapped = _small_sinusoid_learner(dist, batch="vmap")
    looped = LearnedOptimizerLearner(dataclasses.replace(vmapped.config, batch="loop"), dist, 0)
    tasks = dist.sample(10, np.random.default_rng(2))
    assert vmapped.step(tasks)["train/query_loss"] == pytest.approx(
        looped.step(tasks)["train/query_loss"], rel=1e-5
    )
    for k, v in vmapped.rule_params.items():
        torch.testing.assert_close(v, looped.rule_params[k], rtol=1e-4, atol=1e-6)
