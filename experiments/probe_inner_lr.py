"""How far one inner step moves a MAML policy, for several inner learning rates, on one batch.

    python -m experiments.probe_inner_lr experiments/maml_trpo_ml1_reach.toml \
        --lrs 1e-4,1e-2,0.1,0.3 --set agent.meta_batch_size=10

Samples one pre-update batch with the config's initial policy, takes the inner step at each
learning rate on that same batch and prints, per rate, the mean KL between the pre- and
post-update policies and the mean shift of the action mean (``metarl.meta_pg.adaptation_metrics``)
as one JSON object. Both grow with the rate squared and linearly for small rates; a KL below about
1e-6 means the inner step does nothing. The config's own normalisation of advantages is used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metarl import meta_pg
from metarl.config import apply_overrides, load_toml
from metarl.experiment import Experiment


def probe(config: str, lrs: list[float], overrides: list[str]) -> dict:
    """``{"lr": [...], "inner_kl": [...], "mean_shift": [...]}`` on one batch of ``config``'s tasks."""
    document = apply_overrides(load_toml(config), overrides)
    experiment = Experiment(document, Path("unused"))
    agent = experiment.agent
    try:
        tasks = experiment.distribution.sample(experiment.agent_cfg.meta_batch_size, experiment.rng)
        rows: dict[str, list[float]] = {"lr": [], "inner_kl": [], "mean_shift": []}
        params = {k: v.detach() for k, v in agent.params.items()}
        trajectories = agent.sampler.sample(
            agent.policy, params, tasks, experiment.agent_cfg.episodes_per_task
        )
        batch = agent._advantages(trajectories)  # one sampling; every rate adapts on the same data
        for lr in lrs:
            inner = agent.inner._replace(lr=lr, first_order=True)
            adapted = meta_pg.inner_step(inner, params, batch, shared=True)
            meta_batch = meta_pg.MetaBatch([batch], batch, [trajectories], 0.0, adapted)
            metrics = meta_pg.adaptation_metrics(agent.policy, params, meta_batch)
            rows["lr"].append(lr)
            rows["inner_kl"].append(metrics["adapt/inner_kl"])
            rows["mean_shift"].append(metrics.get("adapt/mean_shift", float("nan")))
        return {"config": config, "overrides": overrides, "tasks": len(tasks), **rows}
    finally:
        experiment.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2,0.1,0.3,1.0")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    print(json.dumps(probe(args.config, [float(x) for x in args.lrs.split(",")], args.overrides)))


if __name__ == "__main__":
    main()
