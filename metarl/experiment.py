"""The experiment runner: config, seeding, the training loop, checkpoint/resume and logs.

A run directory holds::

    config.toml       the resolved config (after --set overrides)
    metrics.jsonl     one line per logged iteration (seed-determined values only)
    timing.jsonl      wall-time figures (iterations/s, env steps/s)
    machines.jsonl    which machine (and code commit) trained from which iteration on
    tb/               TensorBoard events
    checkpoint.pt     the latest checkpoint, written atomically, with the config it was trained with
    checkpoint.prev.pt  the checkpoint before it (to restore if the latest cannot be read)
    checkpoint.portable.pt  for agents with data they can collect again (:class:`metarl.agent.PortableState`,
                      PEARL's replay buffers): the same checkpoint without that data, small enough to
                      keep in a repository; a resume uses it only when ``checkpoint.pt`` is missing,
                      collects the data again, and records that in ``machines.jsonl``
    .lock             held by the process that owns the run directory (see :func:`metarl.logger.lock_run_dir`)
    eval.json, *.png  held-out evaluation and plots (``metarl eval``)

Seeding happens here and only here: the agent gets ``seed`` and owns its own generators; the runner
owns the task-sampling generator. Both are checkpointed, so a resumed run continues exactly.
A resume drops the log lines written after the checkpoint (all of them when there is none) and
refuses a ``config.toml`` that changes the model or the algorithm since the checkpoint
(:func:`config_changes`).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import weakref
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.agent import Agent, PortableState
from metarl.config import ConfigError, apply_overrides, build, load_toml
from metarl.diagnostics import InnerStepWatch
from metarl.logger import (
    CheckpointError,
    MetricsLogger,
    load_checkpoint,
    lock_run_dir,
    save_checkpoint,
    unlock_run_dir,
)
from metarl.registry import make_distribution, resolve_agent
from metarl.stopping import TrainingStopped, stop_signals

SECTIONS = ("run", "tasks", "agent", "eval")
PORTABLE_CHECKPOINT = "checkpoint.portable.pt"


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a resume of ``run_dir`` loads: ``checkpoint.pt``, else (on a machine that
    has only what a repository kept) ``checkpoint.portable.pt``; ``None`` when there is neither."""
    for name in ("checkpoint.pt", PORTABLE_CHECKPOINT):
        if (run_dir / name).exists():
            return run_dir / name
    return None


# Keys that may change between a checkpoint and its resume: they change neither the model nor the
# algorithm (how long to train, how often to log and save, how to evaluate).
FREE_RUN_KEYS = ("num_iterations", "log_every", "checkpoint_every", "eval_at_end", "eval_every")
FREE_SECTIONS = ("eval",)
# [agent] keys that only change how a run is evaluated (held-out adaptation steps and episodes).
FREE_AGENT_KEYS = ("eval_adapt_steps", "eval_episodes_per_task", "eval_later_lr", "eval_episodes")
# [agent] keys that only say where the work runs, so a run may continue on another machine: every
# episode is seeded from (seed, call, task, episode) whichever backend, worker or slot runs it, and
# a checkpoint holds its tensors on the CPU. The numbers agree up to the devices' floating-point
# rounding; each run's machines.jsonl records where every stretch of it ran.
PLACEMENT_AGENT_KEYS = ("backend", "num_workers", "envs_per_worker", "device")


