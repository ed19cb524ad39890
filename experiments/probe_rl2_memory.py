"""Does an RL² policy use its memory? One run's checkpoint on held-out tasks, three ways.

    python -m experiments.probe_rl2_memory experiments/rl_runs/rl2-ml1-reach/base-s0 --tasks 50 --episodes 2
    python -m experiments.probe_rl2_memory SWEEP/base-s0 SWEEP/base-s1 --out experiments/results/NAME

RL² adapts in its hidden state: what it has seen of the task (on Meta-World, whose goal is hidden,
the rewards above all) must change what it does. Each held-out task runs one trial of
``--episodes`` episodes, with the same seeds (resets and action noise), three ways:

* ``trained``: as the agent acts;
* ``no memory``: the hidden state set back to the trial's initial state before every step, so the
  policy sees only the current observation and the last action, reward and done flag;
* ``no rewards``: the fed-back reward set to 0 at every step, so the memory keeps the trajectory
  but not what it paid.

It prints success and return per episode of the trial (means over tasks) and the paired difference
``trained − variant`` in each episode with its 95% bootstrap interval over tasks. A policy that
identifies its task from experience scores above both variants; one that learned a single
behaviour for all goals scores the same. One JSON object is the last line printed (``--out`` also
writes a table). Works on a copy of each run's config; the run directories are only read.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.checkpoint_run import checkpoint_experiment, probe_runs
from metarl.config import load_toml
from metarl.recurrent import RecurrentPolicy
from metarl.stats import bootstrap_difference_ci

VARIANTS = ("trained", "no memory", "no rewards")


def variant(policy: RecurrentPolicy, name: str) -> RecurrentPolicy:
    """``policy`` as it acts, or a copy acting without its memory or without the rewards."""
    if name == "trained":
        return policy
    probe = copy.deepcopy(policy)
    if name == "no memory":
        step = probe.step
        probe.step = lambda inputs, hidden: step(inputs, probe.initial_state(len(hidden)))  # type: ignore[method-assign]
    elif name == "no rewards":
        encode = probe.encode
        probe.encode = lambda obs, act, rew, done: encode(obs, act, torch.zeros_like(rew), done)  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown variant {name!r}; one of {VARIANTS}")
    return probe


def probe(run_dir: Path, num_tasks: int, episodes: int, seed: int) -> dict[str, Any]:
    document = load_toml(run_dir / "config.toml")
    if document["run"]["agent"] != "agents.rl2:RL2":
        raise SystemExit(f"error: {run_dir} trains {document['run']['agent']}; this probe reads RL² runs")
    with checkpoint_experiment(run_dir, document) as experiment:
        agent: Any = experiment.agent
        tasks = experiment.distribution.test_tasks()[:num_tasks]
        policy = agent._rollout_policy()
        size = agent.config.meta_batch_size  # one built environment per lane, as evaluate
        scores: dict[str, dict[str, np.ndarray]] = {}
        for name in VARIANTS:
            acting = variant(policy, name)
            trials = [agent.runner.run(acting, tasks[i : i + size], episodes, seed, call)
                      for call, i in enumerate(range(0, len(tasks), size))]
            scores[name] = {
                "return": torch.cat([t.episode_returns() for t in trials]).double().numpy(),
                "success": torch.cat([t.success for t in trials]).double().numpy(),
            }
    metrics = [m for m in ("success", "return") if not np.isnan(scores["trained"][m]).all()]
    result: dict[str, Any] = {"run": str(run_dir), "iteration": experiment.iteration, "tasks": len(tasks),
                              "episodes": episodes, "seed": seed}
    for m in metrics:
        result[m] = {name: scores[name][m].mean(0).tolist() for name in VARIANTS}
        result[f"{m}_difference"] = {
            name: [[float(scores["trained"][m][:, e].mean() - scores[name][m][:, e].mean()),
                    *bootstrap_difference_ci(scores["trained"][m][:, e], scores[name][m][:, e])]
                   for e in range(episodes)]
            for name in VARIANTS[1:]
        }
    return result


def _interval(difference: float, lo: float, hi: float) -> str:
    return f"{difference:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{result['run']} at iteration {result['iteration']}, {result['tasks']} held-out tasks, "
             f"episodes 0..{result['episodes'] - 1} of one trial"]
    for m in ("success", "return"):
        if m not in result:
            continue
        for name in VARIANTS:
            lines.append(f"  {m:7s} {name:10s} " + "  ".join(f"{v:8.3g}" for v in result[m][name]))
        for name in VARIANTS[1:]:
            cells = [_interval(*d) for d in result[f"{m}_difference"][name]]
            lines.append(f"  {m:7s} trained − {name}: " + "  ".join(cells))
    return lines


def _markdown(document: dict[str, Any]) -> str:
    lines = ["# Does the RL² policy use its memory?", "",
             f"Command: `{document['command']}`. Machine: {document['machine']}.", "",
             "Held-out tasks, one trial each with the same seeds three ways: as trained, with the "
             "hidden state reset before every step (no memory), and with the fed-back reward set to 0 "
             "(no rewards); see experiments/probe_rl2_memory.py. Means over tasks per episode of the "
             "trial; differences paired over tasks with 95% bootstrap intervals.", "",
             "| run | iteration | tasks | metric | episode | trained | no memory | no rewards | "
             "trained − no memory | trained − no rewards |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in document["runs"]:
        for m in ("success", "return"):
            if m not in r:
                continue
            for e in range(r["episodes"]):
                diffs = [r[f"{m}_difference"][n][e] for n in VARIANTS[1:]]
                lines.append(
                    f"| {r['run']} | {r['iteration']} | {r['tasks']} | {m} | {e} | "
                    + " | ".join(f"{r[m][n][e]:.3g}" for n in VARIANTS) + " | "
                    + " | ".join(_interval(*diff) for diff in diffs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="RL² run directories (e.g. SWEEP/base-s0)")
    parser.add_argument("--tasks", type=int, default=50, help="held-out tasks (the first N of the split)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per trial")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="also write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.tasks < 2 or args.episodes < 1:
        parser.error("--tasks must be at least 2 (for an interval) and --episodes at least 1")
    return probe_runs("python -m experiments.probe_rl2_memory", parser, args, argv,
                      lambda run_dir: probe(run_dir, args.tasks, args.episodes, args.seed), _lines, _markdown)


if __name__ == "__main__":
    raise SystemExit(main())
