"""Probabilistic MAML: the prior term and its gradients by hand, the meta-gradient into log σ by
finite differences, the Fisher estimate and the predictive scores against hand arithmetic,
learning on sinusoid and Omniglot, checkpoints, bad settings and the runner."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl.errors import NonFiniteLossError
from metarl.fewshot.maml import GradientLearner, GradientLearnerConfig
from metarl.fewshot.omniglot_tasks import OmniglotDistribution
from metarl.fewshot.predictive import categorical_scores, gaussian_mixture_scores, neg_log_prior
from metarl.fewshot.prob_maml import ProbabilisticMAML, ProbabilisticMAMLConfig
from metarl.fewshot.sinusoid import RegressionBatch, SinusoidDistribution
from metarl.nn import MLP, FunctionalModel

ROOT = Path(__file__).resolve().parents[1]
Z95 = 1.6448536269514722  # standard normal 95% quantile
Z90 = 1.2815515655446004  # standard normal 90% quantile


class TinySinusoid(SinusoidDistribution):
    """The sinusoid tasks with a 1-3-1 tanh network, small and smooth for finite differences."""

    def make_model(self, hidden_sizes: tuple[int, ...] = (3,)) -> FunctionalModel:
        return FunctionalModel(MLP((1, *hidden_sizes, 1), activation="tanh"))


class LinearSinusoid(SinusoidDistribution):
    """A linear model ``f(x) = w x + b``, whose Jacobian is known by hand."""

    def make_model(self, hidden_sizes: tuple[int, ...] = ()) -> FunctionalModel:
        return FunctionalModel(MLP((1, 1)))


def _config(**overrides) -> ProbabilisticMAMLConfig:
    base = dict(
        meta_batch_size=3,
        num_shots=4,
        num_queries=5,
        num_eval_queries=6,
        inner_lr=0.1,
        adapt_steps=2,
        eval_adapt_steps=(0, 2),
        init_prior_std=0.3,
        num_samples=8,
        num_fisher_samples=4,
    )
    return ProbabilisticMAMLConfig(**{**base, **overrides})


def test_prior_term_and_its_gradients_match_hand_arithmetic():
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor([0.5, 2.5], dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64, requires_grad=True)
    value = neg_log_prior({"w": theta}, {"w": mu}, {"w": log_std})
    # (θ−μ)²/(2σ²) + log σ per element: 0.25/2 + 0 and 0.25/8 + log 2.
    assert value.item() == pytest.approx(0.125 + 0.03125 + math.log(2.0), abs=1e-12)
    value.backward()
    assert theta.grad.tolist() == pytest.approx([0.5, -0.125], abs=1e-12)  # (θ − μ)/σ²
    assert mu.grad.tolist() == pytest.approx([-0.5, 0.125], abs=1e-12)
    assert log_std.grad.tolist() == pytest.approx(
        [1 - 0.25, 1 - 0.25 / 4], abs=1e-12
    )  # 1 − (θ−μ)²/σ²


def _double(learner: ProbabilisticMAML) -> None:
    learner.params = {k: v.detach().double().requires_grad_() for k, v in learner.params.items()}
    learner.log_std = {k: v.detach().double().requires_grad_() for k, v in learner.log_std.items()}
    learner.log_noise = learner.log_noise.detach().double()


def _batch(learner: ProbabilisticMAML, seed: int):
    distribution, cfg = learner.distribution, learner.config
    tasks = distribution.sample(cfg.meta_batch_size, np.random.default_rng(seed))
    support, query = distribution.episodes(
        tasks, cfg.num_shots, cfg.num_queries, np.random.default_rng(seed)
    )
    return RegressionBatch(*(t.double() for t in support)), RegressionBatch(
        *(t.double() for t in query)
    )


def _objective(learner, support, query, eps) -> torch.Tensor:
    """The parameters' objective: the meta-loss less the noise NLL (whose predictions are detached)."""
    return learner.meta_loss(support, query, eps)[1][:, 0].mean()


