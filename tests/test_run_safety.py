"""Run-directory safety: one owner at a time, resumes checked against their checkpoint, logs
trimmed to it, unreadable checkpoints and bad values refused with one line (exit 2), faults of the
machine reported with what was kept.

Tests that stop a process wait on events (a lock taken, a line logged), never on a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_helpers import wait_for
from test_experiment import ROOT, SMALL, metarl, small_run

from metarl.config import load_toml
from metarl.experiment import dump_toml
from metarl.logger import load_checkpoint


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _iterations(path: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in _lines(path)]


def _edit_config(run: Path, **changes: object) -> None:
    """Sets ``section.key`` values (``run__num_iterations=60``) in a run's config.toml."""
    document = load_toml(run / "config.toml")
    for name, value in changes.items():
        section, key = name.split("__")
        document[section][key] = value
    (run / "config.toml").write_text(dump_toml(document))


def _one_line_error(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def _lock_owner(run: Path) -> str:
    path = run / ".lock"
    return path.read_text().strip() if path.exists() else ""


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metarl.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


# ------------------------------------------------------------------ one owner per run directory


def test_two_resumes_at_once_the_second_stops_naming_the_first_and_logs_stay_in_order(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40"))
    _edit_config(run, run__num_iterations=100_000, run__log_every=1)
    first = _cli("run", "--resume", str(run), "--no-progress")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: _lock_owner(run) == str(first.pid) and len(_lines(metrics)) > 5,
             "lock taken and training under way", first)
    second = metarl("run", "--resume", str(run), "--no-progress", check=False)
    _one_line_error(second, f"in use by process {first.pid}", str(run))
    _one_line_error(metarl("eval", str(run), check=False), f"in use by process {first.pid}")
    first.send_signal(signal.SIGTERM)
    assert first.communicate(timeout=300)[1].count("stopped by SIGTERM") == 1
    assert first.returncode == 143
    logged = _iterations(metrics)
    stopped_at = load_checkpoint(run / "checkpoint.pt")["iteration"]
    assert logged == [10, 20, 30, 40, *range(41, stopped_at + 1)]
    # the lock went with its owner: the next resume is allowed
    _edit_config(run, run__num_iterations=stopped_at + 3)
    metarl("run", "--resume", str(run), "--no-progress")
    assert _iterations(metrics) == [10, 20, 30, 40, *range(41, stopped_at + 4)]


def test_a_sweep_run_takes_the_lock_of_its_run_directory(tmp_path):
    """A run directory held by another process is not trained by a sweep either."""
    from metarl.sweep import run_one

    run = tmp_path / "sweep" / "base-s0"
    run.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from metarl.logger import lock_run_dir; "
         f"lock_run_dir({str(run)!r}); print('held', flush=True); sys.stdin.readline()"],
        cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"in use by process {holder.pid}"):
        run_one("experiments/sinusoid_maml.toml", ["run.num_iterations=2"], str(run), None)
    holder.communicate("\n", timeout=60)
    assert not (run / "metrics.jsonl").exists() and not (run / "config.toml").exists()


# ------------------------------------------------------------------ resume trims the logs


