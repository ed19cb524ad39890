"""The ``metarl`` command line.

    metarl run CONFIG [--set section.key=value ...] [--out RUN_DIR]
    metarl run --resume RUN_DIR [--set run.num_iterations=N ...]
    metarl eval RUN_DIR
    metarl list [agents|envs]
    metarl bench adapt|sampler|envs|env_paths|trpo|anil ...   (from a checkout: experiments/bench/)
    metarl demo

Configuration mistakes (and a run directory owned by another process, or a checkpoint that
cannot be read) exit with code 2 and a one-line message, never a traceback; a fault of the
machine during a run (a dead rollout worker, a disk that refuses writes) exits with code 1 and
says what was kept and how to continue.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from metarl.config import ConfigError
from metarl.runtime import tune_allocator

# `make demo` runs the first; `metarl demo sinusoid` the supervised one.
DEMOS = {
    "maml-trpo-nav2d": "experiments/maml_trpo_nav2d_demo.toml",
    "sinusoid": "experiments/sinusoid_demo.toml",
}


def _print_summary(summary: dict[str, Any]) -> None:
    out = {k: v for k, v in summary.items() if k in ("adaptation_steps", "iteration", "num_tasks", "repeats", "plots")
           or k.endswith("_mean")}
    if "baselines" in summary:
        b = summary["baselines"]
        out["baselines"] = {"budget_steps": b["budget_steps"], "pretrain_steps": b["pretrain_steps"]} | {
            name: {k: v for k, v in b[name].items() if k == "algo" or k.endswith("_mean")}
            for name in ("scratch", "multitask")
        }
    print(json.dumps(out))


def _kept(experiment: Any) -> str:
    """What a stopped run keeps, for its error message."""
    if experiment.checkpointed is None:
        return "no checkpoint was saved yet, so a resume starts from the beginning"
    return f"the checkpoint of iteration {experiment.checkpointed} is kept"


def _continued(run_dir: str, overrides: list[str] | None) -> dict[str, Any] | None:
    """The resolved config ``metarl run --resume RUN_DIR --set ...`` asks for (``None``: no --set)."""
    from metarl.config import apply_overrides, load_toml
    from metarl.experiment import resolve_document

    config = Path(run_dir) / "config.toml"
    if not overrides or not config.is_file():
        return None  # Experiment.resume says what is wrong with the directory
    return resolve_document(apply_overrides(load_toml(config), overrides))


def cmd_run(args: argparse.Namespace) -> int:
    from metarl.errors import NonFiniteLossError
    from metarl.experiment import Experiment
    from metarl.rollout.sampler import WorkerError
    from metarl.stopping import TrainingStopped

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run directory, not a config: its config.toml is reused "
                              "(--set may change run.num_iterations, the log intervals and [eval])")
        if args.out:
            raise ConfigError(f"--resume continues {args.resume} in place and takes no --out; to train a copy, "
                              "copy the run directory first and resume the copy")
        experiment = Experiment.resume(args.resume, update=_continued(args.resume, args.set))
        logged = Path(args.resume) / "metrics.jsonl"
        if experiment.checkpointed is None and logged.exists() and logged.stat().st_size:
            print(f"note: {args.resume} stopped before its first checkpoint; it trains again from iteration 0 "
                  "and its logged lines are recomputed", file=sys.stderr)
    elif args.config:
        experiment = Experiment.create(args.config, args.set, args.out)
    else:
        raise ConfigError("metarl run needs a CONFIG file or --resume RUN_DIR")
    print(f"run directory: {experiment.run_dir}", flush=True)
    try:
        experiment.run(progress=not args.no_progress)
        if experiment.run_cfg.eval_at_end:
            _print_summary(experiment.evaluate())
    except TrainingStopped as e:
        print(f"{e}", file=sys.stderr)
        return e.exit_code
    except FloatingPointError as e:
        kind = "non-finite loss" if isinstance(e, NonFiniteLossError) else "floating-point error"
        if experiment.checkpointed is None:
            kept = (f"no checkpoint was saved before it; lower the learning rates and start again "
                    f"(a new --out, or `metarl run --resume {experiment.run_dir}` after editing its config.toml)")
        else:
            kept = (f"the last good checkpoint (iteration {experiment.checkpointed}) in {experiment.run_dir} "
                    f"is intact; lower the learning rates and start again, or resume with "
                    f"`metarl run --resume {experiment.run_dir}`")
        print(f"error: {kind} at iteration {experiment.iteration + 1}: {e}; {kept}", file=sys.stderr)
        return 1
    except (WorkerError, OSError) as e:  # faults of the machine: say what is kept and how to go on
        what = "a rollout worker failed" if isinstance(e, WorkerError) else "cannot write the run directory"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {what} at iteration {experiment.iteration + 1} ({detail}); {_kept(experiment)}; "
              f"continue with `metarl run --resume {experiment.run_dir}`", file=sys.stderr)
        return 1
    finally:
        experiment.close()
    print(f"results: {experiment.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from metarl.experiment import Experiment

    experiment = Experiment.resume(args.run_dir, update=_continued(args.run_dir, _evaluation_only(args.set)))
    if experiment.iteration == 0:
        print(f"warning: {args.run_dir} has no checkpoint; evaluating the initial parameters", file=sys.stderr)
    try:
        summary = experiment.evaluate(_baseline_options(args))
    finally:
        experiment.close()
    print(f"wrote {Path(args.run_dir) / 'eval.json'}")
    _print_summary(summary)
    return 0


def _evaluation_only(overrides: list[str]) -> list[str]:
    """``metarl eval --set`` values, refused (one line) unless they only change how the run is
    evaluated or where it runs: ``[eval]`` and the agent's evaluation and placement keys."""
    from metarl.experiment import FREE_AGENT_KEYS, PLACEMENT_AGENT_KEYS

    free = {f"agent.{k}" for k in FREE_AGENT_KEYS + PLACEMENT_AGENT_KEYS}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith("eval.") or key in free):
            raise ConfigError(
                f"metarl eval --set {key}: eval changes only how a run is scored ([eval], "
                f"{', '.join(sorted(free))}); to train further or otherwise use metarl run --resume"
            )
    return overrides


