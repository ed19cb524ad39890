"""``metarl bench trpo``: time spent optimising against time spent sampling, per MAML-TRPO iteration.

    metarl bench trpo --iterations 4 --fisher gauss-newton hessian --hvp-subsample 1.0 0.1 \
        --out experiments/results/trpo_timing

Runs paper-sized MAML-TRPO iterations (halfcheetah-vel, 40 tasks × 20 episodes × 200 steps, the
process backend with one worker per core) and reports, per setting of ``fisher`` (the KL
curvature products: Gauss-Newton or double-backward Hessian) and ``hvp_subsample``, the mean
seconds per iteration spent in the sampler and outside it, split into the inner steps (baseline
fits and adapted parameters between the sampler calls), the meta-gradient through the inner
step, conjugate gradient and the line search, and how often the line search accepted the step.
The reference is the sampling time of the same iterations, so the figure that matters is the
ratio. The first iteration builds workers and environments and is left out of the means. Every
setting runs from the same seed, so its first iteration sees the same rollouts.

The agent is found at run time (``agents.maml_trpo``), as the experiment runner finds it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from metarl.runtime import machine

PARTS = ("inner_s", "gradient_s", "cg_s", "line_search_s")


def _run(task: str, iterations: int, **overrides: Any) -> tuple[dict[str, Any], list[dict]]:
    """``iterations`` MAML-TRPO iterations on ``task``: the config's fields and per-iteration
    ``time/*`` (prefix dropped) plus ``accepted`` and ``ls_steps`` of the line search."""
    import envs

    trpo = importlib.import_module("agents.maml_trpo")
    settings = {"backend": "process", "num_workers": 2, "cg_iters": 10} | overrides
    config = trpo.MAMLTRPOConfig(**settings)
    distribution = envs.make(task)
    agent = trpo.MAMLTRPO(config, distribution, seed=0)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for _ in range(iterations):
            m = agent.step(distribution.sample(config.meta_batch_size, rng))
            row = {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")}
            rows.append(row | {"accepted": m["train/accepted"], "ls_steps": m["train/ls_steps"]})
    finally:
        agent.close()
    used = {"products_used": "closed-form" if agent.closed_form else "autograd"}
    return {k: getattr(config, k) for k in settings} | used, rows


def bench_setting(
    task: str,
    iterations: int,
    hvp_subsample: float,
    workers: int,
    fisher: str = "gauss-newton",
    products: str = "auto",
    **overrides: Any,
) -> dict[str, Any]:
    """Mean timings of ``iterations - 1`` MAML-TRPO iterations after a warm-up one."""
    if iterations < 2:
        raise ValueError(f"iterations must be >= 2 (the first is a warm-up), got {iterations}")
    config, per_iteration = _run(
        task,
        iterations,
        hvp_subsample=hvp_subsample,
        num_workers=workers,
        fisher=fisher,
        products=products,
        **overrides,
    )
    rows = per_iteration[1:]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {
        "fisher": fisher,
        "hvp_subsample": hvp_subsample,
        "products": products,
        "config": config,
        "iterations_timed": len(rows),
        "accepted_fraction": float(np.mean([r["accepted"] for r in per_iteration])),
        "mean_ls_steps": float(np.mean([r["ls_steps"] for r in per_iteration])),
        "sampling_s": mean["sampling_s"],
        "optimization_s": mean["optimization_s"],
        "optimization_over_sampling": mean["optimization_s"] / mean["sampling_s"],
        "env_steps_per_s": mean["env_steps_per_s"],
        "parts_s": {k.removesuffix("_s"): mean[k] for k in PARTS},
        "per_iteration": per_iteration,
    }


def timing_table(settings: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of one row per setting (also used by ``experiments.tables.maml_rl``); settings
    measured before the ``fisher`` switch existed used the double-backward Hessian, and those
    before the ``products`` switch autograd's products."""
    lines = [
        "| fisher | hvp_subsample | products | sampling s/it | optimisation s/it | ratio | "
        "inner | gradient | CG | line search | accepted | env steps/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        p = s["parts_s"]
        accepted = s.get("accepted_fraction")
        shown = "n/a" if accepted is None else f"{accepted:.2f}"
        lines.append(
            f"| {s.get('fisher', 'hessian')} | {s['hvp_subsample']} | {_products(s)} | "
            f"{s['sampling_s']:.2f} | "
            f"{s['optimization_s']:.2f} | **{s['optimization_over_sampling']:.3f}** | "
            f"{p['inner']:.2f} | {p['gradient']:.2f} | {p['cg']:.2f} | {p['line_search']:.2f} | "
            f"{shown} | {s['env_steps_per_s']:,.0f} |"
        )
    return lines


def write_tables(results: dict[str, Any], out: Path, command: str) -> None:
    """``out.json`` and ``out.md`` with the same figures."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results | {"command": command}, indent=2) + "\n")
    lines = [
        "# MAML-TRPO: optimisation time against sampling time per iteration",
        "",
        f"{results['task']}, {results['meta_batch_size']} tasks × {results['episodes_per_task']} "
        f"episodes × 200 steps per batch (pre- and post-update), process backend with "
        f"{results['workers']} workers, meta-update on {results.get('device', 'cpu')}; mean over {results['settings'][0]['iterations_timed']} "
        "iterations after a warm-up one. Optimisation is everything outside the sampler: the "
        "inner steps (baseline fits, adapted parameters), the meta-gradient through the inner "
        "step, conjugate gradient (10 curvature products of the KL through the inner step: "
        "Gauss-Newton, or double-backward Hessian) and the line search. Accepted: the fraction "
        "of all iterations (warm-up included) whose step the line search accepted. Target: "
        "optimisation ≤ 0.10 × sampling.",
        "",
        f"Machine: {results['machine']}. Command: `{command}`.",
        "",
    ]
    lines += timing_table(results["settings"])
    lines += allowance_lines(results["settings"])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def allowance_lines(settings: list[dict[str, Any]], target: float = 0.10) -> list[str]:
    """What the target leaves each curvature product, against what one took (per setting).

    Conjugate gradient makes at most ``cg_iters`` products plus one for the step length; the
    target's budget is ``target × sampling`` minus the other parts of the optimisation.
    """
    lines = [
        "",
        f"Per curvature product: what one took (CG seconds over at most cg_iters + 1 products) "
        f"against what the {target:.2f} target leaves it ({target:.2f} × sampling, less the inner "
        "steps, the gradient and the line search, over the same number of products).",
        "",
        "| fisher | hvp_subsample | products | s / product | allowed s / product | "
        "factor short |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings:
        p, count = s["parts_s"], s["config"].get("cg_iters", 10) + 1
        took = p["cg"] / count
        budget = target * s["sampling_s"] - (p["inner"] + p["gradient"] + p["line_search"])
        allowed = budget / count
        rest = (target * s["sampling_s"] - budget) / (target * s["sampling_s"])
        short = (
            f"none left: the other parts alone take {rest:.1f}× the target"
            if allowed <= 0
            else f"{took / allowed:.1f}×"
        )
        lines.append(
            f"| {s.get('fisher', 'hessian')} | {s['hvp_subsample']} | {_products(s)} | "
            f"{took:.3f} | "
            f"{max(allowed, 0.0):.3f} | {short} |"
        )
    return lines


def _products(setting: dict[str, Any]) -> str:
    """How the setting's products were computed (``auto`` resolved; settings measured before the
    switch used autograd's)."""
    return str(setting["config"].get("products_used", setting.get("products", "autograd")))


def _label(setting: dict[str, Any]) -> str:
    """The setting's key in the printed summary: fisher, subsample and the products asked for."""
    return f"{setting['fisher']}/{setting['hvp_subsample']}/{setting.get('products', 'autograd')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="metarl bench trpo", description="MAML-TRPO: optimisation vs sampling time"
    )
    parser.add_argument("--task", default="halfcheetah-vel")
    parser.add_argument(
        "--iterations", type=int, default=4, help="per setting, the first a warm-up"
    )
    parser.add_argument("--hvp-subsample", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument(
        "--fisher",
        nargs="+",
        default=["gauss-newton", "hessian"],
        choices=["gauss-newton", "hessian"],
        help="KL curvature products to time, each with every --hvp-subsample",
    )
    parser.add_argument(
        "--products",
        nargs="+",
        default=["auto"],
        choices=["auto", "closed-form", "autograd"],
        help="how the curvature products are computed (agent.products), each with every fisher "
        "and subsample",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--meta-batch-size", type=int, default=40)
    parser.add_argument("--episodes-per-task", type=int, default=20)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the meta-update runs (cpu or cuda); rollouts stay on CPU",
    )
    parser.add_argument(
        "--out", help="also write OUT.json and OUT.md (e.g. experiments/results/trpo_timing)"
    )
    args = parser.parse_args(argv)
    settings = []
    grid = [(f, h, j) for f in args.fisher for h in args.hvp_subsample for j in args.products]
    for fisher, fraction, products in grid:
        r = bench_setting(
            args.task,
            args.iterations,
            fraction,
            args.workers,
            fisher,
            products,
            meta_batch_size=args.meta_batch_size,
            episodes_per_task=args.episodes_per_task,
            envs_per_worker=args.episodes_per_task,
            device=args.device,
        )
        settings.append(r)
        print(
            f"fisher={fisher} hvp_subsample={fraction} products={products}: "
            f"sampling {r['sampling_s']:.2f} s, "
            f"optimisation {r['optimization_s']:.2f} s, ratio "
            f"{r['optimization_over_sampling']:.3f} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in r['parts_s'].items())}), "
            f"accepted {r['accepted_fraction']:.2f}",
            flush=True,
        )
    results = {
        "task": args.task,
        "meta_batch_size": args.meta_batch_size,
        "episodes_per_task": args.episodes_per_task,
        "workers": args.workers,
        "device": args.device,
        "settings": settings,
        "machine": machine(),
    }
    if args.out:
        command = "metarl bench trpo " + " ".join(argv or [])
        write_tables(results, Path(args.out), command.strip())
    print(
        json.dumps(
            {k: v for k, v in results.items() if k != "settings"}
            | {
                "ratios": {_label(s): round(s["optimization_over_sampling"], 4) for s in settings},
                "accepted": {_label(s): s["accepted_fraction"] for s in settings},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
