"""The runner: determinism, SIGKILL + resume, config errors, NaN handling, evaluation statistics."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from resume_helpers import kill_after_checkpoint, processes_mentioning, signal_midway

from metarl.cli import main
from metarl.evaluation import iqm, mean_ci95

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run.num_iterations=600", "run.log_every=10", "run.checkpoint_every=40", "run.eval_at_end=false",
    "agent.meta_batch_size=2", "agent.num_queries=5", "tasks.num_test_tasks=20",
]


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def metarl(*args: str, check: bool = True) -> Result:
    """Runs the CLI in process (as the console script would), capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"metarl {' '.join(args)} exited {code}:\n{result.stderr}")
    return result


def small_run(out: Path, *extra: str) -> list[str]:
    args = ["run", "experiments/sinusoid_maml.toml", "--out", str(out), "--no-progress"]
    for s in SMALL + list(extra):
        args += ["--set", s]
    return args


def test_same_seed_gives_identical_metrics(tmp_path):
    metarl(*small_run(tmp_path / "a", "run.num_iterations=60"))
    metarl(*small_run(tmp_path / "b", "run.num_iterations=60"))
    a = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert len(a.splitlines()) == 6
    assert not (tmp_path / "a" / "checkpoint.portable.pt").exists()  # only agents with collected data write one
    metarl(*small_run(tmp_path / "c", "run.num_iterations=60", "run.seed=1"))
    assert a != (tmp_path / "c" / "metrics.jsonl").read_text()


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    metarl(*small_run(tmp_path / "full"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "metarl.cli", *small_run(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after_checkpoint(proc, killed)
    logged = (killed / "metrics.jsonl").read_text().splitlines()
    assert 0 < len(logged) < 60, "the run must be killed midway for this test to mean anything"
    metarl("run", "--resume", str(killed), "--no-progress")
    assert (killed / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_sigterm_or_sigint_checkpoints_the_current_iteration_and_resume_matches(tmp_path):
    import re
    import signal

    from metarl.logger import load_checkpoint

    metarl(*small_run(tmp_path / "full"))
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        stopped = tmp_path / signum.name
        proc = subprocess.Popen([sys.executable, "-m", "metarl.cli", *small_run(stopped)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        signal_midway(proc, stopped, signum)
        stderr = proc.communicate(timeout=600)[1]
        assert proc.returncode == code, stderr
        said = re.search(rf"stopped by {signum.name} after iteration (\d+)", stderr)
        assert said and "Traceback" not in stderr and f"metarl run --resume {stopped}" in stderr
        iteration = int(said.group(1))
        assert 0 < iteration < 600, "the run must be stopped midway for this test to mean anything"
        assert load_checkpoint(stopped / "checkpoint.pt")["iteration"] == iteration  # not the last every-40
        metarl("run", "--resume", str(stopped), "--no-progress")
        assert (stopped / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("agent.inner_lrr=0.1", "unknown key(s) ['inner_lrr'] in [agent]"),
        ("agent.inner_lr='fast'", "[agent] inner_lr: expected a number"),
        ("run.num_iterations=1.5", "[run] num_iterations: expected an integer"),
        ("agent.method='mamll'", "is not one of"),
        ("agent.meta_batch_size=0", "meta_batch_size must be >= 1"),
        ("nosuch.key=1", "unknown section [nosuch]"),
    ],
)
def test_bad_config_exits_2_with_a_message_and_no_traceback(tmp_path, override, expected):
    proc = metarl("run", "experiments/sinusoid_maml.toml", "--out", str(tmp_path / "r"), "--set", override, check=False)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    if "unknown key" in expected:
        assert "inner_lr = 0.01" in proc.stderr and "outer_lr" in proc.stderr  # lists the valid keys
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_unknown_task_distribution_lists_known_ones(tmp_path):
    proc = metarl("run", "experiments/sinusoid_maml.toml", "--out", str(tmp_path / "r"),
                  "--set", "tasks.name='sinusoidd'", check=False)
    assert proc.returncode == 2 and "sinusoid" in proc.stderr and "known" in proc.stderr


def forget_recorded_config(checkpoint: Path) -> None:
    """Makes ``checkpoint`` look like one written before checkpoints recorded their config (such
    a checkpoint loads without the config check, so a test may change the learning rate)."""
    import torch

    state = torch.load(checkpoint, weights_only=False)
    del state["config"]
    torch.save(state, checkpoint)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40"))
    forget_recorded_config(run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    config = run / "config.toml"
    text = config.read_text().replace("num_iterations = 40", "num_iterations = 80")
    config.write_text(text.replace("inner_lr = 0.01", "inner_lr = 1e30"))
    proc = metarl("run", "--resume", str(run), "--no-progress", check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "checkpoint (iteration 40)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


def test_eval_writes_json_and_plots_and_prints_curve(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=20"))
    proc = metarl("eval", str(run))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["adaptation_steps"] == [0, 1, 2, 3, 5, 10]
    assert len(summary["loss_mean"]) == 6 and summary["num_tasks"] == 20
    document = json.loads((run / "eval.json").read_text())
    assert np.array(document["per_task"]["loss"]).shape == (20, 6)
    assert (run / "adaptation_loss.png").stat().st_size > 1000
    assert (run / "fits.png").stat().st_size > 1000


def test_eval_set_rescores_otherwise_and_keeps_the_earlier_scores(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=20"))
    metarl("eval", str(run))
    first = (run / "eval.json").read_text()
    proc = metarl("eval", str(run), "--set", "eval.num_tasks=5")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num_tasks"] == 5
    assert "num_tasks = 5" in (run / "config.toml").read_text()
    assert (run / "eval.iter20.json").read_text() == first
    config, scores = (run / "config.toml").read_text(), (run / "eval.json").read_text()
    refused = metarl("eval", str(run), "--set", "agent.inner_lr=0.5", check=False)
    assert refused.returncode == 2 and "agent.inner_lr" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (run / "config.toml").read_text() == config and (run / "eval.json").read_text() == scores


def test_eval_repeats_scores_each_task_again_on_fresh_data(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=20"))
    metarl("eval", str(run), "--set", "eval.num_tasks=3")
    once = json.loads((run / "eval.json").read_text())
    proc = metarl("eval", str(run), "--set", "eval.num_tasks=3", "--set", "eval.repeats=2")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_tasks"] == 3 and summary["repeats"] == 2
    twice = json.loads((run / "eval.json").read_text())
    loss = np.array(twice["per_task"]["loss"])
    assert loss.shape == (6, 6)
    assert twice["tasks"][:3] == twice["tasks"][3:] == once["tasks"]
    # the second pass over the same tasks adapts on other support sets: other losses
    assert not np.allclose(loss[:3], loss[3:])
    assert np.mean(loss[:, -1]) == pytest.approx(summary["loss_mean"][-1])


def test_one_repeat_is_the_evaluation_scored_before_repeats_existed():
    from metarl.experiment import evaluation_settings

    document = {"run": {"num_iterations": 5}, "agent": {}, "eval": {"num_tasks": 0, "seed": 1234}}
    with_key = {**document, "eval": {**document["eval"], "repeats": 1}}
    assert evaluation_settings(with_key) == evaluation_settings(document)
    assert evaluation_settings({**document, "eval": {**document["eval"], "repeats": 3}}) != evaluation_settings(document)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=10"))
    proc = metarl(*small_run(run, "run.num_iterations=10"), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_mean_ci95_and_iqm_by_hand():
    mean, ci = mean_ci95(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    assert ci == pytest.approx(1.96 * np.sqrt(((1.5**2 + 0.5**2) * 2) / 3) / 2)
    # 8 scores: drop the 2 lowest and 2 highest, mean of the middle 4.
    assert iqm(np.array([100.0, 1, 2, 3, 4, 5, 6, -100])) == pytest.approx(3.5)
    # 6 scores: ranks 1.5..4.5 -> half of the 2nd, 3rd, 4th, half of the 5th (sorted 1..6).
    assert iqm(np.arange(1.0, 7.0)) == pytest.approx((0.5 * 2 + 3 + 4 + 0.5 * 5) / 3)


def test_bootstrap_difference_interval_paired_and_unpaired():
    from metarl.evaluation import bootstrap_difference_ci, cvar

    a = np.arange(20.0)
    # paired, b = a - 5 on every task: every resample differs by exactly 5
    assert bootstrap_difference_ci(a, a - 5.0) == pytest.approx((5.0, 5.0))
    assert bootstrap_difference_ci(a, a - 5.0, cvar) == pytest.approx((5.0, 5.0))
    # unpaired (other lengths): the interval has width and covers the true difference of means
    lo, hi = bootstrap_difference_ci(a, np.arange(10.0))
    assert lo < 19 / 2 - 9 / 2 < hi and hi - lo > 1.0
    assert all(np.isnan(bootstrap_difference_ci(a[:1], a)))


def test_list_agents_names_every_config_key_inherited_ones_included():
    """`metarl list agents` lists each agent's config keys: exactly the dataclass fields, also those
    a config inherits from a shared base (MAML's episodic settings, the meta-policy-gradient ones)."""
    import dataclasses

    from agents.maml_trpo import MAMLTRPOConfig
    from agents.meta_imitation_config import MetaImitationConfig
    from metarl.config import field_docs
    from metarl.fewshot.maml import GradientLearnerConfig

    listing = metarl("list", "agents").stdout
    for path, config in [
        ("metarl.fewshot.maml:GradientLearner", GradientLearnerConfig),
        ("agents.maml_trpo:MAMLTRPO", MAMLTRPOConfig),
        ("agents.meta_imitation:MetaImitation", MetaImitationConfig),
    ]:
        names = [f.name for f in dataclasses.fields(config)]
        assert set(field_docs(config)) == set(names), config
        line = listing.split(f"  {path}\n", 1)[1].split("\n", 1)[0]
        assert set(line.removeprefix("    config keys: ").split(", ")) == set(names)
    # the docstring written in the base class, and a subclass's own where it redeclares a field
    assert field_docs(GradientLearnerConfig)["meta_batch_size"] == "Tasks per meta-iteration."
    imitation = field_docs(MetaImitationConfig)
    assert imitation["eval_adapt_steps"] == "Adaptation steps scored at evaluation."
    assert imitation["episodes_per_task"].startswith("Episodes sampled per task")


def test_meta_pg_configs_keep_their_defaults_and_the_shared_checks():
    from agents.maml_ppo import MAMLPPOConfig
    from agents.maml_trpo import MAMLTRPOConfig
    from agents.meta_imitation_config import MetaImitationConfig

    trpo, ppo, imitation = MAMLTRPOConfig(), MAMLPPOConfig(), MetaImitationConfig()
    assert (trpo.meta_batch_size, trpo.first_order, trpo.eval_adapt_steps, trpo.max_kl) == (40, False, 3, 0.01)
    assert (ppo.meta_batch_size, ppo.clip_range, ppo.outer_lr) == (40, 0.5, 1e-3)
    assert (imitation.meta_batch_size, imitation.first_order, imitation.eval_adapt_steps) == (20, True, 5)
    for config in (MAMLTRPOConfig, MAMLPPOConfig, MetaImitationConfig):
        with pytest.raises(ValueError, match="gamma and gae_lambda"):
            config(gamma=1.5)
        with pytest.raises(ValueError, match="episodes_per_task must be >= 1"):
            config(episodes_per_task=0)


def test_sweep_stopped_by_sigint_checkpoints_every_seed_and_resumes(tmp_path):
    """Ctrl-C on `metarl sweep` (the signal reaches the parent; it forwards it once to each worker):
    both seeds stop after a whole iteration with a checkpoint there, and the same command resumes."""
    import re
    import signal

    from metarl.logger import load_checkpoint

    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "metarl.cli", "sweep", "experiments/sinusoid_maml.toml", "--seeds", "2",
               "--workers", "2", "--out", str(out)]
    for item in [*SMALL, "run.log_every=1", "run.num_iterations=3000"]:
        command += ["--set", item]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal_midway(proc, [out / "base-s0", out / "base-s1"], signal.SIGINT)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr
    for seed in (0, 1):
        said = re.search(rf"base-s{seed} at iteration (\d+)", stderr)
        assert said, stderr
        assert 0 < int(said.group(1)) < 3000, "the seeds must be stopped midway for this test to mean anything"
        assert load_checkpoint(out / f"base-s{seed}" / "checkpoint.pt")["iteration"] == int(said.group(1))
    assert not processes_mentioning(str(out)), "a worker outlived the command"
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    for seed in (0, 1):
        logged = [json.loads(line)["iteration"] for line in (out / f"base-s{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, 3001))


def _needs_forked_workers() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a machine with CUDA the pool spawns its workers: they do not share the parent's command line")


def _training_sweep(out: Path, seeds: int, iterations: int) -> subprocess.Popen:
    """A sinusoid sweep of ``seeds`` runs, one worker each, checkpointing only at its end, returned
    once every run is training."""
    command = [sys.executable, "-m", "metarl.cli", "sweep", "experiments/sinusoid_maml.toml", "--seeds", str(seeds),
               "--workers", str(seeds), "--out", str(out)]
    for item in [*SMALL, "run.log_every=1", f"run.num_iterations={iterations}", f"run.checkpoint_every={5 * iterations}"]:
        command += ["--set", item]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal_midway(proc, [out / f"base-s{seed}" for seed in range(seeds)], 0)  # 0: only waits until they train
    return proc


def test_a_sweep_whose_workers_get_the_signal_too_still_stops_each_after_its_iteration(tmp_path):
    """`pkill -TERM -f "metarl sweep ..."` reaches the parent and its forked workers, which share its
    command line: a worker then gets the signal directly and the parent's request as well, and
    must count them once (two would stop it at once, without a checkpoint at its iteration)."""
    _needs_forked_workers()
    import os
    import re
    import signal

    from metarl.logger import load_checkpoint

    out = tmp_path / "sweep"
    proc = _training_sweep(out, seeds=2, iterations=3000)
    everyone = [proc.pid] + [pid for pid in processes_mentioning(str(out)) if pid != proc.pid]
    assert len(everyone) >= 3, "the workers must share the parent's command line for this test to mean anything"
    for pid in everyone:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "again: stopped at once" not in stderr, stderr
    for seed in (0, 1):
        said = re.search(rf"base-s{seed} at iteration (\d+)", stderr)
        assert said, stderr
        assert load_checkpoint(out / f"base-s{seed}" / "checkpoint.pt")["iteration"] == int(said.group(1))


def test_a_sweep_whose_worker_alone_was_stopped_says_so_and_does_not_pass_for_finished(tmp_path):
    """A signal sent to one worker alone stops its run after the iteration, with a checkpoint
    there; the sweep then exits with that signal's status and names the stopped run, instead of
    reporting success over the seeds that did finish."""
    _needs_forked_workers()
    import os
    import re
    import signal

    from metarl.logger import load_checkpoint

    out = tmp_path / "sweep"
    proc = _training_sweep(out, seeds=1, iterations=100000)
    workers = [pid for pid in processes_mentioning(str(out)) if pid != proc.pid]
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGTERM)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, stderr
    said = re.search(r"base-s0 at iteration (\d+)", stderr)
    assert said and "run the same command again" in stderr, stderr
    assert load_checkpoint(out / "base-s0" / "checkpoint.pt")["iteration"] == int(said.group(1))


def test_a_sweep_stopped_after_some_seeds_finished_reports_those_and_the_command_finishes_the_rest(tmp_path):
    """One worker: seed 0 trains to the end, then SIGTERM arrives while seed 1 trains. The sweep
    exits 143, its sweep.json holds seed 0 alone (its scores equal to seed 0's eval.json) and the
    command that, run again, finishes seed 1 and pools both."""
    import signal

    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "metarl.cli", "sweep", "experiments/sinusoid_maml.toml", "--seeds", "2",
               "--workers", "1", "--out", str(out)]
    for item in [*SMALL, "run.log_every=1", "run.num_iterations=2000", "run.eval_at_end=true", "eval.num_tasks=4"]:
        command += ["--set", item]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal_midway(proc, out / "base-s1", signal.SIGTERM)
    stderr = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, stderr
    report = json.loads((out / "sweep.json").read_text())
    first = json.loads((out / "base-s0" / "eval.json").read_text())
    assert report["cells"]["base"]["num_seeds"] == 1 and not (out / "base-s1" / "eval.json").exists()
    assert report["cells"]["base"]["loss"]["mean"] == pytest.approx(first["summary"]["loss"]["mean"])
    assert report["sweep_command"].split("--seeds 2")[0].endswith("sweep experiments/sinusoid_maml.toml ")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "sweep.json").read_text())["cells"]["base"]["num_seeds"] == 2


POOL_JOB_SCRIPT = """
import sys, time
from metarl.stopping import StoppablePool

def job():  # like a cell being scored: it does not stop at the first signal
    from metarl import stopping

    print("started", flush=True)
    told = False
    while True:
        if stopping._worker_stopping and not told:  # the parent passed the signal on; go on
            print("told", flush=True)
            told = True
        time.sleep(0.01)

if __name__ == "__main__":
    with StoppablePool(1) as pool:
        pool.result(pool.submit(job), "job")
"""


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_a_second_signal_stops_a_pool_command_at_once_with_its_exit_status_and_no_traceback(tmp_path):
    """The first SIGTERM lets a job that is scoring go on; the second stops the job and the
    command at once: exit status 143, a message saying so, no traceback, and no worker left."""
    import signal

    marker = str(tmp_path / "second-signal")  # names this command's processes in /proc
    proc = subprocess.Popen([sys.executable, "-c", POOL_JOB_SCRIPT, marker], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "told"  # the worker got the signal, and runs on
    assert proc.poll() is None, "the first signal must leave a scoring job running"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    assert "SIGTERM again: stopped at once" in stderr and "run the same command again" in stderr
    assert not processes_mentioning(marker), "a worker outlived the command"


def test_a_pool_worker_told_to_stop_before_its_run_began_stops_after_one_iteration(tmp_path, monkeypatch):
    """A signal that reaches a worker while it loads data (before Experiment.run installs its
    handlers) still stops the run: after its first iteration, with a checkpoint there."""
    from metarl import stopping
    from metarl.experiment import Experiment
    from metarl.logger import load_checkpoint

    experiment = Experiment.create("experiments/sinusoid_maml.toml", SMALL, tmp_path / "run")
    monkeypatch.setattr(stopping, "_worker_stopping", ["SIGTERM"])
    with pytest.raises(stopping.TrainingStopped, match="stopped by SIGTERM after iteration 1;"):
        experiment.run(progress=False)
    experiment.close()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["iteration"] == 1
    with pytest.raises(stopping.NotStarted):  # and the jobs queued after it are refused
        stopping._call(print, "never")


def test_a_signal_a_pool_worker_caught_outside_a_run_keeps_its_queued_jobs_from_starting(monkeypatch):
    """A stop signal caught while a worker scores a finished run (inside stop_signals, which
    does not stop such work) still tells the worker to start no more jobs; in the main process,
    a caught signal is not carried over to the next run."""
    import os
    import signal

    from metarl import stopping

    monkeypatch.setattr(stopping, "_worker_stopping", [])
    monkeypatch.setattr(stopping, "_in_worker", [])
    with stopping.stop_signals() as received:
        os.kill(os.getpid(), signal.SIGTERM)
    assert received == ["SIGTERM"] and stopping._worker_stopping == []
    monkeypatch.setattr(stopping, "_in_worker", [True])
    with stopping.stop_signals() as received:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopping._worker_stopping == ["SIGTERM"]
    with pytest.raises(stopping.NotStarted):
        stopping._call(print, "never")


def test_a_ctrl_c_then_a_kill_interrupts_at_once():
    """SIGINT and SIGTERM count together: the second stop signal of either kind interrupts."""
    import os
    import signal

    from metarl import stopping

    with pytest.raises(KeyboardInterrupt), stopping.stop_signals() as received:
        os.kill(os.getpid(), signal.SIGINT)
        assert received == ["SIGINT"]
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass


def _signal_own_worker() -> str:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGTERM)  # outside a run: the worker takes no further job
    return "scored"


def test_runs_a_worker_signalled_between_runs_never_started_are_reported_not_passed_over():
    from metarl.stopping import StoppablePool

    with StoppablePool(1) as pool:
        first = pool.result(pool.submit(_signal_own_worker), "first")
        second = pool.result(pool.submit(_pid_of_worker), "second")
    report = pool.stop_report(finished=1)
    assert (first, second) == ("scored", None)
    assert report is not None and report.exit_code == 143 and "1 runs not started" in str(report), report


def _pid_of_worker() -> int:
    import os

    return os.getpid()


def _exit_worker() -> None:
    import os

    os._exit(3)


def test_a_pool_forwards_signals_to_the_workers_that_registered_and_skips_one_that_exited():
    """The workers a pool signals are those its initializer registered and that are still its
    children: a job's worker is among them, and once that worker has exited it no longer is,
    without any error."""
    from concurrent.futures.process import BrokenProcessPool

    from metarl.stopping import StoppablePool

    with StoppablePool(1) as pool:
        pid = pool.result(pool.submit(_pid_of_worker), "pid")
        assert pool._live_workers() == [pid]
        with pytest.raises(BrokenProcessPool):
            pool.result(pool.submit(_exit_worker), "exit")
        pool._pool.shutdown(wait=True)  # returns once the broken pool has reaped its workers
        assert pid not in pool._live_workers()


def _start_method_of_worker() -> str:
    import multiprocessing

    return multiprocessing.get_start_method()


def test_a_pool_starts_its_workers_fresh_on_a_machine_with_cuda(monkeypatch, tmp_path):
    """A worker forked after the parent asked for the GPU cannot use it ("Cannot re-initialize CUDA
    in forked subprocess", what a sweep of device = "cuda" runs met): on a machine with CUDA the
    pool spawns them, and a sweep still runs its seeds."""
    import torch

    from metarl.stopping import StoppablePool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with StoppablePool(1) as pool:
        assert pool._pool._mp_context.get_start_method() == "spawn"
        assert pool.result(pool.submit(_start_method_of_worker), "method") == "spawn"
    out = metarl("sweep", "experiments/sinusoid_maml.toml", "--seeds", "2", "--workers", "2", "--out", str(tmp_path),
                 *[x for item in (*SMALL, "run.num_iterations=20") for x in ("--set", item)])
    assert json.loads((tmp_path / "sweep.json").read_text())["cells"]["base"]["num_seeds"] == 2, out