def _log_std_gradient(learner, support, query, eps) -> tuple[dict, dict]:
    """Autograd and central finite-difference gradients of the objective in every log σ element."""
    loss = _objective(learner, support, query, eps)
    auto = dict(
        zip(learner.log_std, torch.autograd.grad(loss, list(learner.log_std.values())), strict=True)
    )
    numeric, h = {}, 1e-5
    with torch.no_grad():
        for name, value in learner.log_std.items():
            numeric[name] = torch.zeros_like(value)
            for i in range(value.numel()):
                flat = value.view(-1)
                flat[i] += h
                up = _objective(learner, support, query, eps)
                flat[i] -= 2 * h
                down = _objective(learner, support, query, eps)
                flat[i] += h
                numeric[name].view(-1)[i] = (up - down) / (2 * h)
    return auto, numeric


@pytest.mark.parametrize("outer_samples", [0, 3])
def test_meta_gradient_into_log_std_matches_finite_differences(outer_samples):
    learner = ProbabilisticMAML(
        _config(outer_samples=outer_samples, learn_noise=False), TinySinusoid(), 0
    )
    _double(learner)
    support, query = _batch(learner, 1)
    gen = torch.Generator().manual_seed(2)
    eps = (
        {
            k: torch.randn((3, outer_samples, *v.shape), generator=gen, dtype=torch.float64)
            for k, v in learner.params.items()
        }
        if outer_samples
        else {}
    )
    auto, numeric = _log_std_gradient(learner, support, query, eps)
    assert max(g.abs().max().item() for g in auto.values()) > 1e-4  # σ really matters here
    for name in auto:
        torch.testing.assert_close(auto[name], numeric[name], rtol=1e-4, atol=1e-8)


def test_one_inner_step_without_samples_leaves_log_std_without_gradient():
    """At θ = μ the prior's gradient vanishes for every σ, so one step cannot depend on σ."""
    learner = ProbabilisticMAML(_config(adapt_steps=1, learn_noise=False), TinySinusoid(), 0)
    _double(learner)
    support, query = _batch(learner, 1)
    loss, _ = learner.meta_loss(support, query, {})
    grads = torch.autograd.grad(
        loss, list(learner.log_std.values()) + list(learner.params.values())
    )
    assert all(torch.all(g == 0) for g in grads[: len(learner.log_std)])
    assert any(torch.any(g != 0) for g in grads[len(learner.log_std) :])


def test_fisher_diagonal_of_a_linear_model_is_twice_the_sum_of_squared_inputs():
    """For P · MSE of f = w x + b the Fisher (Gauss-Newton) diagonal is 2 Σ x² and 2 P."""
    learner = ProbabilisticMAML(_config(), LinearSinusoid(), 0)
    x = torch.tensor([[0.5], [-1.0], [2.0]])
    data = RegressionBatch(x, torch.zeros(3, 1))
    eps = torch.randn((20000, 3, 1), generator=torch.Generator().manual_seed(0))
    fisher = learner._fisher_diagonal(learner.adapt(None, data, 0), data, eps)
    assert fisher["out.weight"].item() == pytest.approx(2 * (0.25 + 1 + 4), rel=0.05)
    assert fisher["out.bias"].item() == pytest.approx(2 * 3, rel=0.05)


def test_loop_and_vmap_batching_give_the_same_step_samples_and_fisher():
    """The loop path (one parameter sample, one Fisher sample at a time) against the vmapped one,
    on the same noise."""
    metrics = []
    for batch in ("vmap", "loop"):
        learner = ProbabilisticMAML(_config(batch=batch, outer_samples=2), SinusoidDistribution(), 0)
        metrics.append(learner.step(learner.distribution.sample(3, np.random.default_rng(1))))
    assert metrics[1] == pytest.approx(metrics[0], rel=1e-5)
    g = torch.Generator().manual_seed(0)
    data = RegressionBatch(torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g))
    theta = learner.adapt(None, data, 1)
    eps = {k: torch.randn(4, *v.shape, generator=g) for k, v in theta.items()}
    fisher_eps = torch.randn(3, 5, 1, generator=g)
    std = learner.posterior_std(theta, learner._detached()[1], data, fisher_eps)
    found = {}
    for batch in ("vmap", "loop"):
        learner.batch = batch
        found[batch] = (
            learner._fisher_diagonal(theta, data, fisher_eps),
            learner._sample_predictions(theta, std, data.x, eps),
        )
    torch.testing.assert_close(found["loop"], found["vmap"])
    assert found["loop"][1].shape == (4, 5, 1) and found["loop"][1].std(0).min() > 0


