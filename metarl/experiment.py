"""The experiment runner: config, seeding, the training loop, checkpoint/resume and logs.

A run directory holds::

    config.toml       the resolved config (after --set overrides)
    metrics.jsonl     one line per logged iteration (seed-determined values only)
    timing.jsonl      wall-time figures (iterations/s, env steps/s)
    tb/               TensorBoard events
    checkpoint.pt     the latest checkpoint, written atomically
    eval.json, *.png  held-out evaluation and plots (``metarl eval``)

Seeding happens here and only here: the agent gets ``seed`` and owns its own generators; the runner
owns the task-sampling generator. Both are checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.config import ConfigError, apply_overrides, build, load_toml
from metarl.logger import MetricsLogger, load_checkpoint, save_checkpoint
from metarl.registry import make_distribution, resolve_agent
from metarl.stopping import TrainingStopped, stop_signals

SECTIONS = ("run", "tasks", "agent", "eval")


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

    def __post_init__(self) -> None:
        for name in ("num_iterations", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EvalConfig:
    num_tasks: int = 0
    """Held-out tasks to evaluate (0: all the distribution's test tasks)."""
    seed: int = 1234
    """Seed of the evaluation data (support sets, rollouts)."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. a wrapped agent's own settings
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(document: dict[str, dict[str, Any]]) -> str:
    """Writes a two-level document (sections of scalars and lists) as TOML."""
    parts = []
    for section, table in document.items():
        parts.append(f"[{section}]")
        parts.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
        parts.append("")
    return "\n".join(parts)


class Experiment:
    """One training run of one agent on one task distribution.

    Build it with :meth:`create` (new run) or :meth:`resume` (existing run directory).
    """

    def __init__(self, document: dict[str, Any], run_dir: Path):
        unknown = sorted(set(document) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
        self.run_dir = Path(run_dir)
        self.run_cfg = build(RunConfig, dict(document.get("run", {})), "run")
        self.eval_cfg = build(EvalConfig, dict(document.get("eval", {})), "eval")
        tasks = dict(document.get("tasks", {}))
        if "name" not in tasks:
            raise ConfigError("[tasks] needs name = '...' (a task distribution; see `metarl list envs`)")
        self.task_name = tasks.pop("name")
        self.distribution = make_distribution(self.task_name, **tasks)
        agent_cls = resolve_agent(self.run_cfg.agent)
        self.agent_cfg = build(agent_cls.Config, dict(document.get("agent", {})), "agent")
        self.agent = agent_cls(self.agent_cfg, self.distribution, self.run_cfg.seed)
        self.rng = np.random.default_rng([self.run_cfg.seed, 0])
        self.iteration = 0
        self.document = {
            "run": asdict(self.run_cfg),
            "tasks": {"name": self.task_name, **tasks},
            "agent": asdict(self.agent_cfg),
            "eval": asdict(self.eval_cfg),
        }

    @classmethod
    def create(cls, config_path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> Experiment:
        """A new run from a TOML config; ``out`` is the run directory (default ``runs/NAME-TIME``)."""
        document = apply_overrides(load_toml(config_path), overrides or [])
        if out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{Path(config_path).stem}-s{document.get('run', {}).get('seed', 0)}-{stamp}"
        run_dir = Path(out)
        if (run_dir / "checkpoint.pt").exists() or (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with `metarl run --resume {run_dir}` or pick another --out")
        experiment = cls(document, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(experiment.document))
        return experiment

    @classmethod
    def resume(cls, run_dir: str | Path, load: str = "checkpoint.pt") -> Experiment:
        """Reopens a run directory at its latest checkpoint (or from scratch if it saved none)."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.toml); start one with `metarl run CONFIG`")
        experiment = cls(load_toml(run_dir / "config.toml"), run_dir)
        if (run_dir / load).exists():
            experiment.load_state(load_checkpoint(run_dir / load))
        return experiment

    def state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "agent": self.agent.state_dict(), "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.agent.load_state_dict(state["agent"])
        self.rng.bit_generator.state = state["rng"]

    def checkpoint(self) -> None:
        save_checkpoint(self.run_dir / "checkpoint.pt", self.state())

    def run(self, progress: bool = True) -> None:
        """Trains until ``num_iterations``, logging, checkpointing and showing progress.

        A NaN or Inf loss raised by the agent stops the run; the last checkpoint stays as it was.
        A SIGINT or SIGTERM stops it after the current iteration, checkpointed there
        (:class:`metarl.stopping.TrainingStopped`); a second one stops it at once.
        """
        from tqdm import tqdm

        cfg = self.run_cfg
        logger = MetricsLogger(self.run_dir, resume_from=self.iteration if self.iteration else None)
        meta_batch = int(getattr(self.agent_cfg, "meta_batch_size", 1))
        bar = tqdm(total=cfg.num_iterations, initial=self.iteration, disable=not progress, unit="it",
                   desc=Path(self.run_dir).name, mininterval=1.0, dynamic_ncols=True)
        try:
            with stop_signals() as received:
                while self.iteration < cfg.num_iterations:
                    start = time.perf_counter()
                    metrics = self.agent.step(self.distribution.sample(meta_batch, self.rng))
                    self.iteration += 1
                    metrics["time/iteration_s"] = time.perf_counter() - start
                    last = self.iteration == cfg.num_iterations
                    if self.iteration % cfg.log_every == 0 or last:
                        logger.log(self.iteration, metrics)
                    if self.iteration % cfg.checkpoint_every == 0 or last or received:
                        self.checkpoint()
                    bar.update(1)
                    if received and not last:
                        raise TrainingStopped(received[0], self.iteration, self.run_dir)
        finally:
            bar.close()
            logger.close()

    def close(self) -> None:
        """Releases what the agent holds (e.g. rollout worker processes)."""
        close = getattr(self.agent, "close", None)
        if close is not None:
            close()

    def evaluate(self, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
        """Held-out evaluation with the agent's own protocol; written to ``eval.json`` with plots.

        ``baselines``: also train the stable-baselines3 baselines (see
        :func:`metarl.evaluation.evaluate_experiment`).
        """
        from metarl.evaluation import evaluate_experiment

        torch.manual_seed(self.eval_cfg.seed)
        return evaluate_experiment(self, baselines)
