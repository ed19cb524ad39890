"""experiments/rl_curves.py reads held-out curves and diagnostics from run directories."""

from __future__ import annotations

import json

from experiments.rl_curves import main, summarize


def _run(root, seed, evals, kl):
    run = root / f"base-s{seed}"
    run.mkdir(parents=True)
    run.joinpath("config.toml").write_text(
        '[run]\nagent = "agents.maml_trpo:MAMLTRPO"\nnum_iterations = 500\n\n'
        '[tasks]\nname = "halfcheetah-vel"\n\n[agent]\nmax_kl = 0.02\n'
    )
    rows = []
    for iteration in range(1, 5):
        row = {"iteration": iteration, "train/env_steps": 1000.0, "adapt/inner_kl": kl,
               "adapt/return_gain": 2.0 * seed, "train/accepted": float(iteration != 3),
               "train/kl": 0.01 + 0.004 * seed if iteration != 3 else 0.0}
        if iteration in evals:
            row |= {f"eval/return_step{k}": v for k, v in enumerate(evals[iteration])}
        rows.append(row)
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.joinpath("machines.jsonl").write_text(json.dumps({"iteration": 0, "machine": f"box{seed}"}) + "\n")


def test_last_common_evaluation_is_averaged_over_seeds_with_diagnostics(tmp_path):
    sweep = tmp_path / "maml-trpo-cheetah-vel"
    _run(sweep, 0, {2: [-200.0, -190.0], 4: [-150.0, -100.0]}, kl=0.1)
    _run(sweep, 1, {2: [-210.0, -180.0], 4: [-130.0, -90.0]}, kl=0.3)
    row = summarize(sweep, {"halfcheetah-vel": {"maml_trpo": {"return_pre": -135.0, "iterations": 500}}})
    assert row["iterations"] == [4, 4] and row["env_steps"] == [4000.0, 4000.0]
    assert row["last_eval"]["return"]["iteration"] == 4
    assert row["last_eval"]["return"]["steps"] == {0: -140.0, 1: -95.0}
    assert row["diagnostics"]["adapt/inner_kl"] == 0.2  # mean of the last iterations of both seeds
    # accepted steps only (a rejected one has KL 0): KL 0.01 and 0.014 against max_kl 0.02
    assert abs(row["diagnostics"]["trust_region_used"] - 0.6) < 1e-12
    assert row["reference"]["return_pre"] == -135.0 and row["machines"] == ["box0", "box1"]


