"""The families table reads finished sweeps and lays learners of each benchmark side by side."""

from __future__ import annotations

import json
import shlex

from experiments.tables.families import main


def _fake_sweep(root, name, agent, tasks, agent_cfg, steps, metrics):
    sweep = root / name
    (sweep / "base-s0").mkdir(parents=True)
    lines = ["[run]", f'agent = "{agent}"', "num_iterations = 7", "", "[tasks]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in tasks.items()] + ["", "[agent]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in agent_cfg.items()]
    (sweep / "base-s0" / "config.toml").write_text("\n".join(lines) + "\n")
    cell = {"adaptation_steps": steps, "num_seeds": 3}
    for metric, iqm in metrics.items():
        cell[metric] = {"iqm": iqm, "lo": [v - 1 for v in iqm], "hi": [v + 1 for v in iqm],
                        "mean": iqm}
    (sweep / "sweep.json").write_text(json.dumps(
        {"title": name, "cells": {"base": cell}, "sweep_command": f"metarl sweep {name}"}))
    return sweep


def test_rows_group_by_benchmark_with_family_experience_and_published_ml10(tmp_path):
    a = _fake_sweep(tmp_path, "sin-maml", "metarl.fewshot.maml:GradientLearner",
                    {"name": "sinusoid"}, {"method": "metasgd", "num_shots": 10},
                    [0, 1, 10], {"loss": [3.0, 0.5, 0.25]})
    b = _fake_sweep(tmp_path, "ml10-rl2", "agents.rl2:RL2", {"name": "ml10"}, {},
                    [0, 1, 2], {"return": [1.0, 2.0, 3.0], "success": [0.1, 0.2, 0.3]})
    c = _fake_sweep(tmp_path, "nav-trpo", "agents.maml_trpo:MAMLTRPO", {"name": "navigation-2d"},
                    {"eval_episodes_per_task": 20}, [0, 1, 2], {"return": [-40.0, -20.0, -12.5]})
    out = tmp_path / "families"
    assert main([str(a), str(b), str(c), "--out", str(out)]) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    rows = {r["sweep"]: r for r in document["rows"]}
    assert rows["sin-maml"]["learner"] == "Meta-SGD"
    assert rows["sin-maml"]["benchmark"] == "sinusoid, K = 10"
    assert rows["ml10-rl2"]["experience_last"] == "2 episode(s)"
    assert rows["nav-trpo"]["experience_last"] == "2 step(s) × 20 episodes"
    text = out.with_suffix(".md").read_text()
    assert "| Meta-SGD | gradient (learned initialisation and rates) | 3 | 7 | loss | 3 [2, 4] | 0.5 [-0.5, 1.5] | 0.25 [-0.75, 1.25] | 0.25 |" in text
    assert "35.8% (Meta-World table 1)" in text  # RL²'s published ML10 test success
    assert "## navigation-2d" in text and "`metarl sweep nav-trpo`" in text
    assert rows["nav-trpo"]["episodes_per_step"] == 20 and rows["ml10-rl2"]["episodes_per_step"] == 1
    for name in document["plots"]:
        assert (tmp_path / name).stat().st_size > 0 and name in text


