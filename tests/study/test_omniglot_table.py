"""The Omniglot table and its cells (experiments/tables/omniglot*.py): scheduling, resuming, scoring, ensembles on the official runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl.fewshot.omniglot_runs import load_official_runs


@pytest.fixture
def runs(shared_data_dir):
    return load_official_runs(shared_data_dir)


def test_runs_error_of_an_ensemble_averages_log_probabilities(runs):
    from experiments.tables.omniglot_eval import runs_error

    class Fixed:  # the same class logits for every run
        def __init__(self, logits):
            self.logits = torch.tensor(logits)

        def class_scores(self, train_x, train_y, test_x, shift=0, affine=((0.0, 1.0),)):
            return self.logits.expand(len(test_x), -1)

    # logits over 20 classes; member a: class 0 by a margin of log 3, b: class 1 by log 9.
    a = [np.log(3.0)] + [0.0] * 19
    b = [0.0, np.log(9.0)] + [0.0] * 18
    # mean log-probabilities differ only in log p0 + log p0' vs log p1 + log p1':
    # (log 3 - log 22 + 0 - log 28) vs (0 - log 22 + log 9 - log 28): class 1 wins.
    two = runs[:2]
    result = runs_error([Fixed(a), Fixed(b)], two, shift=0)
    targets = torch.cat([r.test_targets for r in two])
    assert result["mean_error"] == pytest.approx(100 * float((targets != 1).double().mean()))
    alone = runs_error([Fixed(a)], two, shift=0)
    assert alone["mean_error"] == pytest.approx(100 * float((targets != 0).double().mean()))
    assert alone["views"] == 1 and np.isfinite(alone["ci95"])
    with pytest.raises(ValueError, match="class_scores"):
        runs_error([object()], two, shift=0)


def test_omniglot_eval_scores_trained_runs_alone_and_together(tmp_path, shared_data_dir):
    import json

    from experiments.tables import omniglot_eval
    from metarl.experiment import Experiment

    dirs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"proto-s{seed}"
        overrides = [
            f"run.seed={seed}", "run.num_iterations=2", "run.checkpoint_every=2",
            "tasks.channels=4", "tasks.num_test_tasks=2", "tasks.train_ways=5",
        ]
        experiment = Experiment.create("experiments/omniglot_protonet.toml", overrides, run_dir)
        experiment.run(progress=False)
        experiment.close()
        dirs.append(str(run_dir))
    out = tmp_path / "eval"
    args = ["--runs", "val", "--num-runs", "3", "--shift", "0", "1", "--ensemble", "--out", str(out)]
    assert omniglot_eval.main(dirs + args) == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert [(len(r["models"]), r["views"]) for r in document["results"]] == [
        (1, 1), (1, 1), (2, 1), (1, 9), (1, 9), (2, 9)
    ]
    learner, tasks = omniglot_eval.load_learner(dirs[1])
    runs = omniglot_eval.make_runs("val", tasks, 3, 0)
    again = omniglot_eval.runs_error([learner], runs, shift=1)
    assert document["results"][4]["error_per_run"] == again["error_per_run"]
    assert document["results"][4]["models"] == [dirs[1]]
    both = [omniglot_eval.load_learner(d)[0] for d in dirs]
    together = omniglot_eval.runs_error(both, runs, shift=1)
    assert document["results"][5]["error_per_run"] == together["error_per_run"]
    assert omniglot_eval.main(dirs + ["--runs", "val", "--num-runs", "2", "--ensemble", "1,0"]) == 0
    with pytest.raises(SystemExit):
        omniglot_eval.main(dirs + ["--ensemble", "0,5"])
    turned = tmp_path / "turned"
    sets = ["--affine-sets", "a=0 s=1", "a=-90,0 s=1,0.5", "--out", str(turned)]
    assert omniglot_eval.main(dirs[:1] + ["--runs", "val", "--num-runs", "3"] + sets) == 0
    rows = json.loads(turned.with_suffix(".json").read_text())["results"]
    assert [(r["views"], r["affine"]) for r in rows] == [
        (1, [[0.0, 1.0]]), (4, [[-90.0, 1.0], [-90.0, 0.5], [0.0, 1.0], [0.0, 0.5]])
    ]
    assert rows[0]["error_per_run"] == document["results"][0]["error_per_run"]
    views = omniglot_eval.parse_affine_set("a=-90,0 s=1,0.5")
    assert rows[1]["error_per_run"] == omniglot_eval.runs_error(
        [omniglot_eval.load_learner(dirs[0])[0]], runs, 0, views
    )["error_per_run"]
    assert "| 4 | 0 | -90, 0 | 0.5, 1 |" in turned.with_suffix(".md").read_text()
    assert "--affine-sets 'a=0 s=1' 'a=-90,0 s=1,0.5'" in turned.with_suffix(".md").read_text()
    for bad in (["--affine-sets", "a=x s=1"], ["--affine-sets", "0/1"], ["--scales", "0"]):
        with pytest.raises(SystemExit):
            omniglot_eval.main(dirs[:1] + bad)
    table = out.with_suffix(".md").read_text()
    assert table.count("| val alphabets (3) |") == 6 and "python -m experiments.tables.omniglot_eval" in table
    with pytest.raises(ValueError, match="no checkpoint"):
        empty = tmp_path / "empty"
        Experiment.create("experiments/omniglot_protonet.toml", ["tasks.channels=4"], empty)
        omniglot_eval.load_learner(empty)


def test_omniglot_table_builds_from_committed_cells_without_mixing_budgets(tmp_path):
    import json

    from experiments.tables.omniglot import main
    from experiments.tables.omniglot_cells import cell_name

    def cell(seed: int, iterations: int, scores: list[float]) -> dict:
        return {"method": "maml", "ways": 5, "shots": 1, "seed": seed, "iterations": iterations,
                "command": f"metarl run experiments/omniglot_maml.toml --set run.seed={seed}",
                "train_s": 1.0, "machine": "m", "accuracy": {"5": {"step": 3, "per_task": scores}}}

    cells = tmp_path / "cells"
    cells.mkdir()
    # seeds 0 and 1 trained for 200 iterations, seed 2 only for 100: the row keeps the 200s.
    for c in (cell(0, 200, [90.0, 100.0]), cell(1, 200, [80.0, 90.0]), cell(2, 100, [10.0, 10.0])):
        (cells / cell_name(c)).write_text(json.dumps(c))
    assert main(["--from-cells", "--cells", str(cells), "--out", str(tmp_path / "omniglot")]) == 0
    (row,) = json.loads((tmp_path / "omniglot.json").read_text())["rows"]
    assert row["seeds"] == [0, 1] and row["iterations"] == 200
    assert row["accuracy"]["mean"] == pytest.approx(90.0) and row["accuracy"]["num"] == 4
    assert "run.seed={0,1}" in (tmp_path / "omniglot.md").read_text()
    assert "](omniglot.png)" in (tmp_path / "omniglot.md").read_text()
    assert (tmp_path / "omniglot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_omniglot_plot_groups_rows_by_setting_in_table_order():
    from experiments.tables.omniglot_plot import accuracy_panels

    def row(method, ways, shots, mean, seeds):
        return {"method": method, "ways": ways, "shots": shots, "seeds": list(range(seeds)),
                "accuracy": {"mean": mean, "ci95": 0.5}, "published": 99.0}

    rows = [row("maml", 20, 1, 80.0, 3), row("maml", 5, 1, 93.0, 3), row("reptile", 5, 1, 84.0, 1)]
    panels = accuracy_panels(rows)
    assert list(panels) == [(5, 1), (20, 1)]
    assert [(b["method"], b["mean"], b["seeds"]) for b in panels[(5, 1)]] == [
        ("maml", 93.0, 3), ("reptile", 84.0, 1)]
    assert panels[(20, 1)][0]["published"] == 99.0


def test_omniglot_table_reuses_a_committed_cell_only_for_the_same_command(tmp_path, monkeypatch):
    import json

    from experiments.tables import omniglot_cells as table

    overrides = table.cell_overrides("protonet", 5, 1, 0, 7) + ["agent.device=cuda"]
    saved = {"method": "protonet", "ways": 5, "shots": 1, "seed": 0, "iterations": 7,
             "command": table.cell_command("protonet", overrides), "accuracy": {}, "train_s": 1.0}
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / table.cell_name(saved)).write_text(json.dumps(saved))
    trained = []

    class NoTraining:  # stands in for the runner: records any attempt to train
        @staticmethod
        def create(*args, **kwargs):
            trained.append(args)
            raise RuntimeError("would train")

    monkeypatch.setattr("metarl.experiment.Experiment", NoTraining)
    same = table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"),
                          ["agent.device=cuda"], str(cells))
    stored = {k: v for k, v in same.items() if k != "run"}  # the cell with its parsed run
    assert stored == saved and same["run"].command() == saved["command"] and not trained
    # the same experiment on another device is the same cell: a GPU seed counts for a CPU sweep
    on_cpu = table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"), [], str(cells))
    assert on_cpu == same and not trained
    # so is one checkpointed at another interval
    assert table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"),
                          ["run.checkpoint_every=3"], str(cells)) == same and not trained
    with pytest.raises(RuntimeError, match="would train"):  # another command: not reused
        table.run_cell("protonet", 5, 1, (5, 20), 0, 7, str(tmp_path / "runs"),
                       ["agent.outer_lr=0.01"], str(cells))
    assert len(trained) == 1


def test_omniglot_table_plan_tells_committed_partial_and_untrained_cells_apart(tmp_path, capsys):
    """--plan trains nothing and names each cell's state: seed 0 committed, seed 1 checkpointed at
    iteration 2 of 4, seed 2 not started."""
    from experiments.tables import omniglot as table
    from experiments.tables import omniglot_cells as cells_mod
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2", "run.checkpoint_every=1"]
    cells, root = tmp_path / "cells", tmp_path / "runs"
    cells.mkdir()
    saved = {"method": "protonet", "ways": 5, "shots": 1, "seed": 0, "iterations": 4,
             "command": cells_mod.cell_command("protonet", cells_mod.cell_overrides("protonet", 5, 1, 0, 4) + tiny)}
    (cells / cells_mod.cell_name(saved)).write_text(json.dumps(saved))
    partial = Experiment.create("experiments/omniglot_protonet.toml",
                                cells_mod.cell_overrides("protonet", 5, 1, 1, 4) + tiny, root / "protonet-5w1s-s1")
    partial.iteration = 2
    partial.checkpoint()
    partial.close()
    args = ["--plan", "--methods", "protonet", "--settings", "5w1s", "--iterations", "4", "--cells", str(cells),
            "--root", str(root), "--out", str(tmp_path / "table")]
    for item in tiny:
        args += ["--set", item]
    assert table.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "seed=0" in lines[0] and "done (committed)" in lines[0]
    assert "seed=1" in lines[1] and "resumes at iteration 2 of 4" in lines[1]
    assert "seed=2" in lines[2] and lines[2].endswith("to train")
    assert lines[-1] == "1 of 3 cells done; 2 to train or resume"
    assert not (tmp_path / "table.md").exists() and not (root / "protonet-5w1s-s2").exists()


def test_omniglot_table_settings_pick_the_models_to_train(tmp_path, monkeypatch):
    from experiments.tables import omniglot as table

    submitted = []

    class Pool:  # records the jobs instead of training them
        def __init__(self, workers):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *job):
            submitted.append(job[:5])
            return Untrained()

        @staticmethod
        def result(future, label):
            return future.result()

        @staticmethod
        def stop_report(finished):
            return None

    class Untrained:
        @staticmethod
        def result():
            raise RuntimeError("not trained")

    monkeypatch.setattr(table, "StoppablePool", Pool)
    code = table.main(["--methods", "protonet", "maml", "--settings", "5w1s", "--seeds", "2",
                       "--cells", str(tmp_path / "none"), "--out", str(tmp_path / "t")])
    assert code == 2  # every cell "failed": nothing was trained
    assert submitted == [("protonet", 5, 1, (5, 20), 0), ("maml", 5, 1, (5,), 0),
                         ("protonet", 5, 1, (5, 20), 1), ("maml", 5, 1, (5,), 1)]
    submitted.clear()  # --seed: only the seeds named, in the order given
    table.main(["--methods", "maml", "--settings", "20w1s", "--seed", "2", "0",
                "--cells", str(tmp_path / "none"), "--out", str(tmp_path / "t")])
    assert submitted == [("maml", 20, 1, (20,), 2), ("maml", 20, 1, (20,), 0)]
    with pytest.raises(SystemExit, match="2"):  # argparse error
        table.main(["--settings", "five-way", "--out", str(tmp_path / "t")])


def test_shift_augmented_protonets_train_one_1_shot_model_tested_like_protonets():
    from experiments.tables import omniglot_cells as table
    from metarl.config import load_toml

    experiments = Path(__file__).resolve().parents[2] / "experiments"
    assert table.trained_runs("protonet_aug") == [(5, 1, (5, 20))]
    overrides = table.cell_overrides("protonet_aug", 20, 1, 2, 2000)
    assert overrides == ["run.seed=2", "run.num_iterations=2000", "agent.num_shots=1"]
    config = load_toml(experiments / "omniglot_protonet_aug.toml")
    assert config["tasks"]["max_shift"] > 0 and config["agent"]["official_run_shift"] > 0
    plain = load_toml(experiments / "omniglot_protonet.toml")
    assert {k: v for k, v in config["tasks"].items() if k != "max_shift"} == plain["tasks"]
    # protonet_affine: protonet_aug plus random turns and scalings, the same single model
    assert table.trained_runs("protonet_affine") == [(5, 1, (5, 20))]
    affine = load_toml(experiments / "omniglot_protonet_affine.toml")
    assert affine["tasks"]["max_rotation"] > 0 and affine["tasks"]["max_scale"] > 0
    assert {k: v for k, v in affine["tasks"].items() if k not in ("max_rotation", "max_scale")} == (
        config["tasks"]
    )
    assert affine["agent"] == config["agent"] and affine["run"] == config["run"]


def test_omniglot_eval_rejects_bad_ensembles_before_loading_any_model(tmp_path, capsys):
    from experiments.tables import omniglot_eval

    missing = str(tmp_path / "not-trained")  # never opened: the arguments fail first
    for bad, says in ((["--ensemble", "0,5"], "outside 0..0"), (["--ensemble", "a,b"], "positions such as")):
        with pytest.raises(SystemExit):
            omniglot_eval.main([missing, *bad])
        assert says in capsys.readouterr().err


def test_omniglot_table_threads_reach_each_cell_and_bad_counts_are_refused(tmp_path, monkeypatch, capsys):
    """``--threads`` is the torch thread count each cell trains and scores with (1 by default);
    a count below 1 is refused before anything trains."""
    import torch

    from experiments.tables import omniglot as table
    from experiments.tables import omniglot_cells as cells

    args = table.build_parser().parse_args(["--methods", "protonet", "--settings", "5w1s"])
    assert [job[-1] for job in table._jobs(args, {(5, 1)})] == [1, 1, 1]
    args = table.build_parser().parse_args(["--threads", "2", "--seed", "0"])
    assert {job[-1] for job in table._jobs(args, None)} == {2}

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2"]
    cells.run_cell("protonet", 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny, threads=2)
    assert calls == [2]
    for bad in (["--threads", "0"], ["--workers", "0"], ["--threads", "two"]):
        with pytest.raises(SystemExit):
            table.main(bad + ["--plan", "--root", str(tmp_path / "none")])
        err = capsys.readouterr().err
        assert bad[0] in err and ("below 1" in err or "not a whole number" in err)
    assert not (tmp_path / "none").exists()
