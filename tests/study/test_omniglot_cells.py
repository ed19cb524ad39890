"""Omniglot cells (experiments/tables/omniglot_cells.py): a cell stopped while training or scoring resumes to the same result; a cell's command names its device and checkpoint interval."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_omniglot_cell_refuses_to_resume_a_run_of_another_length(tmp_path):
    """A run directory started for 3 iterations is not silently continued as a 5-iteration cell."""
    from experiments.tables import omniglot_cells as table
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2"]
    run_dir = tmp_path / "runs" / "protonet-5w1s-s0"
    Experiment.create("experiments/omniglot_protonet.toml",
                      table.cell_overrides("protonet", 5, 1, 0, 3) + tiny, run_dir).close()
    with pytest.raises(ValueError, match="holds a run of 3 iterations, not 5"):
        table.run_cell("protonet", 5, 1, (5,), 0, 5, str(tmp_path / "runs"), tiny)


def _run_until_signal(experiment, iteration):
    """Runs ``experiment`` with a SIGINT sent during its iteration number ``iteration`` (1-based),
    so it stops with a checkpoint there (TrainingStopped), and closes it."""
    import os
    import signal

    from metarl.stopping import TrainingStopped

    step = experiment.agent.step

    def step_then_signal(batch):
        metrics = step(batch)
        if experiment.iteration == iteration - 1:  # Experiment.run counts it after step
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    experiment.agent.step = step_then_signal
    with pytest.raises(TrainingStopped):
        experiment.run(progress=False)
    experiment.close()


def test_omniglot_cell_stopped_midway_resumes_and_counts_only_the_iterations_it_trained(tmp_path):
    """A cell stopped by a signal after 3 of 5 iterations is continued, not restarted, by the next
    call; its training time is labelled with the 2 iterations that call trained."""

    from experiments.tables import omniglot_cells as table
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=2", "run.log_every=1", "run.checkpoint_every=1"]
    run_dir = tmp_path / "runs" / "protonet-5w1s-s0"
    experiment = Experiment.create("experiments/omniglot_protonet.toml",
                                   table.cell_overrides("protonet", 5, 1, 0, 5) + tiny, run_dir)
    _run_until_signal(experiment, 3)
    cell = table.run_cell("protonet", 5, 1, (5,), 0, 5, str(tmp_path / "runs"), tiny)
    assert cell["iterations"] == 5 and cell["train_s_iterations"] == 2
    logged = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]


def _tiny_gradient_cell(tmp_path, name, method="fomaml", tasks=5):
    from experiments.tables import omniglot_cells as table
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", f"tasks.num_test_tasks={tasks}", "agent.eval_adapt_steps=[0,1,3]"]
    return Experiment.create(f"experiments/omniglot_{method}.toml",
                             table.cell_overrides(method, 5, 1, 0, 2) + tiny, tmp_path / name), tiny


def test_held_out_scores_saved_in_chunks_equal_one_call_and_resume_after_a_stop(tmp_path):
    """Scoring 5 tasks 2 at a time, stopped after the first chunk and resumed, gives exactly the
    losses and accuracies of one evaluate call on all 5, and the resumed call scores only the
    3 tasks not saved. Saved scores of another model (iteration) are not reused."""

    from experiments.tables import omniglot_cells as table
    from metarl.stopping import ScoringStopped

    experiment, _ = _tiny_gradient_cell(tmp_path, "fomaml-5w1s-s0")
    experiment.run(progress=False)
    agent, tasks = experiment.agent, experiment.distribution.test_tasks(num_ways=5)
    reference = table._evaluate(agent, tasks, 7)
    scored = []
    evaluate = agent.evaluate
    agent.evaluate = lambda ts, rng: scored.append(len(ts)) or evaluate(ts, rng)
    partial = tmp_path / "scores.json"
    with pytest.raises(ScoringStopped, match="2 of 5 held-out episodes are scored and saved"):
        table.score_held_out(agent, tasks, 7, partial, 2, chunk=2, stop_requested=lambda: "SIGTERM")
    assert scored == [2] and list(json.loads(partial.read_text())["parts"]) == ["0"]
    resumed = table.score_held_out(agent, tasks, 7, partial, 2, chunk=2)
    assert scored == [2, 2, 1]
    assert resumed["adaptation_steps"] == reference["adaptation_steps"] == [0, 1, 3]
    assert np.array_equal(resumed["loss"], reference["loss"])
    assert np.array_equal(resumed["accuracy"], reference["accuracy"])
    assert table.score_held_out(agent, tasks, 7, partial, 2, chunk=2)["loss"].shape == (5, 3)
    assert scored == [2, 2, 1]  # all 5 saved: nothing scored again
    table.score_held_out(agent, tasks, 7, partial, 3, chunk=2)  # another model: scored anew
    assert scored == [2, 2, 1, 2, 2, 1]
    experiment.close()


def test_scoring_of_a_learner_that_is_not_per_task_is_one_call_with_nothing_saved(tmp_path):
    from experiments.tables import omniglot_cells as table

    class OneCall:  # a learner whose scores may depend on the other tasks
        scores_tasks_independently = False
        calls = []

        def evaluate(self, tasks, rng):
            self.calls.append(len(tasks))
            return {"adaptation_steps": [0], "loss": [[1.0]] * len(tasks), "accuracy": None}

    out = table.score_held_out(OneCall(), list(range(5)), 0, tmp_path / "scores.json", chunk=2)
    assert OneCall.calls == [5] and len(out["loss"]) == 5
    assert not (tmp_path / "scores.json").exists()


def test_omniglot_cell_stopped_while_scoring_resumes_the_scoring_with_the_same_scores(tmp_path, monkeypatch):
    """A signal while a cell is scored stops it at the next save of scores (ScoringStopped, which
    a pool reports and which survives pickling); the same call again trains nothing, scores the
    rest, and gives the per-episode accuracy of a cell scored without a stop."""
    import os
    import pickle
    import signal

    from experiments.tables import omniglot_cells as table
    from metarl.stopping import ScoringStopped

    monkeypatch.setattr(table, "SCORE_CHUNK", 2)
    _, tiny = _tiny_gradient_cell(tmp_path, "unused")
    whole = table.run_cell("fomaml", 5, 1, (5,), 0, 2, str(tmp_path / "whole"), tiny)
    from metarl.fewshot.maml import GradientLearner

    evaluate = GradientLearner.evaluate
    chunks = []

    def evaluate_then_signal(self, tasks, rng):
        chunks.append(len(tasks))
        if len(chunks) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, tasks, rng)

    monkeypatch.setattr(GradientLearner, "evaluate", evaluate_then_signal)
    with pytest.raises(ScoringStopped) as stopped:
        table.run_cell("fomaml", 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny)
    assert (stopped.value.scored, stopped.value.total, stopped.value.iteration) == (2, 5, 2)
    assert table.cell_state("fomaml", 5, 1, 0, 2, str(tmp_path / "runs"), tiny).endswith(
        "; 2 of 5 held-out 5-way episodes scored)")
    assert stopped.value.where() == "while scoring (2 of 5 held-out episodes saved)"
    copy = pickle.loads(pickle.dumps(stopped.value))
    assert (type(copy), str(copy), copy.exit_code) == (ScoringStopped, str(stopped.value), 143)
    again = table.run_cell("fomaml", 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny)
    assert chunks == [2, 2, 1] and again["train_s_iterations"] == 0
    assert again["accuracy"] == whole["accuracy"]


def test_a_parked_unfinished_run_resumes_in_a_clone_without_it_and_matches_an_unbroken_run(tmp_path, capsys):
    """--park copies a run checkpointed at iteration 2 of 4 (not a finished one, nor TensorBoard
    events) beside the cells; from a root without that run, --plan says it resumes there and
    run_cell trains only iterations 3-4, to the same held-out scores as a run never stopped, and
    then drops the parked copy."""

    from experiments.tables import omniglot as table
    from experiments.tables import omniglot_cells as cells_mod
    from metarl.experiment import Experiment

    tiny = ["tasks.channels=4", "tasks.num_test_tasks=3", "run.checkpoint_every=1"]
    cells, old_root, new_root = tmp_path / "cells", tmp_path / "old", tmp_path / "new"
    overrides = cells_mod.cell_overrides("protonet", 5, 1, 0, 4) + tiny
    half = Experiment.create("experiments/omniglot_protonet.toml", overrides, old_root / "protonet-5w1s-s0")
    _run_until_signal(half, 2)
    done = old_root / "protonet-5w1s-s1"
    Experiment.create("experiments/omniglot_protonet.toml", overrides, done).checkpoint()
    (done / "table.json").write_text("{}")  # a finished run: its cell is committed, not parked
    (old_root / "notes").mkdir()  # not a run
    assert table.main(["--park", "--root", str(old_root), "--cells", str(cells)]) == 0
    out = capsys.readouterr().out
    assert "protonet-5w1s-s0: parked at iteration 2" in out and "1 unfinished runs" in out
    parked = cells / "unfinished" / "protonet-5w1s-s0"
    assert sorted(p.name for p in (cells / "unfinished").iterdir()) == ["protonet-5w1s-s0"]
    assert (parked / "checkpoint.pt").is_file() and not (parked / "tb").exists()
    assert "resumes at iteration 2 of 4" in cells_mod.cell_state(
        "protonet", 5, 1, 0, 4, str(new_root), tiny, str(cells))
    resumed = cells_mod.run_cell("protonet", 5, 1, (5,), 0, 4, str(new_root), tiny, str(cells))
    assert resumed["train_s_iterations"] == 2 and not parked.exists()
    assert (cells / cells_mod.cell_name(resumed)).is_file()
    unbroken = cells_mod.run_cell("protonet", 5, 1, (5,), 0, 4, str(tmp_path / "unbroken"), tiny)
    assert unbroken["train_s_iterations"] == 4
    assert resumed["accuracy"] == unbroken["accuracy"]


def _seed_command(commands: list[str], seeds: list[int]) -> str:
    """seed_command of cells stored with these commands."""
    from experiments.tables.omniglot_cells import seed_command
    from experiments.tables.run_identity import RunSpec

    return seed_command([RunSpec.parse(c) for c in commands], seeds)


def test_seed_command_names_the_device_of_each_seed():
    base = "metarl run experiments/omniglot_maml.toml --set run.seed={}"
    gpu = base + " --set agent.device=cuda --set run.checkpoint_every=100"
    cpu = base + " --set run.checkpoint_every=100"
    same = _seed_command([gpu.format(0), gpu.format(1)], [0, 1])
    assert same == gpu.replace("{}", "{0,1}")
    mixed = _seed_command([gpu.format(0), cpu.format(1), cpu.format(2)], [0, 1, 2])
    assert mixed == (cpu.replace("{}", "{0,1,2}")
                     + "  # seed 0 with --set agent.device=cuda; seeds 1,2 with no agent.device (CPU)")


def test_seed_command_names_the_checkpoint_interval_of_each_seed():
    base = "metarl run experiments/omniglot_maml.toml --set run.seed={} --set tasks.num_ways=20"
    every = " --set run.checkpoint_every={}"
    gpu = base + " --set agent.device=cuda"
    commands = [(gpu + every).format(0, 100), (base + every).format(1, 20),
                (base + every).format(2, 20)]
    assert _seed_command(commands, [0, 1, 2]) == (
        "metarl run experiments/omniglot_maml.toml --set run.seed={0,1,2} --set tasks.num_ways=20"
        "  # seed 0 with --set agent.device=cuda; seeds 1,2 with no agent.device (CPU)"
        "; seed 0 with --set run.checkpoint_every=100; seeds 1,2 with --set run.checkpoint_every=20")
    # one seed without the override, the others with it
    mixed = _seed_command([base.format(3), (base + every).format(4, 20)], [3, 4])
    assert mixed == (base.replace("{}", "{3,4}") + "  # seed 3 with no run.checkpoint_every; "
                     "seed 4 with --set run.checkpoint_every=20")
    # the same interval everywhere stays in the command
    same = _seed_command([(base + every).format(0, 20), (base + every).format(1, 20)], [0, 1])
    assert same == (base + every).format("{0,1}", 20)


def test_a_cells_identity_is_what_its_run_computes_not_where_or_how_often_it_saves():
    """Two cells differing only in device (or checkpoint and log intervals) are one experiment;
    a model or algorithm key, the seed or the config file makes another."""
    from experiments.tables.omniglot_cells import cell_overrides, cell_run
    from experiments.tables.run_identity import RunSpec

    overrides = cell_overrides("maml", 5, 1, 0, 600)
    cpu = cell_run("maml", overrides + ["run.checkpoint_every=100"])
    gpu = cell_run("maml", overrides + ["agent.device=cuda", "run.checkpoint_every=20", "run.log_every=5"])
    assert (cpu.device, gpu.device, cpu.checkpoint_every, gpu.checkpoint_every) == ("cpu", "cuda", "100", "20")
    assert cpu.identity() == gpu.identity()
    assert cpu.identity().seed == 0
    # an override written another way, or in another order, resolves to the same config
    assert cell_run("maml", ["agent.inner_lr=0.40", *reversed(overrides)]).identity() == cell_run(
        "maml", [*overrides, "agent.inner_lr=0.4"]).identity()
    wider = cell_run("maml", overrides + ["tasks.channels=32"])
    assert wider.identity() != cpu.identity() and wider.identity().seed == cpu.identity().seed
    other_seed = cell_run("maml", cell_overrides("maml", 5, 1, 1, 600))
    assert other_seed.identity() != cpu.identity()
    assert other_seed.identity().experiment() == cell_run("maml", overrides).identity().experiment()
    assert cell_run("fomaml", overrides).identity() != cell_run("maml", overrides).identity()
    # a stored command parses back to the run that wrote it
    assert RunSpec.parse(gpu.command()) == gpu and gpu.command().startswith(
        "metarl run experiments/omniglot_maml.toml --set run.seed=0 ")
