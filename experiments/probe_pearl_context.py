"""What does a PEARL policy's second episode of context do? One run's checkpoint on held-out tasks.

    python -m experiments.probe_pearl_context experiments/rl_runs/pearl-ml1-reach/base-s0 --tasks 50 --repeats 3
    python -m experiments.probe_pearl_context SWEEP/base-s0 SWEEP/base-s1 --out experiments/results/NAME

PEARL's evaluation (``agents.pearl.PEARL.evaluate``) acts in episode 0 with z from the prior and in
episode k with z drawn from the posterior on all transitions of episodes 0..k−1. Training infers z
from ``context_batch_size`` transitions of one prior episode (the encoder buffer), so an evaluation
posterior on 500 or 1,000 transitions, partly from posterior episodes, is something the encoder
never saw. Each held-out task runs ``--repeats`` times; episode 0 once, then episodes 1 and 2 with z
from other contexts, every variant of an episode with the same seeds (resets, action noise and
z's standard-normal draw), so their differences are paired:

* episode 1: ``episode 0`` (as evaluated), ``100 rows of episode 0`` (``context_batch_size``
  transitions drawn as training draws them), ``episode 0, posterior mean`` (z without its draw);
* episode 2: ``episodes 0-1`` (as evaluated; z on episode 1 of the evaluated kind),
  ``episode 0`` (a second draw from episode 1's posterior: what episode 2 scores if episode 1's
  transitions add nothing), ``episode 1`` (episode 1's transitions alone).

It prints success and return per variant (means over tasks of each task's mean over repeats), the
posterior's standard deviation (mean over runs and latent dimensions), and each variant minus the
evaluated one of its episode with a 95% bootstrap interval paired over tasks. One JSON object is
the last line printed (``--out`` also writes a table). The run directories are only read; a run
that keeps only ``checkpoint.portable.pt`` (a committed PEARL run) is read from that.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.latent_sac import transitions
from experiments.checkpoint_run import checkpoint_experiment, probe_runs
from metarl.config import load_toml
from metarl.stats import bootstrap_difference_ci

EVALUATED = {1: "episode 0", 2: "episodes 0-1"}


def probe(run_dir: Path, num_tasks: int, repeats: int, seed: int) -> dict[str, Any]:
    document = load_toml(run_dir / "config.toml")
    if document["run"]["agent"] != "agents.pearl:PEARL":
        raise SystemExit(f"error: {run_dir} trains {document['run']['agent']}; this probe reads PEARL runs")
    with checkpoint_experiment(run_dir, document) as experiment:
        agent: Any = experiment.agent
        cfg = agent.config
        tasks = experiment.distribution.test_tasks()[:num_tasks]
        runs = [t for t in tasks for _ in range(repeats)]
        actor = copy.copy(agent.policy)
        actor.deterministic = cfg.eval_deterministic
        rng = np.random.default_rng(seed)
        results: list[dict[str, Any]] = []
        scores: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        with agent.evaluation_sampler(seed) as sampler, torch.no_grad():

            def episode(index: int, name: str, context: tuple[torch.Tensor, torch.Tensor] | None,
                        mean_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
                """Scores one variant; returns its transitions and their mask."""
                if context is None:
                    params: Any = agent._prior()
                    stds = torch.ones(1)
                else:
                    mean, variance = agent.posterior(context[0][..., :-1], context[1])
                    if mean_only:
                        variance = torch.zeros_like(variance)
                    params = [agent._actor_params(m, v) for m, v in zip(mean, variance, strict=True)]
                    stds = variance.sqrt()
                sampler.num_calls = index  # every variant of an episode runs with the same seeds
                traj = sampler.sample(actor, params, runs, 1)
                per_task = {"return": traj.episode_returns()[:, 0].double().numpy().reshape(len(tasks), repeats),
                            "success": traj.success[:, 0].double().numpy().reshape(len(tasks), repeats)}
                scores[index, name] = {k: v.mean(1) for k, v in per_task.items()}
                rows = 0 if context is None else int(context[1].sum(1).mean())
                results.append({"episode": index, "z_from": name, "context_rows": rows,
                                "z_std": float(stds.mean()),
                                **{k: float(v.mean()) for k, v in scores[index, name].items()}})
                return transitions(agent.policy, traj)

            first = episode(0, "prior", None)
            drawn = []  # per run: context_batch_size of episode 0's transitions, with replacement
            for rows, valid in zip(*first, strict=True):
                index = torch.nonzero(valid > 0)[:, 0]
                drawn.append(rows[index[rng.integers(0, len(index), cfg.context_batch_size)]])
            subset = (torch.stack(drawn), torch.ones(len(runs), cfg.context_batch_size))
            evaluated_first = episode(1, "episode 0", first)
            episode(1, f"{cfg.context_batch_size} rows of episode 0", subset)
            episode(1, "episode 0, posterior mean", first, mean_only=True)
            both = (torch.cat([first[0], evaluated_first[0]], 1), torch.cat([first[1], evaluated_first[1]], 1))
            episode(2, "episodes 0-1", both)
            episode(2, "episode 0", first)
            episode(2, "episode 1", evaluated_first)
    metrics = [m for m in ("success", "return") if not np.isnan(scores[0, "prior"][m]).all()]
    for r in results:
        reference = EVALUATED.get(r["episode"])
        if reference is None or r["z_from"] == reference:
            continue
        for m in metrics:
            a, b = scores[r["episode"], r["z_from"]][m], scores[r["episode"], reference][m]
            r[f"{m}_difference"] = [float(a.mean() - b.mean()), *bootstrap_difference_ci(a, b)]
    for r in results:
        if "success" not in metrics:
            r.pop("success")
    return {"run": str(run_dir), "iteration": experiment.iteration, "tasks": len(tasks),
            "repeats": repeats, "seed": seed, "context_batch_size": cfg.context_batch_size,
            "episodes": results}


def _interval(difference: float, lo: float, hi: float) -> str:
    return f"{difference:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _cells(r: dict[str, Any]) -> list[str]:
    cells = [str(r["episode"]), r["z_from"], str(r["context_rows"]), f"{r['z_std']:.3g}"]
    for m in ("success", "return"):
        if m in r:
            cells.append(f"{r[m]:.3g}")
    for m in ("success", "return"):
        if m in r:
            cells.append(_interval(*r[f"{m}_difference"]) if f"{m}_difference" in r else "")
    return cells


def _header(result: dict[str, Any]) -> list[str]:
    metrics = [m for m in ("success", "return") if m in result["episodes"][0]]
    return (["episode", "z from", "context rows", "z std"] + metrics
            + [f"{m} − as evaluated" for m in metrics])


def _lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{result['run']} at iteration {result['iteration']}, {result['tasks']} held-out tasks "
             f"× {result['repeats']} runs", "  " + " | ".join(_header(result))]
    lines += ["  " + " | ".join(_cells(r)) for r in result["episodes"]]
    return lines


def _markdown(document: dict[str, Any]) -> str:
    runs = document["runs"]
    header = ["run", "iteration", *_header(runs[0])]
    lines = ["# What does a PEARL policy's context do?", "",
             f"Command: `{document['command']}`. Machine: {document['machine']}.", "",
             "Held-out tasks, each run several times: episode 0 with z from the prior, episodes 1 and 2 "
             "with z from the posterior on other contexts, every variant of an episode with the same "
             "seeds (see experiments/probe_pearl_context.py). Means over tasks; differences to the "
             "variant the agent's evaluation uses, paired over tasks, with 95% bootstrap intervals.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in runs:
        for r in result["episodes"]:
            lines.append(f"| {result['run']} | {result['iteration']} | " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="PEARL run directories (e.g. SWEEP/base-s0)")
    parser.add_argument("--tasks", type=int, default=50, help="held-out tasks (the first N of the split)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each task")
    parser.add_argument("--seed", type=int, default=1234, help="the sampler's seed")
    parser.add_argument("--out", help="also write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.tasks < 2 or args.repeats < 1:
        parser.error("--tasks must be at least 2 (for an interval) and --repeats at least 1")
    return probe_runs("python -m experiments.probe_pearl_context", parser, args, argv,
                      lambda run_dir: probe(run_dir, args.tasks, args.repeats, args.seed), _lines, _markdown)


if __name__ == "__main__":
    raise SystemExit(main())
