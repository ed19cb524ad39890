"""``metarl sweep``: several seeds (and a grid of ``--set`` values) of one config, in parallel.

    metarl sweep experiments/maml_trpo_nav2d.toml --seeds 3
    metarl sweep experiments/maml_trpo_nav2d.toml --seeds 5 --grid agent.inner_lr=0.05,0.1 --backend ray

Every run trains and is evaluated on held-out tasks like ``metarl run``; the sweep then pools the
per-task scores of all seeds of a grid cell and reports, for each adaptation step, the
interquartile mean with a 95% bootstrap interval. It writes
``OUT/sweep.json``, ``OUT/sweep.md`` and one PNG curve per metric. Finished runs (with
``eval.json``) are reused and interrupted ones resumed, so a stopped sweep picks up where it was;
a sweep stopped by a signal still reports the runs that had finished. Asked for more
``run.num_iterations`` than they have, finished runs train further and are
evaluated again (the earlier ``eval.json`` kept as ``eval.iterK.json``). A run directory trained
with other model or algorithm settings than those asked for stops the sweep before it starts.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from metarl.config import ConfigError, apply_overrides, load_toml
from metarl.evaluation import bootstrap_ci, cvar, iqm
from metarl.stopping import StoppablePool

METRICS = ("return", "success", "loss", "accuracy", "coverage90", "nll")


def grid_cells(grid: list[str]) -> list[list[str]]:
    """``["agent.inner_lr=0.05,0.1", "agent.adapt_steps=1,2"]`` -> every combination as overrides."""
    axes = []
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like section.key=v1,v2,...")
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",") if v != ""])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def label_of(cell: list[str]) -> str:
    """A grid cell's directory label: ``["agent.plausibility=none"]`` -> ``plausibility-none``."""
    if not cell:
        return "base"
    return "_".join(o.split(".", 1)[-1].replace("=", "-") for o in cell)


def run_one(
    config: str, overrides: list[str], run_dir: str, baselines: dict[str, Any] | None, threads: int = 1
) -> dict[str, Any]:
    """Trains (or resumes) one run with ``threads`` torch CPU threads and evaluates it; returns its
    ``eval.json`` document."""
    import torch

    from metarl.experiment import Experiment

    torch.set_num_threads(threads)
    path = Path(run_dir)
    done = path / "eval.json"
    requested = continuation(config, overrides, path)
    if requested is None:
        experiment = Experiment.create(config, overrides, path)
    else:
        if done.exists() and _evaluated_as_asked(path, requested, baselines):
            return json.loads(done.read_text())
        # resumes under the run directory's lock; an evaluation taken at another iteration or
        # with other evaluation settings is kept beside as eval.iterK.json (Experiment.resume)
        experiment = Experiment.resume(path, update=requested)
    try:
        experiment.run(progress=False)
        experiment.evaluate(baselines)
    finally:
        experiment.close()
    return json.loads(done.read_text())


def continuation(config: str, overrides: list[str], run_dir: Path) -> dict[str, Any] | None:
    """The resolved config ``run_dir`` continues with, when it already holds a run (``None`` when
    not): what ``config`` with ``overrides`` asks for, once checked against the run's own config.

    Raises:
        ConfigError: the run was trained with other model or algorithm settings (naming them), or
            for more iterations than asked.
    """
    from metarl.experiment import continued_document, placed, resolve_document, resume_point
    from metarl.logger import load_checkpoint

    if not (run_dir / "config.toml").exists():
        return None
    requested = resolve_document(apply_overrides(load_toml(config), overrides))
    recorded = resolve_document(placed(load_toml(run_dir / "config.toml"), requested))
    continued_document(recorded, requested, run_dir)
    asked = requested["run"]["num_iterations"]
    checkpoint = resume_point(run_dir)
    if asked < recorded["run"]["num_iterations"] and checkpoint is not None:
        trained = int(load_checkpoint(checkpoint)["iteration"])
        if trained > asked:
            raise ConfigError(f"{run_dir} has trained {trained} iterations, more than run.num_iterations={asked}; "
                              f"ask for at least {trained}")
    return requested