@dataclass(frozen=True)
class RunConfig:
    agent: str = "metarl.fewshot.maml:GradientLearner"
    """Import path of the agent class, 'module:Class' (see `metarl list`)."""
    seed: int = 0
    """Seed of everything random in the run."""
    num_iterations: int = 1000
    """Meta-iterations to train."""
    log_every: int = 10
    """Write metrics every this many iterations."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many iterations (and at the end)."""
    eval_at_end: bool = True
    """Evaluate on held-out tasks when training ends."""
    eval_every: int = 0
    """Also evaluate on the held-out tasks every this many iterations (0: never), logging the mean
    of each metric after each adaptation step as ``eval/<metric>_step<k>`` (learning curves)."""

    def __post_init__(self) -> None:
        for name in ("num_iterations", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {self.eval_every}")


@dataclass(frozen=True)
class EvalConfig:
    num_tasks: int = 0
    """Held-out tasks to evaluate (0: all the distribution's test tasks)."""
    seed: int = 1234
    """Seed of the evaluation data (support sets, rollouts)."""
    repeats: int = 1
    """Times each held-out task is scored, each time adapting on fresh data and rollouts. Where a
    distribution has few held-out tasks (halfcheetah-dir has two), one evaluation's noise can be as
    large as the score; the repeats are rows of their own in ``eval.json``."""

    def __post_init__(self) -> None:
        if self.num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0 (0: all held-out tasks), got {self.num_tasks}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1 (times each held-out task is scored), got {self.repeats}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _make_run_dir(run_dir: Path) -> None:
    """Creates a run directory, or a one-line error when the path cannot hold one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out {run_dir}: a file is in the way of that directory; pick another --out") from None
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: cannot write there ({e.strerror}); pick a writable directory for --out") from None


def dump_toml(document: dict[str, dict[str, Any]]) -> str:
    """Writes a config document (sections of values; ``None`` means "the default" and is left
    out) as TOML, with ``tomli_w``."""
    import tomli_w

    return tomli_w.dumps({section: {k: v for k, v in table.items() if v is not None}
                          for section, table in document.items()})


def _plain(value: Any) -> Any:
    """A config value as TOML gives it back (tuples as lists), for comparison."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_FREE_KEYS = (
    {("run", k) for k in FREE_RUN_KEYS}
    | {("agent", k) for k in FREE_AGENT_KEYS + PLACEMENT_AGENT_KEYS}
)
_FREE_KEYS_TEXT = (
    f"run.{', run.'.join(FREE_RUN_KEYS)}, agent.{', agent.'.join(FREE_AGENT_KEYS + PLACEMENT_AGENT_KEYS)} and [eval]"
)


def evaluation_settings(document: dict[str, Any]) -> dict[str, Any]:
    """What a run's held-out evaluation depends on besides the model: the iterations it was
    trained for, ``[eval]`` and the evaluation keys of ``[agent]`` (a resolved document)."""
    agent = document.get("agent", {})
    # one repeat is what scores written before ``eval.repeats`` existed did, so it is left out
    scoring = {k: v for k, v in document.get("eval", {}).items() if not (k == "repeats" and v == 1)}
    return _plain({"num_iterations": document["run"]["num_iterations"], "eval": scoring,
                   "agent": {k: agent.get(k) for k in FREE_AGENT_KEYS if k in agent}})


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The ``section.key`` names whose values differ between the config a checkpoint was trained
    with and the current one, among those that change the model or the algorithm (the agent class,
    the seed, every [agent] and [tasks] key); the ones in :data:`FREE_RUN_KEYS`,
    :data:`FREE_AGENT_KEYS`, :data:`PLACEMENT_AGENT_KEYS` and :data:`FREE_SECTIONS` may change. An [agent] or [run] key the checkpoint did not record (a
    field added to the code since) trained at the field's default, so it is a change only where the
    current value differs from that default; [tasks] holds the keys as given, so one given now and
    not then (or then and not now) is a change."""
    changed = []
    for section, table in recorded.items():
        if section in FREE_SECTIONS or not isinstance(table, dict):
            continue
        now = current.get(section, {})
        for key in sorted(set(table) | set(now)):
            if (section, key) in _FREE_KEYS:
                continue
            if key not in table and section != "tasks" and key in now:  # a field the code gained since
                if _plain(now[key]) != _plain(_field_default(section, key, current)):
                    changed.append(f"{section}.{key}")
                continue
            if key not in now or key not in table or _plain(table[key]) != _plain(now[key]):
                changed.append(f"{section}.{key}")
    return changed


def _field_default(section: str, key: str, document: dict[str, Any]) -> Any:
    """The code's default for a [run] or [agent] key of a resolved ``document`` (``MISSING`` where
    the field has none, so that any value counts as a change)."""
    cls = RunConfig if section == "run" else resolve_agent(document["run"]["agent"]).Config
    for field in fields(cls):
        if field.name == key:
            return field.default_factory() if field.default_factory is not MISSING else field.default
    return MISSING


@dataclass(frozen=True)
class _Resolved:
    run: RunConfig
    eval: EvalConfig
    agent_cls: type
    agent: Any
    document: dict[str, Any]


def _resolve(document: dict[str, Any]) -> _Resolved:
    """Checks a config document and fills in every default, without building anything."""
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    run_cfg = build(RunConfig, dict(document.get("run", {})), "run")
    eval_cfg = build(EvalConfig, dict(document.get("eval", {})), "eval")
    tasks = dict(document.get("tasks", {}))
    if "name" not in tasks:
        raise ConfigError("[tasks] needs name = '...' (a task distribution; see `metarl list envs`)")
    agent_cls = resolve_agent(run_cfg.agent)
    agent_cfg = build(agent_cls.Config, dict(document.get("agent", {})), "agent")
    tasks = {"name": tasks.pop("name"), **tasks}
    resolved = {"run": asdict(run_cfg), "tasks": tasks, "agent": asdict(agent_cfg), "eval": asdict(eval_cfg)}
    return _Resolved(run_cfg, eval_cfg, agent_cls, agent_cfg, resolved)


def resolve_document(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (a config as loaded, overrides applied) with every default filled in, as a
    run directory's ``config.toml`` records it; the agent is not built.

    Raises:
        ConfigError: an unknown section, key or value.
    """
    return _resolve(document).document


