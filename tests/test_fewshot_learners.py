"""Omniglot few-shot learners: the task distribution, ProtoNets and Matching Nets scores against hand
arithmetic, learning on a tiny fixed episode stream, the official-run scorer path and the runner."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metarl.fewshot.episodes import shift_images
from metarl.fewshot.maml import GradientLearner, GradientLearnerConfig
from metarl.fewshot.matchingnet import MatchingNetwork, cosine_attention, matching_logits
from metarl.fewshot.omniglot_runs import OfficialRun, load_official_runs
from metarl.fewshot.omniglot_tasks import OmniglotDistribution, official_runs_error
from metarl.fewshot.protonet import (
    MetricLearnerConfig,
    PrototypicalNetwork,
    prototype_logits,
    shifted,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = 8  # conv4 filters in the learning tests


@pytest.fixture
def omniglot(shared_data_dir) -> OmniglotDistribution:
    return OmniglotDistribution(
        num_ways=5, data_dir=str(shared_data_dir), subset="minimal", channels=TINY, num_test_tasks=6
    )


def test_prototype_logits_are_negative_squared_distances_to_class_means():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])  # class means (1, 0) and (0, 2)
    query = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    expected = torch.tensor([[-(0 + 1), -(1 + 1)], [-(4 + 0), -(9 + 4)]])
    assert torch.allclose(prototype_logits(support, labels, query, 2), expected.float(), atol=1e-5)


def test_matching_attention_is_softmax_of_cosine_similarities():
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    query = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    cosines = [[1.0, 0.0, 1 / math.sqrt(2)], [-1 / math.sqrt(2), -1 / math.sqrt(2), -1.0]]
    for row, sims in zip(cosine_attention(support, query), cosines, strict=True):
        total = sum(math.exp(s) for s in sims)
        assert row.tolist() == pytest.approx([math.exp(s) / total for s in sims], abs=1e-6)
    labels = torch.tensor([0, 1, 0])
    sims = cosines[0]
    total = sum(math.exp(s) for s in sims)
    by_hand = [
        math.log((math.exp(sims[0]) + math.exp(sims[2])) / total),
        math.log(math.exp(sims[1]) / total),
    ]
    assert matching_logits(support, labels, query, 2)[0].tolist() == pytest.approx(
        by_hand, abs=1e-6
    )


def test_matching_scale_multiplies_the_cosines_before_the_softmax():
    support = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    query = torch.tensor([[3.0, 0.0]])  # cosines 1 and 0
    normaliser = math.log(math.exp(4.0) + 1.0)
    logits = matching_logits(support, torch.tensor([0, 1]), query, 2, scale=4.0)
    assert logits[0].tolist() == pytest.approx([4.0 - normaliser, -normaliser], abs=1e-6)


def test_matching_network_learns_its_scale_and_keeps_it_in_checkpoints(omniglot):
    config = MatchingNetwork.Config(num_queries=3, cosine_scale=10.0, learn_scale=True)
    learner = MatchingNetwork(config, omniglot, 0)
    assert learner.scale == pytest.approx(10.0)
    metrics = learner.step(omniglot.sample(1, np.random.default_rng(0)))
    assert metrics["train/cosine_scale"] != pytest.approx(10.0, abs=1e-7)
    copy = MatchingNetwork(config, omniglot, 1)
    copy.load_state_dict(learner.state_dict())
    assert copy.scale == pytest.approx(learner.scale, abs=1e-9)
    fixed = MatchingNetwork(MatchingNetwork.Config(num_queries=3, cosine_scale=2.0), omniglot, 0)
    fixed.step(omniglot.sample(1, np.random.default_rng(0)))
    assert fixed.scale == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cosine_scale"):
        MatchingNetwork.Config(cosine_scale=0.0)


def test_tasks_fix_their_episodes_and_the_held_out_set(omniglot):
    tasks = omniglot.sample(3, np.random.default_rng(0))
    assert tasks == omniglot.sample(3, np.random.default_rng(0))
    assert json.loads(tasks[0].to_json())["params"]["split"] == "train"
    support, query = omniglot.episodes(tasks, 2, 3, np.random.default_rng(1))
    again, _ = omniglot.episodes(tasks, 2, 3, np.random.default_rng(2))
    assert support.x.shape == (3, 10, 1, 28, 28) and support.y.shape == (3, 10)
    assert query.x.shape == (3, 15, 1, 28, 28) and query.y.tolist()[0] == sorted(
        query.y.tolist()[0]
    )
    assert torch.equal(support.x, again.x)
    assert [t["index"] for t in omniglot.test_tasks()] == list(range(6))
    assert {t["split"] for t in omniglot.test_tasks()} == {"test"}
    assert {t["num_ways"] for t in omniglot.test_tasks(num_ways=20)} == {20}


def test_gradient_learners_refuse_a_wider_training_episode(shared_data_dir):
    distribution = OmniglotDistribution(
        num_ways=5, train_ways=20, data_dir=str(shared_data_dir), channels=TINY
    )
    with pytest.raises(ValueError, match="train_ways=20"):
        distribution.make_model()


def _learner(name: str, distribution: OmniglotDistribution):
    if name in ("protonet", "matchingnet"):
        cls = PrototypicalNetwork if name == "protonet" else MatchingNetwork
        return cls(cls.Config(num_shots=1, num_queries=3, outer_lr=0.01), distribution, 0)
    reptile = name == "reptile"
    config = GradientLearnerConfig(
        method=name,
        meta_batch_size=2,
        num_shots=1,
        num_queries=3,
        num_eval_queries=3,
        inner_lr=0.1 if reptile else 0.4,
        adapt_steps=3 if reptile else 1,
        eval_adapt_steps=(0, 1),
        outer_lr=0.5 if reptile else 0.03,
    )
    return GradientLearner(config, distribution, 0)


@pytest.mark.parametrize(
    "name", ["maml", "fomaml", "metasgd", "anil", "reptile", "protonet", "matchingnet"]
)
def test_loss_decreases_on_a_fixed_tiny_episode_stream(omniglot, name):
    learner = _learner(name, omniglot)
    tasks = omniglot.sample(learner.config.meta_batch_size, np.random.default_rng(3))
    losses = [learner.step(tasks)["train/query_loss"] for _ in range(15)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("batch", ["loop", "vmap"])
def test_anil_on_cached_features_matches_adapting_the_head_inside_the_whole_model(omniglot, batch):
    """ANIL runs conv4's body once per set of images and steps the head alone. The reference is
    the generic path (every inner step runs the whole model, only the head's names adapted): the
    meta-loss, its gradients and the held-out scores after 0, 1 and 3 steps must be the same."""
    config = GradientLearnerConfig(
        method="anil", meta_batch_size=2, num_shots=2, num_queries=3, num_eval_queries=3,
        inner_lr=0.4, adapt_steps=2, eval_adapt_steps=(0, 1, 3), outer_lr=0.03, batch=batch,
    )
    fast, reference = GradientLearner(config, omniglot, 0), GradientLearner(config, omniglot, 0)
    reference.split = None
    assert fast.split is not None and sorted(fast.split.names) == sorted(fast.names)
    held_out = omniglot.test_tasks()[:3]
    scored = [learner.evaluate(held_out, np.random.default_rng(5)) for learner in (fast, reference)]
    np.testing.assert_allclose(scored[0]["loss"], scored[1]["loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(scored[0]["accuracy"], scored[1]["accuracy"])
    assert not np.allclose(scored[1]["loss"][:, 0], scored[1]["loss"][:, 2])  # the steps did move it
    tasks = omniglot.sample(2, np.random.default_rng(3))
    losses = [learner.step(tasks)["train/query_loss"] for learner in (fast, reference)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # float32 noise, judged against the largest gradient: a conv bias before batch norm has a true
    # gradient of 0, so its entries are noise in both paths (about 1e-6 apart)
    scale = max(p.grad.abs().max().item() for p in reference.params.values())
    for name, p in fast.params.items():
        assert p.grad is not None and reference.params[name].grad is not None
        torch.testing.assert_close(
            p.grad, reference.params[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=name
        )
    assert fast.params["encoder.0.0.weight"].grad.abs().sum() > 0  # second order reaches the body


def test_conv4_equals_the_textbook_block_order_in_values_and_meta_gradients():
    """Conv4 pools before its ReLU; the textbook block (conv, batch norm, ReLU, max-pool) is the
    same function: the same logits, and the same second-order MAML meta-gradient, bit for bit."""
    from metarl.adaptation import meta_objective
    from metarl.nn import Conv4

    model = Conv4(num_classes=5, channels=8)
    textbook = copy.deepcopy(model)
    for block in textbook.encoder[:4]:
        assert isinstance(block[2], torch.nn.MaxPool2d) and isinstance(block[3], torch.nn.ReLU)
        block[2], block[3] = block[3], block[2]
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(3, 5, 1, 28, 28, generator=g), torch.randn(3, 10, 1, 28, 28, generator=g)
    ys, yq = torch.arange(5).expand(3, 5), torch.arange(5).repeat(2).expand(3, 10)
    assert torch.equal(model(xq[0]), textbook(xq[0]))
    grads = []
    for net in (model, textbook):
        params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}

        def loss_fn(prm, data, net=net):
            return F.cross_entropy(torch.func.functional_call(net, prm, (data[0],)), data[1])

        meta_objective(loss_fn, params, (xs, ys), (xq, yq), 2, 0.4, batch="loop").mean().backward()
        grads.append({k: v.grad for k, v in params.items()})
    assert grads[0]["encoder.0.0.weight"].abs().sum() > 0
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_a_model_splits_into_body_and_head_only_where_it_says_how():
    from torch import nn

    from metarl.nn import MLP, Conv4, FunctionalModel

    x = torch.randn(7, 1, 28, 28)
    for model, inputs in ((FunctionalModel(MLP((1, 6, 6, 2))), x[:, 0, 0, :1]),
                          (FunctionalModel(Conv4(3, channels=4)), x)):
        params = model.init_params(0)
        split = model.split(params)
        assert split is not None and sorted(split.names) == sorted(model.head_names(params))
        head = {k: params[k] for k in split.names}  # the head reads no other entry
        torch.testing.assert_close(split.head(head, split.features(params, inputs)), model(params, inputs))
    plain = FunctionalModel(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert plain.split(plain.init_params(0)) is None


def test_metric_learners_train_wider_than_they_test(shared_data_dir):
    distribution = OmniglotDistribution(
        num_ways=5, train_ways=12, data_dir=str(shared_data_dir), channels=TINY, num_test_tasks=4
    )
    learner = PrototypicalNetwork(MetricLearnerConfig(), distribution, 0)
    tasks = distribution.sample(1, np.random.default_rng(0))
    assert tasks[0]["num_ways"] == 12
    learner.step(tasks)
    result = learner.evaluate(distribution.test_tasks(), np.random.default_rng(0))
    assert result["adaptation_steps"] == [0]
    assert result["accuracy"].shape == (4, 1) and result["loss"].shape == (4, 1)


def test_protonet_nearest_prototype_is_exact_on_copied_training_images(shared_data_dir):
    distribution = OmniglotDistribution(data_dir=str(shared_data_dir), channels=64)
    learner = PrototypicalNetwork(MetricLearnerConfig(), distribution, 0)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    runs = [
        OfficialRun(r.name, r.train_x, r.train_x[perm], perm)
        for r in load_official_runs(shared_data_dir)[:3]
    ]
    result = official_runs_error(learner, runs)
    assert result["error_per_run"] == [0.0, 0.0, 0.0] and result["mean_error"] == 0.0


@pytest.mark.parametrize("dy,dx", [(0, 0), (2, -1), (-3, 3)])
def test_shifted_images_match_the_sampler_augmentation(dy, dx):
    images = torch.rand(4, 1, 9, 7)
    reference = shift_images(images[:, 0].numpy(), np.array([[dy, dx]] * 4))
    assert torch.equal(shifted(images, dy, dx)[:, 0], torch.from_numpy(reference))


def _shifted_embeddings(learner, images: torch.Tensor) -> list[torch.Tensor]:
    """The learner's embeddings of ``images`` moved by every offset in {-1, 0, 1}², built with the
    sampler's shift (independent of the learner's own)."""
    params = {k: v.detach() for k, v in learner.params.items()}
    with torch.no_grad():
        return [
            learner.model(params, torch.from_numpy(
                shift_images(images[:, 0].numpy(), np.array([[dy, dx]] * len(images)))
            )[:, None])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]


def test_classify_with_shifts_averages_the_embeddings_of_every_shifted_view(shared_data_dir):
    distribution = OmniglotDistribution(data_dir=str(shared_data_dir), channels=TINY)
    learner = PrototypicalNetwork(MetricLearnerConfig(), distribution, 0)
    support, query = distribution.episodes(distribution.test_tasks()[:1], 1, 2)
    views = _shifted_embeddings(learner, torch.cat([support.x[0], query.x[0]]))
    mean = torch.stack(views).mean(0)
    by_hand = prototype_logits(mean[:5], support.y[0], mean[5:], 5).argmax(-1)
    assert torch.equal(learner.classify(support.x[0], support.y[0], query.x[0], shift=1), by_hand)
    plain = prototype_logits(views[4][:5], support.y[0], views[4][5:], 5).argmax(-1)
    assert torch.equal(learner.classify(support.x[0], support.y[0], query.x[0]), plain)


def test_class_scores_with_turned_views_average_the_embeddings_of_every_view(shared_data_dir):
    # The 90° view is np.rot90 of each image (counter-clockwise), which needs no interpolation, so
    # the embeddings can be built by hand; each turned view is also shifted by every offset.
    distribution = OmniglotDistribution(data_dir=str(shared_data_dir), channels=TINY)
    learner = PrototypicalNetwork(MetricLearnerConfig(), distribution, 0)
    support, query = distribution.episodes(distribution.test_tasks()[:1], 1, 2)
    images = torch.cat([support.x[0], query.x[0]])
    turned = torch.from_numpy(np.rot90(images.numpy(), 1, axes=(2, 3)).copy())
    views = _shifted_embeddings(learner, images) + _shifted_embeddings(learner, turned)
    mean = torch.stack(views).mean(0)
    by_hand = prototype_logits(mean[:5], support.y[0], mean[5:], 5)
    scores = learner.class_scores(
        support.x[0], support.y[0], query.x[0], shift=1, affine=((0.0, 1.0), (90.0, 1.0))
    )
    assert torch.allclose(scores, by_hand, atol=1e-4)
    only_turned = torch.stack(views[9:]).mean(0)
    assert torch.allclose(
        learner.class_scores(support.x[0], support.y[0], query.x[0], 1, ((90.0, 1.0),)),
        prototype_logits(only_turned[:5], support.y[0], only_turned[5:], 5),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="at least one"):
        learner.class_scores(support.x[0], support.y[0], query.x[0], 0, ())


def test_official_runs_with_shifted_views_name_them_and_stay_exact_on_copies(shared_data_dir):
    distribution = OmniglotDistribution(data_dir=str(shared_data_dir), channels=TINY)
    learner = PrototypicalNetwork(MetricLearnerConfig(official_run_shift=1), distribution, 0)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    runs = [
        OfficialRun(r.name, r.train_x, r.train_x[perm], perm)
        for r in load_official_runs(shared_data_dir)[:2]
    ]
    result = official_runs_error(learner, runs)
    assert result["mean_error"] == 0.0 and "9 shifts" in result["protocol"]
    with pytest.raises(ValueError, match="official_run_shift"):
        MetricLearnerConfig(official_run_shift=-1)


@pytest.mark.parametrize("num_ways", [5, 20])
def test_gradient_learner_official_runs_use_a_20_way_head(shared_data_dir, num_ways):
    distribution = OmniglotDistribution(
        num_ways=num_ways, data_dir=str(shared_data_dir), channels=TINY
    )
    learner = _learner("maml", distribution)
    result = official_runs_error(learner, load_official_runs(shared_data_dir)[:2], head_steps=5)
    assert result["num_runs"] == 2 and all(0 <= e <= 100 for e in result["error_per_run"])
    assert ("zero-initialised 20-way head" in result["protocol"]) == (num_ways != 20)


@pytest.mark.parametrize("config", ["omniglot_protonet", "omniglot_maml"])
def test_runner_trains_and_evaluates_omniglot(tmp_path, monkeypatch, config, cli):
    monkeypatch.chdir(ROOT)
    tiny = [
        "run.num_iterations=3",
        "run.log_every=1",
        "run.checkpoint_every=3",
        "run.eval_at_end=false",
        "tasks.channels=8",
        "tasks.num_test_tasks=4",
    ]
    tiny += (
        ["tasks.train_ways=10"] if config == "omniglot_protonet" else ["agent.meta_batch_size=2"]
    )
    args = ["run", f"experiments/{config}.toml", "--out", str(tmp_path / "r"), "--no-progress"]
    cli(*args, *(item for s in tiny for item in ("--set", s)))
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    summary = json.loads(cli("eval", str(tmp_path / "r")).strip().splitlines()[-1])
    steps = summary["adaptation_steps"]
    assert steps == ([0] if config == "omniglot_protonet" else [0, 1, 3, 5, 10])
    assert len(summary["accuracy_mean"]) == len(steps) and all(
        0 <= a <= 1 for a in summary["accuracy_mean"]
    )
    assert summary["num_tasks"] == 4


def test_reptile_loop_and_vmap_give_the_same_step(omniglot):
    import dataclasses

    loop = _learner("reptile", omniglot)
    vmapped = GradientLearner(dataclasses.replace(loop.config, batch="vmap"), omniglot, 0)
    assert loop.batch == "loop"
    tasks = omniglot.sample(2, np.random.default_rng(5))
    assert loop.step(tasks)["train/query_loss"] == pytest.approx(
        vmapped.step(tasks)["train/query_loss"], rel=1e-5
    )
    for name, value in loop.params.items():
        assert torch.allclose(value, vmapped.params[name], atol=1e-5), name


def test_maml_evaluation_in_vmap_chunks_equals_the_loop(omniglot):
    """Held-out scores of 11 tasks in vmap chunks of 8 (a chunk of 3 at the end) equal the loop's."""
    import dataclasses

    loop = _learner("maml", omniglot)
    vmapped = GradientLearner(dataclasses.replace(loop.config, batch="vmap"), omniglot, 0)
    assert loop.batch == "loop" and vmapped.batch == "vmap"
    tasks = omniglot.sample(11, np.random.default_rng(4))
    a = loop.evaluate(tasks, np.random.default_rng(0))
    b = vmapped.evaluate(tasks, np.random.default_rng(0))
    assert a["loss"].shape == b["loss"].shape == (11, len(a["adaptation_steps"]))
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(b["accuracy"], a["accuracy"])