def test_mixture_scores_of_one_gaussian_by_hand():
    targets = torch.tensor([0.0, 1.6, 1.7, -2.0, 0.5], dtype=torch.float64)
    coverage, width, nll = gaussian_mixture_scores(
        torch.zeros(1, 5, dtype=torch.float64), 1.0, targets
    )
    assert coverage.item() == pytest.approx(3 / 5)  # 1.7 and −2 lie outside ±1.645
    assert width.item() == pytest.approx(2 * Z95, abs=1e-9)
    by_hand = np.mean([0.5 * y**2 + 0.5 * math.log(2 * math.pi) for y in targets.tolist()])
    assert nll.item() == pytest.approx(by_hand, abs=1e-9)


def test_mixture_scores_of_two_narrow_components_by_hand():
    """Samples at ±3 with σ_y = 0.01: the 5% quantile sits where the left part holds 10%."""
    means = torch.tensor([[-3.0] * 5, [3.0] * 5], dtype=torch.float64)
    targets = torch.tensor([-3.02, -3.0, 0.0, 3.01, 3.02], dtype=torch.float64)
    coverage, width, _ = gaussian_mixture_scores(means, 0.01, targets)
    # CDF at the targets: 0.5·Φ(−2) < 0.05, 0.25, 0.5, 0.5 + 0.5·Φ(1) ≈ 0.92, 0.5 + 0.5·Φ(2) > 0.95.
    assert coverage.item() == pytest.approx(3 / 5)
    assert width.item() == pytest.approx(2 * (3 + 0.01 * Z90), abs=1e-9)


def test_categorical_scores_average_probabilities_not_logits():
    logits = torch.log(torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]], dtype=torch.float64))
    accuracy, nll = categorical_scores(logits, torch.tensor([0]))
    assert accuracy.item() == 1.0  # mean probabilities (0.55, 0.45)
    assert nll.item() == pytest.approx(-math.log(0.55), abs=1e-12)