def placed(recorded: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` (a run's config.toml as loaded) with ``requested``'s placement keys
    (:data:`PLACEMENT_AGENT_KEYS`), so that a run trained on a GPU resolves on a machine without
    one when it is asked to continue there (``device = "cpu"``)."""
    document = {section: dict(table) if isinstance(table, dict) else table for section, table in recorded.items()}
    asked = requested.get("agent", {})
    if isinstance(document.get("agent"), dict):
        document["agent"].update({k: asked[k] for k in PLACEMENT_AGENT_KEYS if k in asked})
    return document


def continued_document(recorded: dict[str, Any], requested: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config a run trained with ``recorded`` continues with when ``requested`` is asked for:
    ``recorded`` with ``requested``'s free keys (:data:`FREE_RUN_KEYS`, :data:`FREE_SECTIONS`).
    Both are resolved documents.

    Raises:
        ConfigError: ``requested`` changes the model or the algorithm (naming the keys).
    """
    changed = config_changes(recorded, requested)
    if changed:
        values = ", ".join(
            f"{key} {_value(recorded, key)} -> {_value(requested, key)}" for key in changed[:4]
        )
        raise ConfigError(
            f"{run_dir} was trained with other settings than those asked for ({values}); ask for the "
            f"settings it was started with, or pick another --out for a new run (only "
            f"{_FREE_KEYS_TEXT} may change when a run continues)"
        )
    document = {section: dict(table) for section, table in recorded.items()}
    for section, key in sorted(_FREE_KEYS):
        if key in requested.get(section, {}) and section in document:
            document[section][key] = requested[section][key]
    for section in FREE_SECTIONS:
        if section in requested:
            document[section] = dict(requested[section])
    return document


def _value(document: dict[str, Any], dotted: str) -> str:
    section, key = dotted.split(".", 1)
    table = document.get(section, {})
    return repr(table[key]) if key in table else "(unset)"


def scored_as(run_dir: Path, recorded: dict[str, Any]) -> dict[str, Any] | None:
    """What the run's ``eval.json`` scored (``None`` when there is no readable file): ``iteration``,
    its ``evaluation`` settings (:func:`evaluation_settings`), the ``baselines`` options it was
    asked for (``None``: none) and whether the file ``recorded`` these itself; a file written
    before evaluations recorded them falls back on ``recorded``, the run's config as resumed."""
    try:
        earlier = json.loads((run_dir / "eval.json").read_text())
        summary = earlier["summary"]
        iteration = int(summary.get("iteration", recorded["run"]["num_iterations"]))  # older files lack it
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    settings = earlier.get("settings")
    if isinstance(settings, dict) and "evaluation" in settings:
        return {"iteration": iteration, "evaluation": settings["evaluation"],
                "baselines": settings.get("baselines"), "recorded": True}
    return {"iteration": iteration, "evaluation": evaluation_settings(recorded),
            "baselines": {} if summary.get("baselines") else None, "recorded": False}


def _set_aside_evaluation(run_dir: Path, recorded: dict[str, Any], document: dict[str, Any]) -> None:
    """Renames ``eval.json`` to ``eval.iterK.json`` (K: the iteration it scored) when the run now
    trains further or is evaluated otherwise, so the earlier evaluation is kept, not overwritten."""
    done = run_dir / "eval.json"
    if not done.exists():
        return
    earlier = scored_as(run_dir, recorded)
    scored = earlier["iteration"] if earlier else int(recorded["run"]["num_iterations"])
    if earlier and scored == document["run"]["num_iterations"] and earlier["evaluation"] == evaluation_settings(document):
        return
    target, n = run_dir / f"eval.iter{scored}.json", 1
    while target.exists():
        target, n = run_dir / f"eval.iter{scored}.{n}.json", n + 1
    done.rename(target)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

def _make_agent(agent_cls: type, cfg: Any, distribution: Any, seed: int, agent_path: str, task_name: str) -> Agent:
    """The agent, or a one-line error when it cannot work on the distribution (e.g. an RL agent
    given a few-shot distribution: it looks for what the distribution does not have)."""
    try:
        return agent_cls(cfg, distribution, seed)
    except AttributeError as e:
        raise ConfigError(
            f"agent {agent_path} does not fit task distribution {task_name!r} ({e}); set [run] agent to an "
            f"agent for this kind of task (`metarl list agents`)"
        ) from None


class Experiment:
    """One training run of one agent on one task distribution.

    Build it with :meth:`create` (new run) or :meth:`resume` (existing run directory).
    """

    def __init__(self, document: dict[str, Any], run_dir: Path):
        self.run_dir = Path(run_dir)
        parts = _resolve(document)
        self.run_cfg, self.eval_cfg, self.agent_cfg = parts.run, parts.eval, parts.agent
        tasks = dict(parts.document["tasks"])
        self.task_name = tasks.pop("name")
        self.distribution = make_distribution(self.task_name, **tasks)
        self.agent = _make_agent(parts.agent_cls, self.agent_cfg, self.distribution, self.run_cfg.seed,
                                 self.run_cfg.agent, self.task_name)
        self.rng = np.random.default_rng([self.run_cfg.seed, 0])
        self.watch = InnerStepWatch()  # its streak goes with the checkpoint: a resume does not reset it
        self.iteration = 0
        self.checkpointed: int | None = None  # the iteration of the latest checkpoint, if any
        self.resumed_portable = False  # resumed from checkpoint.portable.pt: its data collected again
        self._release: weakref.finalize | None = None  # gives up the run directory (close, or garbage)
        self.document = parts.document

    @classmethod
    def create(cls, config_path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> Experiment:
        """A new run from a TOML config; ``out`` is the run directory (default ``runs/NAME-TIME``)."""
        document = apply_overrides(load_toml(config_path), overrides or [])
        if out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{Path(config_path).stem}-s{document.get('run', {}).get('seed', 0)}-{stamp}"
        run_dir = Path(out)
        if resume_point(run_dir) is not None or (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with `metarl run --resume {run_dir}` or pick another --out")
        experiment = cls(document, run_dir)
        try:
            _make_run_dir(run_dir)
            experiment._claim()
            if resume_point(run_dir) is not None or (run_dir / "metrics.jsonl").exists():  # made meanwhile
                raise ConfigError(f"{run_dir} already holds a run; continue it with `metarl run --resume {run_dir}`")
            (run_dir / "config.toml").write_text(dump_toml(experiment.document))
        except BaseException:
            experiment.close()
            raise
        return experiment

    @classmethod
    def resume(
        cls, run_dir: str | Path, load: str = "checkpoint.pt", update: dict[str, Any] | None = None
    ) -> Experiment:
        """Reopens a run directory at its latest checkpoint (or from scratch if it saved none).

        Without ``checkpoint.pt``, a ``checkpoint.portable.pt`` is loaded instead (see
        :func:`resume_point`); the agent then collects its data again and :meth:`run` says so.

        ``update`` (a resolved config document, see :func:`resolve_document`) gives new values of
        the keys that may change when a run continues (``run.num_iterations`` to train further,
        the log and checkpoint intervals, ``[eval]``); ``config.toml`` records them once the
        checkpoint has loaded. The calling process then owns the directory until :meth:`close`
        (or its exit).

        Raises:
            ConfigError: not a run directory; another process owns it; the checkpoint cannot be
                read; ``config.toml`` or ``update`` changes the model or algorithm since it was
                saved; ``run.num_iterations`` is below the checkpoint's iteration.
        """
        run_dir = Path(run_dir)
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.toml); start one with `metarl run CONFIG`")
        lock = lock_run_dir(run_dir)  # before building the agent: a second owner stops at once
        try:
            recorded = load_toml(run_dir / "config.toml")
            document = recorded
            if update is not None:
                document = continued_document(resolve_document(placed(recorded, update)), update, run_dir)
            experiment = cls(document, run_dir)
        except BaseException:
            unlock_run_dir(lock)
            raise
        experiment._hold(lock)
        try:
            source = resume_point(run_dir) if load == "checkpoint.pt" else run_dir / load
            if source is not None and source.exists():
                experiment.load_state(load_checkpoint(source), source)
                experiment.resumed_portable = source.name == PORTABLE_CHECKPOINT
            if experiment.iteration > experiment.run_cfg.num_iterations:
                raise ConfigError(
                    f"{run_dir} has trained {experiment.iteration} iterations, more than "
                    f"run.num_iterations={experiment.run_cfg.num_iterations}; ask for at least {experiment.iteration}"
                )
            before = resolve_document(placed(recorded, experiment.document))
            # also when config.toml was edited by hand or eval.json scored an earlier iteration
            _set_aside_evaluation(run_dir, before, experiment.document)
            moved = any(_plain(v) != _plain(experiment.document["agent"].get(k))
                        for k, v in recorded.get("agent", {}).items() if k in PLACEMENT_AGENT_KEYS)
            if moved or _plain(experiment.document) != _plain(before):
                _write_atomically(run_dir / "config.toml", dump_toml(experiment.document))
        except BaseException:
            experiment.close()
            raise
        return experiment

    def _hold(self, lock: Path) -> None:
        self._release = weakref.finalize(self, unlock_run_dir, lock)

    def _claim(self) -> None:
        """Makes this process the owner of the run directory (if it is not already)."""
        if self._release is None or not self._release.alive:
            self._hold(lock_run_dir(self.run_dir))

    def state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "agent": self.agent.state_dict(), "rng": self.rng.bit_generator.state,
                "config": self.document, "inner_step_streak": self.watch.streak}

    def load_state(self, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Continues from ``state`` (a checkpoint read from ``source``), once it is known to fit.

        Raises:
            CheckpointError: the checkpoint was trained with another model or algorithm than the
                current config (naming the keys), or its state does not fit the agent.
        """
        recorded = state.get("config")
        if recorded is not None:  # checkpoints written before configs were recorded load unchecked
            changed = config_changes(recorded, self.document)
            if changed:
                raise CheckpointError(
                    f"config.toml of {self.run_dir} differs from the config {source} was trained with in "
                    f"{', '.join(changed)}; put back the checkpoint's values or start a new run (only "
                    f"{_FREE_KEYS_TEXT} may change on resume)"
                )
        try:
            self.agent.load_state_dict(state["agent"])
            self.rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{source} does not fit the agent built from config.toml ({type(e).__name__}: {detail[:200]}); "
                "put back the config it was trained with, or start a new run"
            ) from None
        self.iteration = int(state["iteration"])
        # a resumed run that still does not adapt warns again, at once if the streak was already long
        self.watch.streak = int(state.get("inner_step_streak", 0))
        self.checkpointed = self.iteration

    def checkpoint(self) -> None:
        self._claim()
        state = self.state()
        save_checkpoint(self.run_dir / "checkpoint.pt", state)
        if isinstance(self.agent, PortableState):
            portable = {**state, "agent": self.agent.portable_state_dict()}
            save_checkpoint(self.run_dir / PORTABLE_CHECKPOINT, portable, keep_previous=False)
        self.checkpointed = self.iteration

    def _record_machine(self) -> None:
        """Appends to ``machines.jsonl`` which machine trains from this iteration on (a run resumed
        elsewhere, e.g. from a run directory kept in a repository, names each machine)."""
        from metarl.runtime import code_version, machine

        line = {"iteration": self.iteration, "machine": machine(), "code": code_version(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        if self.resumed_portable:
            line["resumed_from"] = f"{PORTABLE_CHECKPOINT} (collected data not kept: collected again)"
        with open(self.run_dir / "machines.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def run(self, progress: bool = True) -> None:
        """Trains until ``num_iterations``, logging, checkpointing and showing progress.

        A NaN or Inf loss raised by the agent stops the run; the last checkpoint stays as it was.
        A SIGINT or SIGTERM stops it after the current iteration, checkpointed there
        (:class:`metarl.stopping.TrainingStopped`); a second one stops it at once.
        """
        from tqdm import tqdm

        cfg = self.run_cfg
        self._claim()
        logger = MetricsLogger(self.run_dir, resume_from=self.iteration)
        if self.iteration < cfg.num_iterations:
            self._record_machine()
            if self.resumed_portable:
                print(f"warning: {self.run_dir} resumes at iteration {self.iteration} from {PORTABLE_CHECKPOINT}, "
                      "which holds no collected data (replay buffers): the agent collects it again, so the run "
                      "goes on from there but not exactly as it would have (recorded in machines.jsonl)",
                      file=sys.stderr)
        meta_batch = self.agent.meta_batch_size
        watch = self.watch
        bar = tqdm(total=cfg.num_iterations, initial=self.iteration, disable=not progress, unit="it",
                   desc=Path(self.run_dir).name, mininterval=1.0, dynamic_ncols=True)
        try:
            with stop_signals() as received:
                while self.iteration < cfg.num_iterations:
                    start = time.perf_counter()
                    metrics = self.agent.step(self.distribution.sample(meta_batch, self.rng))
                    self.iteration += 1
                    if (message := watch.update(self.iteration, metrics)) is not None:
                        bar.write(f"warning: {message}", file=sys.stderr)
                    metrics["time/iteration_s"] = time.perf_counter() - start
                    last = self.iteration == cfg.num_iterations
                    held_out = cfg.eval_every and self.iteration % cfg.eval_every == 0
                    if held_out:
                        metrics |= self.held_out_metrics()
                    if self.iteration % cfg.log_every == 0 or last or held_out:
                        logger.log(self.iteration, metrics)
                    if self.iteration % cfg.checkpoint_every == 0 or last or received:
                        logger.sync()  # on disk before the checkpoint, which must never outlive its lines
                        self.checkpoint()
                    bar.update(1)
                    if received and not last:
                        raise TrainingStopped(received[0], self.iteration, self.run_dir)
        finally:
            bar.close()
            logger.close()

    def held_out_tasks(self) -> list[Any]:
        """The held-out tasks evaluation scores (``eval.num_tasks`` of them; 0: all), the list
        ``eval.repeats`` times over."""
        tasks = self.distribution.test_tasks()
        tasks = tasks[: self.eval_cfg.num_tasks] if self.eval_cfg.num_tasks else tasks
        return tasks * self.eval_cfg.repeats

    def held_out_metrics(self) -> dict[str, float]:
        """Mean held-out score after each adaptation step at the current iteration.

        Seeded by ``(eval.seed, iteration)``, and touching none of the training generators, so a
        resumed run logs the same values as an uninterrupted one.
        """
        clock = time.perf_counter()
        rng = np.random.default_rng([self.eval_cfg.seed, self.iteration])
        result = self.agent.evaluate(self.held_out_tasks(), rng)
        metrics = {"time/eval_s": 0.0}
        for key, values in result.items():
            if key == "adaptation_steps" or values is None or isinstance(values, dict):
                continue
            table = np.asarray(values, dtype=float)
            if table.ndim != 2 or table.shape[1] != len(result["adaptation_steps"]):
                continue
            for j, step in enumerate(result["adaptation_steps"]):
                metrics[f"eval/{key}_step{step}"] = float(np.nanmean(table[:, j]))
        metrics["time/eval_s"] = time.perf_counter() - clock
        return metrics

    def close(self) -> None:
        """Releases what the agent holds (e.g. rollout worker processes) and the run directory."""
        try:
            self.agent.close()
        finally:
            if self._release is not None:
                self._release()  # once: a finalizer runs at most once

    def evaluate(self, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
        """Held-out evaluation with the agent's own protocol; written to ``eval.json`` with plots.

        ``baselines``: also train the stable-baselines3 baselines (see
        :func:`metarl.evaluation.evaluate_experiment`).
        """
        from metarl.evaluation import evaluate_experiment

        torch.manual_seed(self.eval_cfg.seed)
        return evaluate_experiment(self, baselines)