def test_keep_refreshes_given_sweeps_and_keeps_the_rest_with_their_machine(tmp_path):
    a = _fake_sweep(tmp_path, "nav-rl2", "agents.rl2:RL2", {"name": "navigation-2d"}, {},
                    [0, 1], {"return": [-12.0, -8.0]})
    b = _fake_sweep(tmp_path / "v1", "vel-rl2", "agents.rl2:RL2", {"name": "halfcheetah-vel"}, {},
                    [0, 1], {"return": [-250.0, -240.0]})
    old = tmp_path / "old"
    assert main([str(a), str(b), "--out", str(old)]) == 0
    document = json.loads(old.with_suffix(".json").read_text())
    for row in document["rows"]:
        row.pop("machine")
    document["machine"] = "old box"
    old.with_suffix(".json").write_text(json.dumps(document))
    b2 = _fake_sweep(tmp_path / "v2", "vel-rl2", "agents.rl2:RL2", {"name": "halfcheetah-vel"}, {},
                     [0, 1], {"return": [-250.0, -200.0]})
    new = tmp_path / "new"
    assert main([str(b2), "--keep", str(old.with_suffix(".json")), "--out", str(new)]) == 0
    rows = json.loads(new.with_suffix(".json").read_text())["rows"]
    assert [(r["sweep"], r["metrics"]["return"]["iqm"][-1]) for r in rows] == [
        ("nav-rl2", -8.0), ("vel-rl2", -200.0)]  # the refreshed sweep replaces its old row
    assert rows[0]["machine"] == "old box" and rows[1]["machine"] != "old box"
    text = new.with_suffix(".md").read_text()
    assert "| machine | command |" in text and "| old box | `metarl sweep nav-rl2` |" in text
    dropped = tmp_path / "dropped"  # --drop leaves a kept sweep's rows out
    assert main(["--keep", str(new.with_suffix(".json")), "--drop", "nav-rl2", "--out", str(dropped)]) == 0
    assert [r["sweep"] for r in json.loads(dropped.with_suffix(".json").read_text())["rows"]] == ["vel-rl2"]


def test_recorded_command_parses_back_to_the_arguments_even_with_quotes_in_the_note(tmp_path):
    sweep = _fake_sweep(tmp_path / "s", "nav-rl2", "agents.rl2:RL2", {"name": "navigation-2d"}, {},
                        [0], {"return": [-10.0]})
    argv = [str(sweep), "--out", str(tmp_path / "t"), "--note", "the agent's 3 \"early\" runs"]
    assert main(argv) == 0
    command = json.loads((tmp_path / "t.json").read_text())["command"]
    assert shlex.split(command) == ["python", "-m", "experiments.tables.families", *argv]