def test_a_run_killed_before_its_first_checkpoint_resumes_afresh_keeping_no_line(tmp_path):
    args = ["run.num_iterations=300", "run.log_every=1", "run.checkpoint_every=1000"]
    metarl(*small_run(tmp_path / "full", *args))
    killed = tmp_path / "killed"
    proc = _cli(*small_run(killed, *args))
    wait_for(lambda: len(_lines(killed / "metrics.jsonl")) >= 3, "three metrics lines", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint.pt").exists() and 3 <= len(_lines(killed / "metrics.jsonl")) < 300
    assert _lock_owner(killed) == str(proc.pid)  # a stale lock file: its flock died with the process
    assert "stopped before its first checkpoint" in metarl("run", "--resume", str(killed), "--no-progress").stderr
    assert (killed / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert _iterations(killed / "timing.jsonl") == list(range(1, 301))


def test_nan_before_the_first_checkpoint_says_there_is_none_and_resume_starts_afresh(tmp_path):
    run = tmp_path / "r"
    result = metarl(*small_run(run, "run.num_iterations=20", "run.log_every=1", "agent.inner_lr=1e30"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "non-finite loss" in result.stderr and "no checkpoint was saved" in result.stderr
    assert "intact" not in result.stderr and not (run / "checkpoint.pt").exists()
    _edit_config(run, agent__inner_lr=0.01)  # no checkpoint, so nothing to compare with
    metarl("run", "--resume", str(run), "--no-progress")
    metarl(*small_run(tmp_path / "clean", "run.num_iterations=20", "run.log_every=1"))
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "clean" / "metrics.jsonl").read_text()


def test_resume_drops_a_half_written_last_line_and_allows_run_length_and_eval_changes(tmp_path):
    metarl(*small_run(tmp_path / "full", "run.num_iterations=60"))
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40"))
    for name in ("metrics.jsonl", "timing.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"iteration": 50, "train/lo')  # killed while writing
    _edit_config(run, run__num_iterations=60, run__checkpoint_every=7, run__eval_at_end=False, eval__seed=5)
    metarl("run", "--resume", str(run), "--no-progress")
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert _iterations(run / "timing.jsonl") == list(range(10, 61, 10))


def test_resume_rebuilds_tensorboard_scalars_when_the_run_directory_has_none(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40"))
    shutil.rmtree(run / "tb")  # e.g. committed without its events and resumed on another machine
    _edit_config(run, run__num_iterations=60)
    metarl("run", "--resume", str(run), "--no-progress")
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    metric = next(k for k, v in json.loads(_lines(run / "metrics.jsonl")[0]).items()
                  if k != "iteration" and isinstance(v, float))
    for tag in (metric, "time/iteration_s"):
        assert [e.step for e in events.Scalars(tag)] == list(range(10, 61, 10)), tag
    first = json.loads(_lines(run / "metrics.jsonl")[0])[metric]
    assert events.Scalars(metric)[0].value == pytest.approx(first, rel=1e-6)


# ------------------------------------------------------------------ checkpoints and their config


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("agent", "outer_lr", 0.002), ("agent", "method", "fomaml"), ("run", "seed", 1),
     ("tasks", "num_test_tasks", 21), ("tasks", "test_seed", 7)],  # test_seed: a key not given at first
)
def test_resume_and_eval_refuse_a_config_that_changes_the_model_or_algorithm(tmp_path, section, key, value):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=20"))
    before = (run / "metrics.jsonl").read_text()
    _edit_config(run, **{f"{section}__{key}": value})
    _one_line_error(metarl("run", "--resume", str(run), "--no-progress", check=False), f"{section}.{key}", "start a new run")
    _one_line_error(metarl("eval", str(run), check=False), f"{section}.{key}")
    assert (run / "metrics.jsonl").read_text() == before and not (run / "eval.json").exists()


def _trained_with_checkpoint_edited(run: Path, edit) -> None:
    """A 20-iteration run whose checkpoint ``edit`` (a function of its state) changed in place."""
    metarl(*small_run(run, "run.num_iterations=20"))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    edit(state)
    torch.save(state, run / "checkpoint.pt")


def test_a_checkpoint_from_before_configs_were_recorded_still_loads(tmp_path):
    run = tmp_path / "r"
    _trained_with_checkpoint_edited(run, lambda state: state.pop("config"))
    _edit_config(run, run__num_iterations=30)
    metarl("run", "--resume", str(run), "--no-progress")
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 30


def test_a_key_the_checkpoint_never_recorded_resumes_at_its_default_and_is_refused_at_another_value(tmp_path):
    # A checkpoint from before the code gained a field trained with the field's default.
    run = tmp_path / "r"
    _trained_with_checkpoint_edited(run, lambda state: state["config"]["agent"].pop("num_eval_queries"))
    assert load_toml(run / "config.toml")["agent"]["num_eval_queries"] == 100  # the default
    before = (run / "metrics.jsonl").read_text()
    _edit_config(run, run__num_iterations=30, agent__num_eval_queries=50)
    _one_line_error(metarl("run", "--resume", str(run), "--no-progress", check=False), "agent.num_eval_queries")
    assert (run / "metrics.jsonl").read_text() == before
    _edit_config(run, agent__num_eval_queries=100)
    metarl("run", "--resume", str(run), "--no-progress")
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 30


def test_resume_refuses_an_out_instead_of_training_the_original_in_place(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=20"))
    before = (run / "metrics.jsonl").read_text()
    result = metarl("run", "--resume", str(run), "--out", str(tmp_path / "copy"), "--set", "run.num_iterations=30",
                    check=False)
    _one_line_error(result, "--out", "copy the run directory")
    assert (run / "metrics.jsonl").read_text() == before and not (tmp_path / "copy").exists()


def test_an_unreadable_checkpoint_is_one_line_naming_it_and_the_previous_one_restores(tmp_path):
    metarl(*small_run(tmp_path / "full", "run.num_iterations=60"))
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40", "run.checkpoint_every=20"))
    checkpoint, prev = run / "checkpoint.pt", run / "checkpoint.prev.pt"
    assert load_checkpoint(prev)["iteration"] == 20 and load_checkpoint(checkpoint)["iteration"] == 40
    good = checkpoint.read_bytes()
    _edit_config(run, run__num_iterations=60)
    for corrupt in (b"", good[: len(good) // 2], os.urandom(4096)):
        checkpoint.write_bytes(corrupt)
        for args in (("run", "--resume", str(run), "--no-progress"), ("eval", str(run))):
            _one_line_error(metarl(*args, check=False), f"cannot read checkpoint {checkpoint}", f"cp {prev} {checkpoint}")
    shutil.copyfile(prev, checkpoint)  # as the message says
    metarl("run", "--resume", str(run), "--no-progress")
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    prev.unlink()
    checkpoint.write_bytes(b"")
    _one_line_error(metarl("eval", str(run), check=False), "no previous checkpoint is kept")


# ------------------------------------------------------------------ values checked where they enter


@pytest.mark.parametrize(
    ("config", "override", "expected"),
    [
        ("sinusoid_maml", "eval.num_tasks=-1", "num_tasks must be >= 0"),
        ("sinusoid_maml", "eval.repeats=0", "repeats must be >= 1"),
        ("sinusoid_maml", "eval.seed=-1", "[eval] seed must be >= 0"),
        ("sinusoid_maml", "run.seed=-3", "[run] seed must be >= 0"),
        ("sinusoid_maml", "tasks.num_test_tasks=0", "num_test_tasks"),
        ("sinusoid_maml", "tasks.num_test_tasks=2.5", "expected a whole number >= 1"),
        ("maml_trpo_nav2d", "tasks.horizon=2.5", "horizon = 2.5"),
        ("maml_trpo_nav2d", "tasks.horizon=0", "horizon = 0"),
        ("maml_trpo_nav2d", "tasks.horizon=-5", "horizon = -5"),
        ("maml_trpo_nav2d", "tasks.split_seed=-1", "split_seed = -1"),
        ("omniglot_protonet", "tasks.num_ways=0", "num_ways = 0"),
        ("omniglot_protonet", "tasks.data_dir='/nonexistent/omniglot'", "not found"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(tmp_path, config, override, expected):
    out = tmp_path / "r"
    result = metarl("run", f"experiments/{config}.toml", "--out", str(out), "--set", override, check=False)
    _one_line_error(result, expected)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("tasks", "agent"),
    [("sinusoid", "agents.maml_trpo:MAMLTRPO"), ("navigation-2d", None)],
)
def test_an_agent_that_does_not_fit_the_distribution_is_one_line(tmp_path, tasks, agent):
    config = tmp_path / "c.toml"
    run = f'[run]\nagent = "{agent}"\n' if agent else "[run]\n"
    config.write_text(f'{run}[tasks]\nname = "{tasks}"\n[agent]\n[eval]\n')
    _one_line_error(metarl("run", str(config), "--out", str(tmp_path / "r"), check=False), "does not fit", tasks)


def test_an_out_that_cannot_hold_a_run_directory_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "under"):
        _one_line_error(metarl(*small_run(out, "run.num_iterations=2"), check=False), f"--out {out}", "file is in the way")
    read_only = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args, **kwargs):  # root ignores permission bits, so refuse by hand
        if self == read_only:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    _one_line_error(metarl(*small_run(read_only, "run.num_iterations=2"), check=False), "Permission denied", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_out_is_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        _one_line_error(metarl(*small_run(parent / "r", "run.num_iterations=2"), check=False), "Permission denied")
    finally:
        parent.chmod(0o700)


def test_envs_make_refuses_a_horizon_that_is_not_a_whole_number_of_at_least_one():
    import envs

    for horizon in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"horizon={horizon!r} must be a whole number >= 1"):
            envs.make("navigation-2d", horizon=horizon)
    assert envs.make("navigation-2d", horizon=7).horizon == 7


def test_adapt_refuses_a_non_finite_rate_and_a_rate_that_would_reshape_its_parameter():
    from metarl.adaptation import adapt

    params = {"w": torch.ones(3, 2), "b": torch.zeros(2)}

    def loss(p, data):
        return (p["w"] ** 2).sum() + p["b"].sum()

    for lr in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a finite number"):
            adapt(loss, params, None, 1, lr)
    with pytest.raises(ValueError, match=r"learning rate of 'w' has shape \(3,\).*\(3, 2\)"):
        adapt(loss, params, None, 1, {"w": torch.ones(3), "b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"learning rate of 'b' has shape \(2, 2\)"):
        adapt(loss, params, None, 1, {"w": torch.ones(3, 2), "b": torch.ones(2, 2)})
    fine = adapt(loss, params, None, 1, {"w": torch.full((2,), 0.5), "b": torch.tensor(0.1)})
    assert fine["w"].shape == (3, 2) and torch.allclose(fine["w"], torch.zeros(3, 2))  # 1 - 0.5 * 2
    assert torch.allclose(fine["b"], torch.full((2,), -0.1))


# ------------------------------------------------------------------ faults of the machine


def _grandchildren(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    children = {p for p, parent in parents.items() if parent == pid}
    return sorted(p for p, parent in parents.items() if parent in children)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_worker_dying_during_a_run_is_one_line_saying_resume_continues(tmp_path):
    from test_maml_rl import TINY

    run = tmp_path / "r"
    args = ["run", "experiments/maml_trpo_nav2d.toml", "--out", str(run), "--no-progress"]
    for item in [*TINY, "run.num_iterations=100000", "agent.backend='process'", "agent.num_workers=2",
                 "agent.envs_per_worker=1"]:
        args += ["--set", item]
    proc = _cli(*args)
    wait_for(lambda: (run / "checkpoint.pt").exists() and len(_lines(run / "metrics.jsonl")) >= 6,
             "a checkpoint and a line after it", proc)
    workers = _grandchildren(proc.pid)  # the forkserver's children
    assert workers, "the process backend should have started workers"
    os.kill(workers[0], signal.SIGKILL)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: a rollout worker failed at iteration"), stderr
    assert "the checkpoint of iteration" in line and f"metarl run --resume {run}" in line


def test_a_disk_that_refuses_writes_is_one_line_saying_what_was_kept(tmp_path, monkeypatch):
    import errno

    from metarl import experiment as experiment_mod

    run = tmp_path / "r"
    real_save = experiment_mod.save_checkpoint
    saves: list[int] = []

    def full_disk(path, state):
        saves.append(state["iteration"])
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, state)

    monkeypatch.setattr(experiment_mod, "save_checkpoint", full_disk)
    result = metarl(*small_run(run, "run.num_iterations=60", "run.checkpoint_every=20"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    assert "the checkpoint of iteration 20 is kept" in lines[0] and f"metarl run --resume {run}" in lines[0]
    monkeypatch.setattr(experiment_mod, "save_checkpoint", real_save)
    metarl("run", "--resume", str(run), "--no-progress")
    metarl(*small_run(tmp_path / "full", "run.num_iterations=60", "run.checkpoint_every=20"))
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_the_readme_sampling_snippet_runs_as_a_script(tmp_path):
    text = (ROOT / "README.md").read_text()
    snippet = text.split("## Sampling", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = tmp_path / "sample.py"
    script.write_text(snippet)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([4, 20, 100, 2])" in done.stdout


# ------------------------------------------------------------------ training a run further


def test_resume_with_set_trains_further_and_matches_a_run_trained_straight_through(tmp_path):
    metarl(*small_run(tmp_path / "full", "run.num_iterations=60"))
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40"))
    metarl("run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=60")
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert load_toml(run / "config.toml")["run"]["num_iterations"] == 60
    # machines.jsonl: where and under which commit each stretch trained (iterations 0 and 40)
    stretches = [json.loads(line) for line in _lines(run / "machines.jsonl")]
    assert [s["iteration"] for s in stretches] == [0, 40]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert all(s["code"].removesuffix("+modified") == expected for s in stretches), stretches


def test_a_run_continues_on_another_backend_and_worker_count_with_the_same_numbers(tmp_path):
    """Placement keys (backend, num_workers, envs_per_worker, device) may change when a run continues
    on another machine: episodes are seeded per (call, task, episode), not per worker."""
    tiny = ["run.log_every=1", "run.checkpoint_every=1", "run.eval_at_end=false", "tasks.horizon=10",
            "agent.meta_batch_size=3", "agent.episodes_per_task=2", "agent.backend=serial"]
    args = ["run", "experiments/maml_trpo_nav2d.toml", "--no-progress"]
    sets = [x for item in tiny for x in ("--set", item)]
    metarl(*args, "--out", str(tmp_path / "full"), *sets, "--set", "run.num_iterations=3")
    run = tmp_path / "r"
    metarl(*args, "--out", str(run), *sets, "--set", "run.num_iterations=2")
    _edit_config(run, agent__device="cuda")  # as if trained on a GPU: it continues here on the CPU
    _one_line_error(metarl("run", "--resume", str(run), "--no-progress", check=False), "device='cuda'", "device='cpu'")
    metarl("run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=3", "--set", "agent.device=cpu",
           "--set", "agent.backend=process", "--set", "agent.num_workers=2", "--set", "agent.envs_per_worker=1")
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    agent = load_toml(run / "config.toml")["agent"]
    assert (agent["backend"], agent["num_workers"], agent["envs_per_worker"], agent["device"]) == ("process", 2, 1, "cpu")


def test_resume_with_set_refuses_model_keys_and_fewer_iterations_than_trained(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=40"))
    before = {name: (run / name).read_bytes() for name in ("config.toml", "metrics.jsonl", "checkpoint.pt")}
    _one_line_error(metarl("run", "--resume", str(run), "--set", "agent.outer_lr=0.5", check=False),
                    "agent.outer_lr", "another --out")
    _one_line_error(metarl("run", "--resume", str(run), "--set", "run.num_iterations=30", check=False),
                    "trained 40 iterations", "at least 40")
    assert {name: (run / name).read_bytes() for name in before} == before


def _sweep(out: Path, *extra: str, check: bool = True):
    args = ["sweep", "experiments/sinusoid_maml.toml", "--seeds", "1", "--workers", "1", "--out", str(out)]
    for item in [*SMALL, "run.eval_at_end=true", "eval.num_tasks=4", *extra]:
        args += ["--set", item]
    return metarl(*args, check=check)


def test_a_sweep_continues_runs_recorded_on_a_gpu_on_this_machine(tmp_path):
    """A sweep's runs trained on a GPU machine (config.toml says device = "cuda") continue under the
    same command on a CPU machine: the sweep's own config places them, and records it."""
    _sweep(tmp_path / "straight", "run.num_iterations=60")
    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=40", "run.eval_at_end=false")
    run = out / "base-s0"
    _edit_config(run, agent__device="cuda")
    _sweep(out, "run.num_iterations=60")
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "straight" / "base-s0" / "metrics.jsonl").read_text()
    assert load_toml(run / "config.toml")["agent"]["device"] == "cpu"


def test_the_same_sweep_asking_more_iterations_trains_its_runs_further_keeping_the_first_evaluation(tmp_path):
    _sweep(tmp_path / "straight", "run.num_iterations=60")
    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=40")
    run = out / "base-s0"
    first = (run / "eval.json").read_text()
    _sweep(out, "run.num_iterations=40")  # the same command reuses the finished run untouched
    assert (run / "eval.json").read_text() == first and _iterations(run / "metrics.jsonl")[-1] == 40
    _sweep(out, "run.num_iterations=60")
    assert (run / "eval.iter40.json").read_text() == first
    straight = tmp_path / "straight" / "base-s0"
    assert (run / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    scores = [{k: v for k, v in json.loads((d / "eval.json").read_text())["summary"].items() if k != "plots"}
              for d in (run, straight)]
    assert scores[0] == scores[1] and "loss_mean" in scores[0]


def test_a_sweep_over_runs_trained_with_other_settings_stops_before_touching_them(tmp_path):
    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=20")
    run = out / "base-s0"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _one_line_error(_sweep(out, "run.num_iterations=40", "agent.outer_lr=0.5", check=False),
                    "agent.outer_lr", "another --out")
    _one_line_error(_sweep(out, "run.num_iterations=10", check=False), "trained 20 iterations")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_an_evaluation_from_another_iteration_is_never_reused_and_always_kept(tmp_path):
    """`metarl run --resume --set run.num_iterations=60` on a finished, evaluated 40-iteration run
    keeps that evaluation as eval.iter40.json; stopped before its end (no eval_at_end), the run
    holds no eval.json of iteration 60, so a sweep asking for 60 trains on rather than reusing one."""
    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=40")
    run = out / "base-s0"
    first = (run / "eval.json").read_text()
    metarl("run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=60",
           "--set", "run.eval_at_end=false")
    assert (run / "eval.iter40.json").read_text() == first and not (run / "eval.json").exists()
    _sweep(out, "run.num_iterations=60")
    assert json.loads((run / "eval.json").read_text())["summary"]["iteration"] == 60


def test_an_evaluation_is_checked_against_the_settings_it_recorded_not_an_edited_config(tmp_path):
    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=20")
    run = out / "base-s0"
    first = json.loads((run / "eval.json").read_text())
    assert first["settings"]["evaluation"]["eval"]["num_tasks"] == 4 and first["settings"]["baselines"] is None
    _edit_config(run, eval__num_tasks=6)  # by hand: the file now claims 6 tasks were scored
    _sweep(out, "run.num_iterations=20", "eval.num_tasks=6")
    assert json.loads((run / "eval.iter20.json").read_text()) == first
    assert json.loads((run / "eval.json").read_text())["summary"]["num_tasks"] == 6


def test_a_sweep_asking_for_baselines_does_not_reuse_an_evaluation_without_them_or_with_others(tmp_path):
    from metarl.experiment import resolve_document
    from metarl.sweep import _evaluated_as_asked

    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=20")
    run = out / "base-s0"
    requested = resolve_document(load_toml(run / "config.toml"))
    options = {"pretrain_steps": 100, "episodes": 5, "algo": "ppo"}
    assert _evaluated_as_asked(run, requested) and not _evaluated_as_asked(run, requested, options)
    document = json.loads((run / "eval.json").read_text())
    document["settings"]["baselines"] = options
    (run / "eval.json").write_text(json.dumps(document))
    assert _evaluated_as_asked(run, requested, options)
    assert not _evaluated_as_asked(run, requested, {**options, "pretrain_steps": 200})


def test_resuming_a_run_whose_config_was_extended_by_hand_keeps_its_earlier_evaluation(tmp_path):
    run = tmp_path / "r"
    metarl(*small_run(run, "run.num_iterations=20", "run.eval_at_end=true", "eval.num_tasks=4"))
    first = (run / "eval.json").read_text()
    _edit_config(run, run__num_iterations=30)
    metarl("run", "--resume", str(run), "--no-progress")
    assert (run / "eval.iter20.json").read_text() == first
    assert json.loads((run / "eval.json").read_text())["summary"]["iteration"] == 30


def test_changing_only_how_a_finished_run_is_scored_scores_it_again_without_training(tmp_path):
    out = tmp_path / "sweep"
    _sweep(out, "run.num_iterations=20")
    run = out / "base-s0"
    metrics, checkpoint = (run / "metrics.jsonl").read_text(), (run / "checkpoint.pt").read_bytes()
    _sweep(out, "run.num_iterations=20", "eval.seed=7")
    assert (run / "eval.iter20.json").exists() and (run / "metrics.jsonl").read_text() == metrics
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    assert load_toml(run / "config.toml")["eval"]["seed"] == 7
    scores = [json.loads((run / name).read_text())["summary"]["loss"]["mean"] for name in ("eval.iter20.json", "eval.json")]
    assert scores[0] != scores[1]  # other held-out tasks were scored