def _baseline_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.baselines:
        return None
    return {"pretrain_steps": args.pretrain_steps, "episodes": args.baseline_episodes, "algo": args.algo}


def cmd_sweep(args: argparse.Namespace) -> int:
    from metarl.stopping import PoolStopped
    from metarl.sweep import sweep

    try:
        result = sweep(args.config, args.seeds, args.set, args.grid, args.out, args.backend, args.workers,
                       _baseline_options(args), sweep_command=args.command_line, threads=args.threads)
    except PoolStopped as e:
        print(f"{e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {result['out']}/sweep.md, sweep.json and plots")
    print(json.dumps({"out": result["out"], "cells": {
        label: {m: agg[m]["iqm"] for m in ("return", "success", "loss", "accuracy") if m in agg}
        for label, agg in result["cells"].items()}}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from metarl.config import field_docs
    from metarl.registry import FEWSHOT, discover_agents

    if args.what in ("agents", "all"):
        print("agents (use as [run] agent = '...'):")
        for path, cls in sorted(discover_agents().items()):
            docs = field_docs(cls.Config)
            print(f"  {path}\n    config keys: {', '.join(docs) or '-'}")
    if args.what in ("envs", "all"):
        import envs

        print("task distributions ([tasks] name = '...'):")
        for name in sorted(FEWSHOT):
            print(f"  {name} (few-shot)")
        for name in envs.names():
            print(f"  {name}")
            if args.what == "envs" or args.verbose:
                for key, value in envs.make(name).describe().items():
                    if key != "name":
                        print(f"      {key}: {value}")
    return 0


BENCHMARKS = ("adapt", "sampler", "envs", "env_paths", "trpo", "anil", "rl2_update")


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs ``experiments/bench/WHAT.py`` of the checkout in the working directory.

    The benchmarks are study scripts kept beside their results, not part of the installed
    library, so the library never imports them: this finds them at run time, the way the runner
    finds an agent by the import path its config names.
    """
    import importlib

    if args.what not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {args.what!r}; choose one of {', '.join(BENCHMARKS)}")
    root = Path.cwd()
    if not (root / "experiments" / "bench" / f"{args.what}.py").is_file():
        raise ConfigError(f"metarl bench runs experiments/bench/{args.what}.py of a metarl checkout; "
                          f"run it from the repository root ({root} has no such file)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"experiments.bench.{args.what}")
    return int(module.main(args.rest) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.name not in DEMOS:
        raise ConfigError(f"unknown demo {args.name!r}; choose one of {sorted(DEMOS)}")
    config = Path(DEMOS[args.name])
    if not config.is_file():
        raise ConfigError(f"demo config {config} not found; run `make demo` from the project root")
    out = Path("runs") / f"demo-{args.name}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    run_args = argparse.Namespace(config=str(config), set=args.set, out=str(out), resume=None, no_progress=False)
    code = cmd_run(run_args)
    if code == 0:
        summary = json.loads((out / "eval.json").read_text())["summary"]
        times = f", each scored {summary['repeats']} times" if summary.get("repeats", 1) > 1 else ""
        print(f"adaptation on {summary['num_tasks']} held-out tasks{times} (mean after each inner step):")
        for key in sorted(k for k in summary if k.endswith("_mean")):
            values = ", ".join(f"{v:.3f}" for v in summary[key])
            print(f"  {key[: -len('_mean')]}: {values}  (steps {summary['adaptation_steps']})")
        print(f"demo done: run directory {out}: metrics {out / 'metrics.jsonl'}, checkpoint "
              f"{out / 'checkpoint.pt'}, evaluation {out / 'eval.json'}, plots "
              f"{', '.join(sorted(str(p) for p in out.glob('*.png')))}")
    return code


def _add_baseline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baselines", action="store_true",
                        help="also train stable-baselines3 baselines (from scratch, multi-task fine-tuned) per "
                             "held-out task on the meta-learner's environment-step budget (RL agents)")
    parser.add_argument("--pretrain-steps", type=int, default=100_000,
                        help="multi-task baseline: environment steps on the training tasks")
    parser.add_argument("--baseline-episodes", type=int, default=5, help="scoring episodes per task (baselines)")
    parser.add_argument("--algo", default="auto", choices=["auto", "ppo", "sac"],
                        help="from-scratch baseline algorithm (auto: SAC on MuJoCo, PPO otherwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl", description="Meta-RL and few-shot learning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train an experiment from a TOML config, or resume one")
    run.add_argument("config", nargs="?", help="experiments/NAME.toml")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    run.add_argument("--out", help="run directory (default runs/NAME-sSEED-TIME)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(func=cmd_run)
    ev = sub.add_parser("eval", help="evaluate a run's agent on held-out tasks")
    ev.add_argument("run_dir")
    ev.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="score otherwise: [eval] (e.g. eval.num_tasks=0 for every held-out task) or the "
                         "agent's evaluation keys; recorded in config.toml, the earlier eval.json kept aside")
    _add_baseline_options(ev)
    ev.set_defaults(func=cmd_eval)
    sw = sub.add_parser("sweep", help="several seeds (and a --grid of values) of one config in parallel, aggregated")
    sw.add_argument("config")
    sw.add_argument("--seeds", type=int, default=3)
    sw.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    sw.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                    help="values to sweep; several --grid give their product")
    sw.add_argument("--backend", default="process", choices=["process", "ray"],
                    help="run locally in processes, or as Ray tasks (RAY_ADDRESS for a cluster)")
    sw.add_argument("--workers", type=int, default=0, help="parallel runs (process backend; default: cores)")
    sw.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per run (default 1: one run per core); e.g. --workers 1 --threads 2 "
                    "gives a single run both cores of a 2-core machine")
    sw.add_argument("--out", help="sweep directory (default runs/sweep-NAME)")
    _add_baseline_options(sw)
    sw.set_defaults(func=cmd_sweep)
    ls = sub.add_parser("list", help="list agents and task distributions")
    ls.add_argument("what", nargs="?", default="all", choices=["all", "agents", "envs"])
    ls.add_argument("-v", "--verbose", action="store_true", help="describe each distribution (as `metarl list envs` does)")
    ls.set_defaults(func=cmd_list)
    bench = sub.add_parser("bench", help="benchmarks; the last line printed is one JSON object")
    bench.add_argument("what", choices=BENCHMARKS)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (--help)")
    bench.set_defaults(func=cmd_bench)
    demo = sub.add_parser("demo", help="a small default experiment, end to end")
    demo.add_argument("name", nargs="?", default="maml-trpo-nav2d", help=f"which demo: {', '.join(DEMOS)}")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = "metarl " + shlex.join(sys.argv[1:] if argv is None else argv)
    tune_allocator()
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every checkpoint already saved is intact (resume with `metarl run --resume RUN_DIR`)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