def test_each_note_is_one_bullet_of_the_notes_section_after_the_tables_in_the_order_given(tmp_path):
    sweep = _fake_sweep(tmp_path / "s", "nav-rl2", "agents.rl2:RL2", {"name": "navigation-2d"}, {},
                        [0], {"return": [-10.0]})
    out = tmp_path / "t"
    assert main([str(sweep), "--out", str(out), "--note", "second row: 5 seeds", "--note", "first row: early"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["notes"] == ["second row: 5 seeds", "first row: early"]
    text = out.with_suffix(".md").read_text()
    notes = text.index("## Notes")
    assert text.index("| return |") < notes  # the row comes first
    assert text[notes:].split("\n")[2:4] == ["- second row: 5 seeds", "- first row: early"]


def _cell(folder, method, seed, per_task, curve=None, iterations=600):
    accuracy = {"step": 3 if method != "protonet" else 0, "per_task": per_task}
    if curve is not None:
        accuracy["curve"] = curve
    cell = {"method": method, "ways": 5, "shots": 1, "seed": seed, "iterations": iterations,
            "command": f"metarl run experiments/omniglot_{method}.toml --set run.seed={seed}",
            "accuracy": {"5": accuracy}, "machine": "gpu box"}
    (folder / f"{method}-5w1s-s{seed}-i{iterations}.json").write_text(json.dumps(cell))


def test_omniglot_rows_pool_cells_over_episodes_and_seeds(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    # pooled: 60 70 75 80 85 90 95 100 -> IQM = mean(75, 80, 85, 90) = 82.5 %, mean 81.875 %
    _cell(cells, "maml", 0, [100.0, 80.0, 90.0, 70.0])
    _cell(cells, "maml", 1, [60.0, 95.0, 85.0, 75.0])
    _cell(cells, "maml", 2, [0.0, 0.0, 0.0, 0.0], iterations=300)  # shorter budget: not mixed in
    curve = {"steps": [0, 1, 3, 5], "per_task": [[20.0] * 4, [50.0] * 4, [80.0] * 4, [90.0] * 4]}
    _cell(cells, "probmaml", 0, [80.0] * 4, curve)
    _cell(cells, "protonet", 0, [96.0] * 4)
    out = tmp_path / "fam"
    assert main(["--omniglot-cells", str(cells), "--out", str(out)]) == 0
    rows = {r["learner"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    maml = rows["MAML"]
    assert maml["num_seeds"] == 2 and maml["after_only"] and maml["adaptation_steps"] == [3]
    assert abs(maml["metrics"]["accuracy"]["iqm"][0] - 0.825) < 1e-12
    assert abs(maml["metrics"]["accuracy"]["mean"][0] - 0.81875) < 1e-12
    assert maml["command"].endswith("--set run.seed={0,1}")
    prob = rows["probabilistic MAML"]  # the curve, up to the reported step
    assert prob["adaptation_steps"] == [0, 1, 3] and not prob["after_only"]
    assert prob["metrics"]["accuracy"]["iqm"] == [0.2, 0.5, 0.8]
    text = out.with_suffix(".md").read_text()
    assert "## Omniglot 5-way 1-shot (minimal background)" in text
    assert "| MAML | gradient (learned initialisation) | 2 | 600 | accuracy | – | – | 0.825 [" in text
    assert "| probabilistic MAML | Bayesian (learned prior) | 1 | 600 | accuracy | 0.2 [0.2, 0.2] | 0.5 [0.5, 0.5] | 0.8 [0.8, 0.8] |" in text
    assert "| ProtoNets | metric | 1 | 600 | accuracy | – | – | 0.96 [0.96, 0.96] |" in text


def test_a_sweep_row_names_the_machines_its_finished_seeds_trained_on(tmp_path):
    sweep = _fake_sweep(tmp_path, "reach-rl2", "agents.rl2:RL2", {"name": "ml1", "env_name": "reach-v3"}, {},
                        [0, 1], {"return": [1.0, 2.0]})
    done, running = sweep / "base-s0", sweep / "base-s1"
    running.mkdir()
    for run, machines in ((done, ["box A", "box B"]), (running, ["box C"])):
        run.joinpath("machines.jsonl").write_text(
            "".join(json.dumps({"iteration": 2 * i, "machine": m}) + "\n" for i, m in enumerate(machines)))
        run.joinpath("timing.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 6)))
    done.joinpath("eval.json").write_text("{}")  # only finished seeds count; base-s1 is still training
    out = tmp_path / "families"
    assert main([str(sweep), "--out", str(out)]) == 0
    # iterations 1 and 2 on box A (it trained from iteration 0), 3 to 5 on box B (from iteration 2)
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["machine"] == "box B; box A"
    # one row trained elsewhere than where the table is built: the .md names its machines too
    assert "| machine | command |" in out.with_suffix(".md").read_text()
    assert "| box B; box A | `metarl sweep reach-rl2` |" in out.with_suffix(".md").read_text()
    done.joinpath("timing.jsonl").unlink()  # no timing log: the machines it names, alphabetically
    assert main([str(sweep), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["machine"] == "box A; box B"


def test_gain_column_pairs_each_task_last_step_against_before_by_hand(tmp_path):
    # RL² trials of 3 episodes on 2 tasks in each of 2 seeds: last minus first per task is
    # +1, -1 (seed 0) and +1, +1 (seed 1), so the mean gain is 0.5; return was not scored per task.
    sweep = _fake_sweep(tmp_path, "push-rl2", "agents.rl2:RL2", {"name": "ml1", "env_name": "push-v3"}, {},
                        [0, 1, 2], {"success": [0.25, 0.5, 0.75]})
    (sweep / "base-s1").mkdir()
    (sweep / "base-s1" / "config.toml").write_text((sweep / "base-s0" / "config.toml").read_text())
    for seed, table in ((0, [[0, 1, 1], [1, 1, 0]]), (1, [[0, 0, 1], [0, 1, 1]])):
        (sweep / f"base-s{seed}" / "eval.json").write_text(json.dumps({"per_task": {"success": table}}))
    out = tmp_path / "t"
    assert main([str(sweep), "--out", str(out)]) == 0
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    g = row["gain"]["success"]
    assert g["mean"] == 0.5 and g["num"] == 4 and g["lo"] <= 0.5 <= g["hi"]
    assert f"| 0.75 | +0.5 [{g['lo']:+.3g}, {g['hi']:+.3g}] | 2 episode(s) |" in out.with_suffix(".md").read_text()
