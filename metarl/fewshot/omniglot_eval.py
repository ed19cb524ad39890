"""Scores trained Omniglot metric learners on 20-way one-shot runs, alone and as an ensemble.

The runs are the 20 official ones (``--runs official``), or runs built the same way from one
split's characters (:func:`~metarl.fewshot.omniglot.within_alphabet_runs`): ``--runs val`` uses the
validation alphabet, on which settings such as the number of shifted views may be chosen without
looking at the test alphabets; ``--runs test`` gives more runs over the test alphabets than the
official 20. An ensemble averages the members' class log-probabilities.

    python -m metarl.fewshot.omniglot_eval runs/omniglot_table/protonet_aug-5w1s-s{0,1,2} \\
        --runs val --shift 0 2 --ensemble
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.bench.adapt import machine
from metarl.fewshot.omniglot import (
    OfficialRun,
    load_official_runs,
    score_official_runs,
    split_characters,
    within_alphabet_runs,
)


def ensemble_scores(
    learners: Sequence[Any], train_x: torch.Tensor, test_x: torch.Tensor, shift: int
) -> torch.Tensor:
    """Mean over ``learners`` of their class log-probabilities ``[T, 20]`` for one run."""
    labels = torch.arange(len(train_x))
    return torch.stack(
        [
            torch.log_softmax(learner.class_scores(train_x, labels, test_x, shift=shift), -1)
            for learner in learners
        ]
    ).mean(0)


def runs_error(learners: Sequence[Any], runs: Sequence[OfficialRun], shift: int) -> dict[str, Any]:
    """Error (%) of one learner, or an ensemble of several, on ``runs``, with a 95% CI over runs."""
    missing = [type(x).__name__ for x in learners if not hasattr(x, "class_scores")]
    if missing:
        raise ValueError(
            f"{missing} have no class_scores(); only metric learners (ProtoNets, Matching Nets) "
            "can be scored here. Gradient learners: see omniglot_tasks.official_runs_error."
        )
    result = score_official_runs(
        lambda train_x, test_x: ensemble_scores(learners, train_x, test_x, shift).argmax(-1), runs
    )
    errors = np.asarray(result["error_per_run"])
    ci95 = 1.96 * errors.std(ddof=1) / np.sqrt(len(errors)) if len(errors) > 1 else float("nan")
    return {**result, "ci95": float(ci95), "shift": shift, "views": (2 * shift + 1) ** 2}


def load_learner(run_dir: str | Path) -> tuple[Any, Any]:
    """The trained agent of a run directory (its latest checkpoint) and its task distribution."""
    from metarl.experiment import Experiment

    experiment = Experiment.resume(run_dir)
    if experiment.iteration == 0:
        raise ValueError(f"{run_dir} holds no checkpoint; train it first (metarl run --resume {run_dir})")
    return experiment.agent, experiment.distribution


def make_runs(kind: str, distribution: Any, num_runs: int, seed: int) -> list[OfficialRun]:
    """``official`` (the 20 challenge runs) or within-alphabet runs of split ``val`` / ``test``."""
    if kind == "official":
        return load_official_runs()
    if kind not in ("val", "test"):
        raise ValueError(f"--runs {kind!r}; expected official, val or test")
    dataset = distribution.dataset
    characters = split_characters(dataset, distribution.split_seed)[kind]
    return within_alphabet_runs(dataset, characters, num_runs=num_runs, seed=seed)


def write_results(out: Path, title: str, command: str, results: list[dict[str, Any]]) -> None:
    """``out.json`` (every figure, per-run errors included) and ``out.md`` (one row per result)."""
    document = {"command": command, "machine": machine(), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    lines = [
        f"# {title}",
        "",
        f"Written by `{command}` on {document['machine']}. Error: % of test images assigned to the "
        "wrong training image, mean ± 95% CI over runs. An ensemble averages its members' class "
        "log-probabilities; views: each image's embedding is the mean over its copies shifted by "
        "every offset up to the given number of pixels.",
        "",
        "| models | runs | views | error % |",
        "|---|---|---|---|",
    ]
    for r in results:
        models = ", ".join(f"`{m}`" for m in r["models"])
        kind = "official (20)" if r["runs"] == "official" else f"{r['runs']} alphabets ({r['num_runs']})"
        lines.append(
            f"| {models} | {kind} | {r['views']} | {r['mean_error']:.2f} ± {r['ci95']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="trained metric-learner run directories")
    parser.add_argument("--runs", default="val", choices=("official", "val", "test"))
    parser.add_argument("--num-runs", type=int, default=200, help="within-alphabet runs (val/test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the within-alphabet runs")
    parser.add_argument(
        "--shift", type=int, nargs="+", default=[0], help="shifted views up to this many px (each)"
    )
    parser.add_argument(
        "--ensemble", action="store_true", help="also score all run_dirs as one ensemble"
    )
    parser.add_argument(
        "--out", help="write the results to OUT.json and a table to OUT.md (path without suffix)"
    )
    parser.add_argument("--title", default="Omniglot 20-way one-shot runs", help="OUT.md's title")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = [load_learner(d) for d in args.run_dirs]
    runs = make_runs(args.runs, loaded[0][1], args.num_runs, args.seed)
    results = []
    groups = [([d], [learner]) for d, (learner, _) in zip(args.run_dirs, loaded, strict=True)]
    if args.ensemble and len(loaded) > 1:
        groups.append((list(args.run_dirs), [learner for learner, _ in loaded]))
    for dirs, learners in groups:
        for shift in args.shift:
            result = runs_error(learners, runs, shift)
            row = {"models": dirs, "runs": args.runs, **result}
            results.append(row)
            print(
                json.dumps(
                    {k: row[k] for k in ("models", "runs", "views", "mean_error", "ci95", "num_runs")}
                ),
                flush=True,
            )
    if args.out:
        command = "python -m metarl.fewshot.omniglot_eval " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        write_results(Path(args.out), args.title, command, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