def test_writes_table_json_and_plot(tmp_path):
    sweep = tmp_path / "maml-trpo-cheetah-vel"
    _run(sweep, 0, {2: [-200.0, -190.0]}, kl=0.1)
    out = tmp_path / "curves"
    assert main([str(sweep), "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    assert "| halfcheetah-vel | maml_trpo | 1 | 4 (500) |" in text
    assert (tmp_path / "curves_maml-trpo-cheetah-vel.png").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["seeds"] == 1


def test_a_published_value_given_in_environment_steps_sits_at_our_iteration_with_as_many_steps():
    from experiments.rl_curves import reference_iteration

    # 5M steps at 200,000 steps per meta-iteration (20 tasks x 10 episodes x 500 steps, pre and post)
    assert reference_iteration({"env_steps": 5.0e6}, 200_000.0, 300) == 25.0
    assert reference_iteration({"iterations": 500, "env_steps": 1.0}, 200_000.0, 300) == 500.0
    assert reference_iteration({}, 200_000.0, 300) == 300.0
    assert reference_iteration({"env_steps": 5.0e6}, float("nan"), 300) == 300.0


def test_a_sweep_before_its_first_held_out_point_is_listed_with_its_progress_and_no_plot(tmp_path):
    young = tmp_path / "maml-trpo-cheetah-dir"
    _run(young, 0, {}, kl=0.1)
    out = tmp_path / "curves"
    assert main([str(young), "--out", str(out)]) == 0
    line = next(x for x in out.with_suffix(".md").read_text().splitlines() if x.startswith("| halfcheetah-vel"))
    assert "no held-out point yet" in line and "| 4 (500) | 0.0M |" in line
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["plot"] is None
    assert not list(tmp_path.glob("curves_*.png"))


def test_a_seed_with_no_evaluation_yet_is_named_beside_the_held_out_figures(tmp_path):
    sweep = tmp_path / "rl2-ml1-reach"
    _run(sweep, 0, {4: [-150.0, -100.0]}, kl=0.1)
    _run(sweep, 1, {4: [-130.0, -90.0]}, kl=0.1)
    _run(sweep, 2, {}, kl=0.1)  # just started: no held-out point
    out = tmp_path / "curves"
    assert main([str(sweep), "--out", str(out)]) == 0
    line = next(x for x in out.with_suffix(".md").read_text().splitlines() if x.startswith("| halfcheetah-vel"))
    assert "| return | 4 (2 of 3 seeds) | -140 | -95 |" in line
    _run(tmp_path / "all", 0, {4: [-150.0, -100.0]}, kl=0.1)
    assert main([str(tmp_path / "all"), "--out", str(out)]) == 0
    assert "| return | 4 | -150 | -100 |" in out.with_suffix(".md").read_text()


def test_the_last_evaluation_every_seed_reached_is_preferred_to_a_later_one_of_fewer_seeds(tmp_path):
    sweep = tmp_path / "maml-trpo-cheetah-vel"
    _run(sweep, 0, {2: [-200.0, -190.0], 4: [-150.0, -100.0]}, kl=0.1)
    _run(sweep, 1, {2: [-210.0, -180.0]}, kl=0.1)  # behind seed 0: not yet at iteration 4's evaluation
    row = summarize(sweep, {})
    assert row["last_eval"]["return"] == {"iteration": 2, "steps": {0: -205.0, 1: -185.0}, "seeds": 2}
    out = tmp_path / "curves"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert "| return | 2 | -205 | -185 |" in out.with_suffix(".md").read_text()


def test_steps_collected_again_after_a_resume_are_shown_apart_and_not_counted(tmp_path):
    """PEARL resumed from its portable checkpoint collects its replay again: logged as
    ``train/recollected_env_steps``, or, in logs older than that key, as ``train/initial_env_steps``
    past the first iteration. The env-steps column counts new steps only and shows those apart."""
    sweep = tmp_path / "pearl"
    config = '[run]\nagent = "agents.pearl:PEARL"\nnum_iterations = 200\n\n[tasks]\nname = "navigation-2d"\n'
    logs = {  # iteration: (env_steps, initial, recollected or None for an older log)
        0: {1: (1.5e6, 1e6, 0.0), 2: (5e5, 0.0, 0.0), 3: (3.5e6, 0.0, 3e6), 4: (5e5, 0.0, 0.0)},
        1: {1: (1.5e6, 1e6, None), 2: (5e5, 0.0, None), 3: (2.5e6, 2e6, None)},
    }
    for seed, rows in logs.items():
        run = sweep / f"base-s{seed}"
        run.mkdir(parents=True)
        run.joinpath("config.toml").write_text(config)
        lines = []
        for iteration, (steps, initial, again) in rows.items():
            row = {"iteration": iteration, "train/env_steps": steps, "train/initial_env_steps": initial}
            if again is not None:
                row["train/recollected_env_steps"] = again
            lines.append(json.dumps(row) + "\n")
        run.joinpath("metrics.jsonl").write_text("".join(lines))
        run.joinpath("machines.jsonl").write_text(json.dumps({"iteration": 0, "machine": "box"}) + "\n")
    row = summarize(sweep, {})
    # seed 0: 1.5M + 0.5M + 0.5M + 0.5M new, 3M again; seed 1: 1.5M + 0.5M + 0.5M new, 2M again
    assert row["env_steps"] == [3e6, 2.5e6] and row["recollected_env_steps"] == [3e6, 2e6]
    assert row["env_steps_per_iteration"] == 5.5e6 / 7
    assert main([str(sweep), "--out", str(tmp_path / "curves")]) == 0
    text = (tmp_path / "curves.md").read_text()
    assert "| 4, 3 (200) | 3.0M (+3.00M again), 2.5M (+2.00M again) |" in text