def _evaluated_as_asked(run_dir: Path, requested: dict[str, Any], baselines: dict[str, Any] | None = None) -> bool:
    """Whether the run's ``eval.json`` scored the iteration asked for, with the evaluation settings
    asked for (as the file records them) and, where baselines are asked for, these baselines (a
    file from before evaluations recorded their options: any baselines)."""
    from metarl.experiment import evaluation_settings, placed, resolve_document, scored_as

    earlier = scored_as(run_dir, resolve_document(placed(load_toml(run_dir / "config.toml"), requested)))
    if earlier is None:
        return False
    if baselines is None:
        same_baselines = True
    elif earlier["recorded"]:
        same_baselines = earlier["baselines"] == json.loads(json.dumps(baselines))  # as JSON gives it back
    else:
        same_baselines = earlier["baselines"] is not None
    return (earlier["iteration"] == requested["run"]["num_iterations"]
            and earlier["evaluation"] == evaluation_settings(requested) and same_baselines)


def _pool_map(
    jobs: list[tuple],
    workers: int,
    backend: str,
    on_done: Callable[[int, dict], None],
    on_fail: Callable[[int, BaseException], None],
    threads: int = 1,
) -> tuple[list[dict | None], BaseException | None]:
    """Runs every job (each with ``threads`` CPU threads); a failed run is reported through
    ``on_fail`` and leaves ``None``, so the others still finish and count. Also returns what a
    stop signal left (``None`` if none came): the runs it stopped leave ``None`` too."""
    results: list[dict | None] = [None] * len(jobs)
    stopped: BaseException | None = None
    if backend == "ray":
        try:
            import ray
        except ImportError as e:
            raise ConfigError("--backend ray needs Ray: pip install -e '.[ray]'") from e
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=threads)(run_one)
        refs = {remote.remote(*job): i for i, job in enumerate(jobs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            try:
                results[i] = ray.get(ready[0])
            except Exception as exc:  # reported with the others at the end of the sweep
                on_fail(i, exc)
                continue
            on_done(i, results[i])  # type: ignore[arg-type]
    elif backend == "process":
        from concurrent.futures import as_completed

        with StoppablePool(workers) as pool:
            futures = {pool.submit(run_one, *job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = pool.result(future, Path(jobs[i][2]).name)
                except Exception as exc:  # reported with the others at the end of the sweep
                    on_fail(i, exc)
                    continue
                if results[i] is not None:  # None: stopped by Ctrl-C or kill
                    on_done(i, results[i])  # type: ignore[arg-type]
        stopped = pool.stop_report(sum(r is not None for r in results))
    else:
        raise ConfigError(f"--backend must be 'process' or 'ray', got {backend!r}")
    return results, stopped


def aggregate(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Pools per-task scores over seeds: IQM and 95% bootstrap CI per metric and adaptation step."""
    steps = documents[0]["summary"]["adaptation_steps"]
    out: dict[str, Any] = {"adaptation_steps": steps, "num_seeds": len(documents)}
    keys = [k for k in documents[0]["per_task"] if k in METRICS or k.split("_", 1)[0] in METRICS]
    for metric in keys:
        arrays = [d["per_task"].get(metric) for d in documents]
        if any(a is None or isinstance(a, dict) for a in arrays):
            continue
        pooled = np.concatenate([np.asarray(a, dtype=float) for a in arrays])
        if pooled.ndim != 2 or pooled.shape[1] != len(steps) or np.isnan(pooled).all():
            continue
        cols = [pooled[:, j][np.isfinite(pooled[:, j])] for j in range(pooled.shape[1])]
        cis = [bootstrap_ci(c) for c in cols]
        out[metric] = {
            "iqm": [iqm(c) for c in cols],
            "lo": [lo for lo, _ in cis],
            "hi": [hi for _, hi in cis],
            "mean": [float(c.mean()) for c in cols],
            "worst": [float(c.min()) if len(c) else float("nan") for c in cols],
            "cvar10": [cvar(c, 0.1) for c in cols],
            "num": [len(c) for c in cols],
        }
    agent_baselines = [d["per_task"].get("baselines") for d in documents]
    if all(isinstance(b, dict) for b in agent_baselines):
        out["agent_baselines"] = {}
        for name in agent_baselines[0]:
            for key in agent_baselines[0][name]:
                pooled = np.concatenate([np.asarray(b[name][key], dtype=float) for b in agent_baselines])
                pooled = pooled[np.isfinite(pooled)]
                if len(pooled):
                    lo, hi = bootstrap_ci(pooled)
                    out["agent_baselines"][f"{name}/{key}"] = {
                        "iqm": iqm(pooled), "lo": lo, "hi": hi, "mean": float(pooled.mean()),
                        "worst": float(pooled.min()), "cvar10": cvar(pooled, 0.1), "num": len(pooled),
                    }
    base = [d["summary"].get("baselines") for d in documents]
    if all(b is not None for b in base):
        out["baselines"] = {}
        for name in ("scratch", "multitask"):
            for key in ("return", "success", "return_pre", "success_pre"):
                values = [d["baselines_per_task"][name].get(key) for d in documents]
                if any(v is None for v in values):
                    continue
                pooled = np.concatenate([np.asarray(v, dtype=float) for v in values])
                pooled = pooled[np.isfinite(pooled)]
                if len(pooled):
                    lo, hi = bootstrap_ci(pooled)
                    out["baselines"][f"{name}/{key}"] = {"iqm": iqm(pooled), "lo": lo, "hi": hi,
                                                         "algo": base[0][name]["algo"]}
        out["baselines"]["budget_steps"] = base[0]["budget_steps"]
    return out


def write_report(
    cells: dict[str, dict[str, Any]],
    commands: dict[str, str],
    out: Path,
    title: str,
    sweep_command: str | None = None,
) -> None:
    """``sweep.json``, ``sweep.md`` and ``sweep_<metric>.png`` under ``out``.

    ``commands`` holds each cell's ``metarl run`` command; ``sweep_command`` the whole sweep's
    (baseline options included), which re-creates the directory.
    """
    document = {"title": title, "cells": cells, "commands": commands, "sweep_command": sweep_command}
    (out / "sweep.json").write_text(json.dumps(document, indent=1))
    lines = [f"# Sweep: {title}", "", "IQM over held-out tasks × seeds, 95% bootstrap interval in brackets.", ""]
    if sweep_command:
        lines += [f"Made by `{sweep_command}`.", ""]
    for label, agg in cells.items():
        lines += [f"## {label} ({agg['num_seeds']} seeds)", "", f"`{commands[label]}`", ""]
        steps = agg["adaptation_steps"]
        lines += ["| metric | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for metric in METRICS:
            if metric in agg:
                m = agg[metric]
                lines.append(f"| {metric} | " + " | ".join(
                    f"{v:.3g} [{lo:.3g}, {hi:.3g}]" for v, lo, hi in zip(m["iqm"], m["lo"], m["hi"], strict=True)) + " |")
        for key, b in agg.get("baselines", {}).items():
            if isinstance(b, dict):
                lines.append(f"| baseline {key} ({b['algo']}, {agg['baselines']['budget_steps']} steps) | "
                             f"{b['iqm']:.3g} [{b['lo']:.3g}, {b['hi']:.3g}] |" + " |" * (len(steps) - 1))
        lines.append("")
    (out / "sweep.md").write_text("\n".join(lines))
    _plot(cells, out, title)


def _plot(cells: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in METRICS:
        if not any(metric in agg for agg in cells.values()):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for label, agg in cells.items():
            if metric in agg:
                m = agg[metric]
                ax.plot(agg["adaptation_steps"], m["iqm"], marker="o", label=label)
                ax.fill_between(agg["adaptation_steps"], m["lo"], m["hi"], alpha=0.2)
        ax.set_xticks(next(iter(cells.values()))["adaptation_steps"])
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(f"{metric} (IQM, 95% CI)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"sweep_{metric}.png", dpi=120)
        plt.close(fig)


def _failed(failures: dict[str, str], num_jobs: int, aggregated_in: Path | None) -> ConfigError:
    """The error that ends a sweep with failed runs: which failed and why, and what to do."""
    listed = "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
    return ConfigError(
        f"{len(failures)} of {num_jobs} runs failed ({listed}). "
        + (
            f"The {num_jobs - len(failures)} finished ones are aggregated in {aggregated_in}/sweep.json. "
            if aggregated_in is not None
            else ""
        )
        + "Fix the cause and run the same command again: finished runs are reused and stopped "
        "ones resume from their checkpoints."
    )


def sweep(
    config: str,
    seeds: int,
    overrides: list[str],
    grid: list[str],
    out: str | None,
    backend: str = "process",
    workers: int = 0,
    baselines: dict[str, Any] | None = None,
    sweep_command: str | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Runs every (grid cell, seed) of ``config`` and writes the aggregate table; returns it.

    ``sweep_command`` (the command line that asked for the sweep) is recorded in ``sweep.json``.
    Each run uses ``threads`` torch CPU threads (1: one run per core; more when runs are fewer
    than cores).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if threads < 1 or workers < 0:
        raise ConfigError(
            f"--threads {threads} --workers {workers}: threads must be at least 1 and workers at least 0 (0: one per core)"
        )
    if not Path(config).is_file():
        raise ConfigError(f"config {config} not found")
    root = Path(out) if out else Path("runs") / f"sweep-{Path(config).stem}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out {root}: a file is in the way of that directory; pick another --out") from None
    except OSError as e:
        raise ConfigError(f"--out {root}: cannot write there ({e.strerror}); pick a writable directory for --out") from None
    cells = grid_cells(grid)
    jobs = [
        (config, [*overrides, *cell, f"run.seed={seed}"], str(root / f"{label_of(cell)}-s{seed}"), baselines, threads)
        for cell in cells
        for seed in range(seeds)
    ]
    index = [label_of(cell) for cell in cells for _ in range(seeds)]
    for job in jobs:  # a run directory trained with other settings stops the sweep before it starts
        continuation(job[0], job[1], Path(job[2]))
    workers = workers or min(len(jobs), os.cpu_count() or 1)

    def on_done(i: int, document: dict[str, Any]) -> None:
        summary = document["summary"]
        means = {k: [round(v, 3) for v in summary[k]] for k in summary if k.endswith("_mean")}
        print(f"[{i + 1}/{len(jobs)}] {Path(jobs[i][2]).name}: {means}", flush=True)

    failures: dict[str, str] = {}

    def on_fail(i: int, exc: BaseException) -> None:
        name = Path(jobs[i][2]).name
        failures[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        print(f"[{i + 1}/{len(jobs)}] {name} FAILED: {failures[name]}", flush=True)

    documents, stopped = _pool_map(jobs, workers, backend, on_done, on_fail, threads)
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for label, document in zip(index, documents, strict=True):
        if document is not None:
            by_cell.setdefault(label, []).append(document)
    aggregated = {label: aggregate(docs) for label, docs in by_cell.items()}
    if aggregated:
        commands = {
            label_of(cell): " ".join(["metarl run", config, *(f"--set {o}" for o in [*overrides, *cell]),
                                    f"--set run.seed={{0..{seeds - 1}}}"])
            for cell in cells
            if label_of(cell) in aggregated
        }
        write_report(aggregated, commands, root, Path(config).stem, sweep_command)
    if stopped is not None:  # the report above holds the seeds that had finished
        raise stopped
    if failures:
        raise _failed(failures, len(jobs), root if aggregated else None)
    return {"out": str(root), "cells": aggregated}