def test_auto_batching_takes_vmap_on_cuda_and_the_distributions_choice_on_cpu(omniglot):
    from metarl.runtime import task_batching

    assert task_batching(omniglot, "cpu") == omniglot.batch_mode == "loop"
    assert task_batching(omniglot, "cuda") == "vmap"


def test_device_setting_is_checked_early():
    with pytest.raises(ValueError, match="not a torch device"):
        GradientLearnerConfig(device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device; use device='cpu'"):
            MetricLearnerConfig(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_learners_on_cuda_match_the_cpu(omniglot, name):
    """One training step and the held-out scores on CUDA equal the CPU's up to float rounding."""
    results = {}
    for device in ("cpu", "cuda"):
        if name == "protonet":
            learner = PrototypicalNetwork(MetricLearnerConfig(device=device), omniglot, 0)
        else:
            config = GradientLearnerConfig(method="maml", meta_batch_size=2, num_shots=1, num_queries=1,
                                           num_eval_queries=5, inner_lr=0.4, eval_adapt_steps=(0, 1),
                                           device=device)
            learner = GradientLearner(config, omniglot, 0)
        tasks = omniglot.sample(learner.config.meta_batch_size, np.random.default_rng(3))
        loss = learner.step(tasks)["train/query_loss"]
        scores = learner.evaluate(omniglot.test_tasks(), np.random.default_rng(0))
        results[device] = (loss, scores["loss"])
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-3)
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], rtol=1e-3, atol=1e-4)


