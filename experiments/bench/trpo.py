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

That first iteration also counts the optimisation's floating-point operations, and the run times
the policy's plain log-likelihood gradient on as many observations as one batch: the machine's
rate on this arithmetic at its best. The operations at that rate give each setting a floor, the
least optimisation time (and ratio to sampling) that fewer overheads alone could reach.

The agent is found at run time (``agents.maml_trpo``), as the experiment runner finds it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.bench.adapt import count_flops
from metarl.policies import make_policy
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
        for i in range(iterations):
            tasks = distribution.sample(config.meta_batch_size, rng)
            if i == 0:  # the warm-up iteration, left out of the timings, also counts the FLOPs
                m, flops = _counted_step(agent, tasks)
            else:
                m, flops = agent.step(tasks), {}
            row = {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")}
            rows.append(
                row | {"accepted": m["train/accepted"], "ls_steps": m["train/ls_steps"]} | flops
            )
    finally:
        agent.close()
    used = {
        "products_used": "closed-form" if agent.closed_form else "autograd",
        "hidden_sizes": list(config.hidden_sizes),
        "obs_dim": int(np.prod(distribution.observation_space.shape)),
        "act_dim": int(np.prod(distribution.action_space.shape)),
        "post_update_samples": config.meta_batch_size
        * config.episodes_per_task
        * (config.horizon or distribution.horizon),
    }
    return {k: getattr(config, k) for k in settings} | used, rows


def _counted_step(agent: Any, tasks: list) -> tuple[dict[str, float], dict[str, float]]:
    """One ``agent.step`` under ``torch.utils.flop_counter``: its floating-point operations in
    all (``flops``), in the meta-gradient and the terms conjugate gradient needs
    (``gradient_flops``), in the curvature products (``products_flops``, over ``products``
    calls), and in the line search; the rest are the inner steps."""
    counter = FlopCounterMode(display=False)
    parts = {"gradient_flops": 0.0, "products_flops": 0.0, "line_search_flops": 0.0, "products": 0}

    def counted(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            before = counter.get_total_flops()
            out = fn(*args, **kwargs)
            parts[name] += float(counter.get_total_flops() - before)
            return out

        return call

    terms_fn, line_search = agent.trust_region_terms, agent._line_search

    def terms(batch: Any) -> Any:
        out = counted("gradient_flops", terms_fn)(batch)
        products = counted("products_flops", out.hvp)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            parts["products"] += 1
            return products(v)

        return out._replace(hvp=hvp)

    agent.trust_region_terms, agent._line_search = terms, counted("line_search_flops", line_search)
    try:
        with counter:
            metrics = agent.step(tasks)
    finally:
        del agent.trust_region_terms, agent._line_search
    return metrics, {"flops": float(counter.get_total_flops())} | parts


def reference_rate(
    task: str, hidden_sizes: tuple[int, ...], samples: int, device: str = "cpu", repeats: int = 5
) -> dict[str, float]:
    """This machine's FLOP rate on the policy's own arithmetic at its best: the log-likelihood of
    ``samples`` observations through the policy as one plain batch and its gradient, nothing per
    task and nothing second-order (the median of ``repeats`` timed calls after one untimed)."""
    import envs

    distribution = envs.make(task)
    policy = make_policy(
        distribution.observation_space, distribution.action_space, hidden_sizes=hidden_sizes
    )
    params = {k: v.to(device).requires_grad_() for k, v in policy.init_params(0).items()}
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(samples, int(np.prod(distribution.observation_space.shape)), generator=gen)
    actions = torch.randn(samples, int(np.prod(distribution.action_space.shape)), generator=gen)
    obs, actions = obs.to(device), actions.to(device)
    weights = torch.randn(samples, generator=gen).to(device)

    def step() -> None:
        loss = -(policy.log_prob(params, obs, actions) * weights).mean()
        torch.autograd.grad(loss, list(params.values()))
        if obs.is_cuda:
            torch.cuda.synchronize()

    flops = count_flops(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {
        "samples": samples,
        "gflop": flops / 1e9,
        "s": seconds,
        "gflop_per_s": flops / seconds / 1e9,
    }


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
        "optimization_gflop": per_iteration[0]["flops"] / 1e9,
        "gflop_parts": _gflop_parts(per_iteration[0]),
        "per_iteration": per_iteration,
    }


def _gflop_parts(counted: dict[str, float]) -> dict[str, float]:
    """The counted iteration's GFLOP by part, the inner steps being the rest, and per product."""
    parts = {
        "gradient": counted["gradient_flops"] / 1e9,
        "products": counted["products_flops"] / 1e9,
        "line_search": counted["line_search_flops"] / 1e9,
    }
    parts["inner"] = counted["flops"] / 1e9 - sum(parts.values())
    parts["per_product"] = parts["products"] / max(counted["products"], 1)
    parts["num_products"] = counted["products"]
    return parts


def add_floors(settings: list[dict[str, Any]], reference: dict[str, float]) -> None:
    """Each setting's optimisation FLOPs at the reference rate: the least time, and the least
    ratio to sampling, that the arithmetic allows on this machine; and the rate it ran at."""
    for s in settings:
        floor = s["optimization_gflop"] / reference["gflop_per_s"]
        s["floor"] = {
            "s": floor,
            "over_sampling": floor / s["sampling_s"],
            "achieved_gflop_per_s": s["optimization_gflop"] / s["optimization_s"],
        }


def forward_gflop(setting: dict[str, Any]) -> float:
    """GFLOP of one forward pass of the policy's MLP over every post-update observation: two
    per multiply-add of each layer (the unit the table counts the optimisation in)."""
    config = setting["config"]
    sizes = [config["obs_dim"], *config["hidden_sizes"], config["act_dim"]]
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return 2 * macs * config["post_update_samples"] / 1e9


def floor_lines(
    settings: list[dict[str, Any]], reference: dict[str, float], target: float = 0.10
) -> list[str]:
    """Markdown: what the optimisation's arithmetic needs at this machine's best rate."""
    lines = [
        "",
        f"What the arithmetic allows. The optimisation's floating-point operations are counted "
        f"with `torch.utils.flop_counter` on the warm-up iteration (the same batch sizes as the "
        f"timed ones; its line search may try a different number of steps). The reference rate is "
        f"the policy's log-likelihood gradient on {reference['samples']:,} observations as one "
        f"plain batch ({reference['gflop']:.2f} GFLOP in {reference['s'] * 1e3:.0f} ms: "
        f"**{reference['gflop_per_s']:.1f} GFLOP/s**), timed in the same run. At that rate the "
        f"counted operations take at least the floor; a floor above {target:.2f} × sampling means "
        f"the target needs fewer operations, not faster code. By part (GFLOP of the counted "
        f"iteration): the inner steps, the meta-gradient with the terms conjugate gradient needs, "
        f"the curvature products (how many, and each), the line search; and the operations in "
        f"forward passes of the policy over every post-update observation.",
        "",
        "| fisher | hvp_subsample | products | GFLOP / iteration | GFLOP/s achieved | floor s | "
        "floor / sampling | inner | gradient | curvature products (each) | line search | "
        "forward passes per observation (each product) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        if "floor" not in s:
            continue
        f, g = s["floor"], s["gflop_parts"]
        forward = forward_gflop(s)
        lines.append(
            f"| {s.get('fisher', 'hessian')} | {s['hvp_subsample']} | {_products(s)} | "
            f"{s['optimization_gflop']:.1f} | {f['achieved_gflop_per_s']:.1f} | {f['s']:.2f} | "
            f"**{f['over_sampling']:.3f}** | {g['inner']:.1f} | {g['gradient']:.1f} | "
            f"{g['products']:.1f} ({g['num_products']} × {g['per_product']:.1f}) | "
            f"{g['line_search']:.1f} | {s['optimization_gflop'] / forward:.0f} "
            f"({g['per_product'] / forward:.1f}) |"
        )
    return lines


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
    if "reference" in results:
        lines += floor_lines(results["settings"], results["reference"])
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
        "| fisher | hvp_subsample | products | s / product | allowed s / product | factor short |",
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
    first = settings[0]["config"]
    reference = reference_rate(
        args.task, tuple(first["hidden_sizes"]), first["post_update_samples"], args.device
    )
    add_floors(settings, reference)
    results = {
        "task": args.task,
        "meta_batch_size": args.meta_batch_size,
        "episodes_per_task": args.episodes_per_task,
        "workers": args.workers,
        "device": args.device,
        "settings": settings,
        "reference": reference,
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
                "floors": {_label(s): round(s["floor"]["over_sampling"], 4) for s in settings},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
