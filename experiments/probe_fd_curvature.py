"""Does the MAML paper's finite-difference KL curvature give another TRPO step than the exact one?
One MAML-TRPO run's checkpoint, one freshly sampled meta-batch.

    python -m experiments.probe_fd_curvature experiments/rl_runs/maml-trpo-cheetah-dir/base-s0

The paper's code (cbfinn/maml_rl, sandbox/rocky/tf/optimizers/conjugate_gradient_optimizer.py)
multiplies by the KL Hessian with central differences of the KL gradient,
``(g(θ + εv) - g(θ - εv)) / 2ε + damping v``, and its optimiser passes ``num_slices = 1`` as the
first positional argument of ``FiniteDifferenceHvp``, which is ``base_eps``: so
``ε = 1 / ||θ||``, a finite segment. Here ``g`` is the gradient of the mean KL between the old and
the new post-update policies with the inner step recomputed from ``θ ± εv`` (second order), on
every post-update episode; the exact product is the agent's own (Fisher on every episode).

Prints, for the surrogate gradient and for conjugate gradient's solution, the relative difference
of the two products, then the step each curvature gives (its norm, the predicted KL, the KL and
surrogate gain it reaches before any backtracking) and the cosine between the two steps. One JSON
object is the last line printed. Works on a copy of the run's config; the run directory is only
read.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.checkpoint_run import checkpoint_experiment
from metarl import meta_pg, trust_region
from metarl.config import load_toml


def finite_difference_hvp(agent: Any, batch: Any, old: Any, epsilon: float, damping: float) -> Any:
    """``v -> (g(θ + εv) - g(θ - εv)) / 2ε + damping v`` with ``g`` the mean KL's gradient."""
    names = list(agent.params)

    def kl_gradient(flat: torch.Tensor) -> torch.Tensor:
        theta = {k: t.detach().requires_grad_(True)
                 for k, t in trust_region.unflatten(flat, agent.params).items()}
        adapted = meta_pg.adapt_tasks(agent.inner, theta, batch.pre)
        kl = meta_pg.mean_kl(agent.policy, old, adapted, batch.post)
        return trust_region.flatten(torch.autograd.grad(kl, [theta[k] for k in names]))

    base = trust_region.flatten([agent.params[k] for k in names]).detach()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        difference = kl_gradient(base + epsilon * v) - kl_gradient(base - epsilon * v)
        return difference / (2.0 * epsilon) + damping * v

    return hvp


def step_outcome(
    agent: Any, batch: Any, old: Any, old_log_probs: Any, before: float, step: torch.Tensor
) -> dict[str, float]:
    """The KL and surrogate gain over ``before`` of the full step ``θ + step`` (no backtracking)."""
    steps = trust_region.unflatten(step, agent.params)
    candidate = {k: v + steps[k] for k, v in agent.params.items()}
    with torch.no_grad():
        adapted = meta_pg.adapt_tasks(agent.inner._replace(first_order=True), candidate, batch.pre)
        value = float(trust_region.surrogate(agent.policy, adapted, old_log_probs, batch.post))
        kl = float(meta_pg.mean_kl(agent.policy, old, adapted, batch.post))
    return {"kl": kl, "surrogate_gain": value - before}


def probe(run_dir: Path, seed: int) -> dict[str, Any]:
    document = load_toml(run_dir / "config.toml")
    with checkpoint_experiment(run_dir, document) as experiment:
        agent: Any = experiment.agent
        if not hasattr(agent, "trust_region_terms"):
            raise SystemExit(f"error: {run_dir} is not a MAML-TRPO run; this probe needs its TRPO step")
        agent.config = cfg = replace(agent.config, hvp_subsample=1.0)  # as the paper's code: every episode
        tasks = experiment.distribution.sample(cfg.meta_batch_size, np.random.default_rng(seed))
        batch = meta_pg.collect(agent.sampler, agent.inner, agent.params, tasks, cfg.episodes_per_task,
                                cfg.adapt_steps, agent._advantages)
        old, old_log_probs, surrogate, grad, exact = agent.trust_region_terms(batch)
        old = {k: v.detach() for k, v in old.items()}
        theta_norm = float(trust_region.flatten(list(agent.params.values())).norm())
        epsilon = 1.0 / theta_norm
        finite = finite_difference_hvp(agent, batch, old, epsilon, cfg.cg_damping)
        result: dict[str, Any] = {"run": str(run_dir), "iteration": experiment.iteration,
                                  "theta_norm": theta_norm, "epsilon": epsilon,
                                  "grad_norm": float(grad.norm())}
        directions = {}
        for name, hvp in (("exact", exact), ("finite_difference", finite)):
            direction = trust_region.conjugate_gradient(hvp, grad, cfg.cg_iters)
            curvature = float(direction.dot(hvp(direction)))
            step = direction * (2.0 * cfg.max_kl / max(curvature, 1e-12)) ** 0.5
            directions[name] = (direction, step)
            result[name] = {"direction_norm": float(direction.norm()), "step_norm": float(step.norm()),
                            "predicted_kl": cfg.max_kl,
                            **step_outcome(agent, batch, old, old_log_probs, float(surrogate), step)}
        for name, vector in (("gradient", grad), ("exact_direction", directions["exact"][0])):
            a, b = exact(vector), finite(vector)
            result[f"relative_difference_at_{name}"] = float((a - b).norm() / a.norm())
        s_exact, s_fd = directions["exact"][1], directions["finite_difference"][1]
        result["step_cosine"] = float(s_exact.dot(s_fd) / (s_exact.norm() * s_fd.norm()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="draws the meta-batch's tasks")
    args = parser.parse_args(argv)
    result = probe(args.run_dir, args.seed)
    print(f"{result['run']} at iteration {result['iteration']}: ||θ|| {result['theta_norm']:.2f}, "
          f"ε = 1/||θ|| = {result['epsilon']:.4f}, ||g|| {result['grad_norm']:.3f}")
    for name in ("gradient", "exact_direction"):
        print(f"  products at the {name.replace('_', ' ')}: relative difference "
              f"{result[f'relative_difference_at_{name}']:.3g}")
    for name in ("exact", "finite_difference"):
        r = result[name]
        print(f"  {name:17s}: direction norm {r['direction_norm']:.3g}, step norm {r['step_norm']:.3g}, "
              f"KL reached {r['kl']:.4f} (predicted {r['predicted_kl']}), surrogate gain {r['surrogate_gain']:.4g}")
    print(f"  cosine between the two steps: {result['step_cosine']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