def test_without_samples_one_step_training_is_maml():
    """With one inner step from μ the prior's gradient is zero, so the MAP is MAML's adapted point."""
    distribution = SinusoidDistribution(num_test_tasks=4)
    maml = GradientLearner(GradientLearnerConfig(meta_batch_size=4, outer_lr=0.01), distribution, 0)
    learner = ProbabilisticMAML(
        ProbabilisticMAMLConfig(meta_batch_size=4, outer_lr=0.01, learn_noise=False),
        distribution,
        0,
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        tasks = distribution.sample(4, rng)
        expected = maml.step(tasks)["train/query_loss"]
        assert learner.step(tasks)["train/query_loss"] == pytest.approx(expected, rel=1e-5)
    for name, value in maml.params.items():
        torch.testing.assert_close(learner.params[name], value, rtol=1e-5, atol=1e-6)


def test_meta_loss_decreases_on_sinusoid():
    torch.set_num_threads(1)
    distribution = SinusoidDistribution(num_test_tasks=4)
    config = ProbabilisticMAMLConfig(
        meta_batch_size=5,
        outer_lr=0.01,
        outer_samples=2,
        init_prior_std=0.03,
        num_samples=10,
        eval_adapt_steps=(0, 1, 5),
        uncertainty="prior",
    )
    learner = ProbabilisticMAML(config, distribution, 0)
    tasks = distribution.sample(5, np.random.default_rng(3))
    metrics = [learner.step(tasks) for _ in range(80)]
    losses = [m["train/query_loss"] for m in metrics]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses
    assert metrics[-1]["train/mean_prior_std"] != pytest.approx(0.03, abs=1e-4)  # σ learns
    assert metrics[-1]["train/noise_std"] > 0.5  # residuals are larger than the initial σ_y
    result = learner.evaluate(distribution.test_tasks(), np.random.default_rng(0))
    assert result["adaptation_steps"] == [0, 1, 5] and result["accuracy"] is None
    for key in ("loss", "coverage90", "interval_width90", "nll"):
        assert result[key].shape == (4, 3) and np.isfinite(result[key]).all(), key
    assert ((result["coverage90"] >= 0) & (result["coverage90"] <= 1)).all()
    assert (result["interval_width90"] > 0).all()


@pytest.mark.slow  # about 20 s, mostly loading Omniglot and building its episode samplers
def test_omniglot_steps_and_laplace_evaluation(shared_data_dir):
    distribution = OmniglotDistribution(
        num_ways=5, data_dir=str(shared_data_dir), subset="minimal", channels=8, num_test_tasks=2
    )
    config = ProbabilisticMAMLConfig(
        meta_batch_size=2,
        num_shots=1,
        num_queries=3,
        num_eval_queries=3,
        inner_lr=0.4,
        outer_lr=0.03,
        init_prior_std=0.01,
        eval_adapt_steps=(0, 1),
        num_samples=4,
        num_fisher_samples=2,
        uncertainty="laplace",
    )
    learner = ProbabilisticMAML(config, distribution, 0)
    assert not learner.regression and learner.num_outputs == 5
    tasks = distribution.sample(2, np.random.default_rng(3))
    losses = [learner.step(tasks)["train/query_loss"] for _ in range(10)]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    result = learner.evaluate(distribution.test_tasks(), np.random.default_rng(0))
    for key in ("loss", "accuracy", "predictive_accuracy", "nll"):
        assert result[key].shape == (2, 2) and np.isfinite(result[key]).all(), key
    assert ((result["predictive_accuracy"] >= 0) & (result["predictive_accuracy"] <= 1)).all()


def test_checkpoint_round_trip_gives_identical_next_metrics():
    distribution = SinusoidDistribution(num_test_tasks=3)
    config = ProbabilisticMAMLConfig(meta_batch_size=4, outer_samples=2, num_samples=5)
    learner = ProbabilisticMAML(config, distribution, 0)
    rng = np.random.default_rng(0)
    for _ in range(2):
        learner.step(distribution.sample(4, rng))
    state = copy.deepcopy(learner.state_dict())
    tasks = distribution.sample(4, rng)
    expected = learner.step(tasks)
    restored = ProbabilisticMAML(config, distribution, 7)
    restored.load_state_dict(state)
    assert restored.step(tasks) == expected
    for name, value in learner.log_std.items():
        assert torch.equal(value, restored.log_std[name])


def test_non_finite_meta_loss_raises_before_parameters_change():
    learner = ProbabilisticMAML(_config(), TinySinusoid(), 0)
    with torch.no_grad():
        learner.params["out.bias"].fill_(float("nan"))
    before = {k: v.detach().clone() for k, v in {**learner.params, **learner.log_std}.items()}
    tasks = learner.distribution.sample(3, np.random.default_rng(0))
    with pytest.raises(NonFiniteLossError, match="parameters unchanged"):
        learner.step(tasks)
    for name, value in {**learner.params, **learner.log_std}.items():
        assert torch.equal(value, before[name]) or torch.isnan(before[name]).all(), name


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(uncertainty="ensemble"), "uncertainty must be one of"),
        (dict(outer_samples=2, kl_weight=0.0), "kl_weight > 0"),
        (dict(num_samples=1), "num_samples must be >= 2"),
        (dict(init_prior_std=0.0), "init_prior_std must be > 0"),
        (dict(prior_weight=0.0), "needs prior_weight > 0"),
        (dict(outer_samples=-1), "outer_samples must be >= 0"),
        (dict(eval_adapt_steps=()), "eval_adapt_steps"),
        (dict(adapt_steps=0), "adapt_steps must be >= 1"),
    ],
)
def test_bad_settings_are_refused_with_the_remedy(overrides, match):
    with pytest.raises(ValueError, match=match):
        ProbabilisticMAMLConfig(**overrides)


def test_runner_trains_and_evaluates_the_sinusoid_config(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(ROOT)
    sets = [
        "run.num_iterations=2",
        "run.log_every=1",
        "run.eval_at_end=false",
        "tasks.num_test_tasks=3",
        "agent.num_samples=5",
    ]
    args = [
        "run",
        "experiments/sinusoid_probmaml.toml",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    cli(*args, *(item for s in sets for item in ("--set", s)))
    summary = json.loads(cli("eval", str(tmp_path / "r")).strip().splitlines()[-1])
    assert summary["adaptation_steps"] == [0, 1, 2, 3, 5, 10]
    for key in ("loss_mean", "coverage90_mean", "interval_width90_mean", "nll_mean"):
        assert len(summary[key]) == 6, key
