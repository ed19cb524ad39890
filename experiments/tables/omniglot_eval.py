"""Scores trained Omniglot metric learners on 20-way one-shot runs, alone and as an ensemble.

The runs are the 20 official ones (``--runs official``), or runs built the same way from one
split's characters (:func:`~metarl.fewshot.omniglot_runs.within_alphabet_runs`): ``--runs val`` uses the
validation alphabet, on which settings such as the number of shifted views may be chosen without
looking at the test alphabets; ``--runs test`` gives more runs over the test alphabets than the
official 20. An ensemble averages the members' class log-probabilities. Each image may be seen
through several views (its embedding is their mean): shifts by up to ``--shift`` pixels, each of
them turned and scaled by every ``--angles`` × ``--scales`` pair; ``--affine-sets`` compares
several sets of turns and scalings in one call.

    python -m experiments.tables.omniglot_eval runs/omniglot_table/protonet_aug-5w1s-s{0,1,2} \\
        --runs val --shift 0 2 --affine-sets 'a=0 s=1' 'a=-10,0,10 s=1' --ensemble
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.evaluation import mean_ci95
from metarl.fewshot.omniglot import split_characters
from metarl.fewshot.omniglot_runs import (
    OfficialRun,
    load_official_runs,
    score_official_runs,
    within_alphabet_runs,
)
from metarl.fewshot.protonet import IDENTITY_VIEW
from metarl.runtime import machine

Affine = Sequence[tuple[float, float]]


def affine_views(angles: Sequence[float], scales: Sequence[float]) -> list[tuple[float, float]]:
    """Every ``(angle, scale)`` pair of the given turns (degrees) and scalings."""
    return [(float(a), float(s)) for a in angles for s in scales]


def parse_affine_set(spec: str) -> list[tuple[float, float]] | None:
    """The views of ``'a=A1,A2,.. s=S1,S2,..'`` (angles in degrees, scales), or None if malformed."""
    match = re.fullmatch(r"\s*a=(\S+)\s+s=(\S+)\s*", spec)
    if match is None:
        return None
    try:
        angles, scales = ([float(x) for x in g.split(",")] for g in match.groups())
    except ValueError:
        return None
    return affine_views(angles, scales)


def run_log_probs(
    learner: Any, runs: Sequence[OfficialRun], shift: int, affine: Affine = IDENTITY_VIEW
) -> list[torch.Tensor]:
    """A learner's class log-probabilities ``[T, 20]`` for each run's test images, each image
    embedded as the mean over its views (``affine`` turns/scalings × shifts up to ``shift`` px)."""
    if not hasattr(learner, "class_scores"):
        raise ValueError(
            f"{type(learner).__name__} has no class_scores(); only metric learners (ProtoNets, "
            "Matching Nets) can be scored here. Gradient learners: see "
            "omniglot_tasks.official_runs_error."
        )
    return [
        torch.log_softmax(
            learner.class_scores(
                run.train_x, torch.arange(len(run.train_x)), run.test_x, shift, affine
            ),
            -1,
        )
        for run in runs
    ]


def members_error(
    members: Sequence[list[torch.Tensor]],
    runs: Sequence[OfficialRun],
    shift: int,
    affine: Affine = IDENTITY_VIEW,
) -> dict[str, Any]:
    """Error (%) on ``runs`` of the ensemble whose members' :func:`run_log_probs` are ``members``
    (one member: that learner alone): the mean log-probability picks each test image's class."""
    predicted = {  # by run, found again from the test images the scorer passes
        id(run.test_x): torch.stack([m[i] for m in members]).mean(0).argmax(-1)
        for i, run in enumerate(runs)
    }
    result = score_official_runs(lambda train_x, test_x: predicted[id(test_x)], runs)
    _, ci95 = mean_ci95(np.asarray(result["error_per_run"]))
    return {
        **result,
        "ci95": ci95,
        "shift": shift,
        "affine": [list(v) for v in affine],
        "views": (2 * shift + 1) ** 2 * len(affine),
    }


def runs_error(
    learners: Sequence[Any], runs: Sequence[OfficialRun], shift: int, affine: Affine = IDENTITY_VIEW
) -> dict[str, Any]:
    """Error (%) of one learner, or an ensemble of several, on ``runs``, with a 95% CI over runs."""
    return members_error(
        [run_log_probs(x, runs, shift, affine) for x in learners], runs, shift, affine
    )


def load_learner(run_dir: str | Path) -> tuple[Any, Any]:
    """The trained agent of a run directory (its latest checkpoint) and its task distribution."""
    from metarl.experiment import Experiment

    experiment = Experiment.resume(run_dir)
    if experiment.iteration == 0:
        raise ValueError(
            f"{run_dir} holds no checkpoint; train it first (metarl run --resume {run_dir})"
        )
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
        "log-probabilities; views: each image's embedding is the mean over its copies turned and "
        "scaled by every pair of the given angles and scales, each shifted by every offset up to "
        "the given number of pixels.",
        "",
        "| models | runs | views | shift px | angles ° | scales | error % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        models = ", ".join(f"`{m}`" for m in r["models"])
        kind = (
            "official (20)"
            if r["runs"] == "official"
            else f"{r['runs']} alphabets ({r['num_runs']})"
        )
        affine = r.get("affine", [[0.0, 1.0]])
        angles = ", ".join(f"{a:g}" for a in sorted({a for a, _ in affine}))
        scales = ", ".join(f"{s:g}" for s in sorted({s for _, s in affine}))
        lines.append(
            f"| {models} | {kind} | {r['views']} | {r.get('shift', 0)} | {angles} | {scales} "
            f"| {r['mean_error']:.2f} ± {r['ci95']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="trained metric-learner run directories")
    parser.add_argument("--runs", default="val", choices=("official", "val", "test"))
    parser.add_argument("--num-runs", type=int, default=200, help="within-alphabet runs (val/test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the within-alphabet runs")
    parser.add_argument(
        "--shift", type=int, nargs="+", default=[0], help="shifted views up to this many px (each)"
    )
    parser.add_argument(
        "--angles",
        type=float,
        nargs="+",
        default=[0.0],
        help="views turned by each of these angles (degrees, counter-clockwise)",
    )
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], help="views scaled by each factor"
    )
    parser.add_argument(
        "--affine-sets",
        nargs="+",
        metavar="'a=ANGLES s=SCALES'",
        help="several view sets to compare, each 'a=A1,A2,.. s=S1,S2,..' (e.g. 'a=0 s=1' "
        "'a=-10,0,10 s=0.9,1,1.1'); overrides --angles/--scales",
    )
    parser.add_argument(
        "--ensemble",
        nargs="*",
        metavar="I,J,...",
        help="also score ensembles: each given as comma-separated 0-based positions in run_dirs; "
        "with no value, all run_dirs",
    )
    parser.add_argument(
        "--out", help="write the results to OUT.json and a table to OUT.md (path without suffix)"
    )
    parser.add_argument("--title", default="Omniglot 20-way one-shot runs", help="OUT.md's title")
    return parser


def _view_sets(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[list[tuple[float, float]]]:
    """The (angle, scale) view sets to score, from --affine-sets or --angles/--scales."""
    if args.affine_sets:
        parsed = [parse_affine_set(spec) for spec in args.affine_sets]
        view_sets = [v for v in parsed if v is not None]
        if len(view_sets) < len(parsed):
            parser.error(f"--affine-sets {args.affine_sets}: write each as 'a=-10,0,10 s=0.9,1'")
    else:
        view_sets = [affine_views(args.angles, args.scales)]
    if any(s <= 0 for views in view_sets for _, s in views):
        parser.error("scales must be > 0")
    return view_sets


def _groups(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[list[int]]:
    """Positions in run_dirs to score together: every model alone, then each --ensemble."""
    ensembles: list[list[int]] = []
    if args.ensemble is not None:
        try:
            ensembles = [[int(i) for i in spec.split(",")] for spec in args.ensemble] or [
                list(range(len(args.run_dirs)))
            ]
        except ValueError:
            parser.error(f"--ensemble {args.ensemble}: give positions such as 0,1,2")
        bad = [i for group in ensembles for i in group if not 0 <= i < len(args.run_dirs)]
        if bad:
            parser.error(f"--ensemble positions {bad} are outside 0..{len(args.run_dirs) - 1}")
    return [[i] for i in range(len(args.run_dirs))] + [g for g in ensembles if len(g) > 1]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    view_sets = _view_sets(args, parser)
    groups = _groups(args, parser)
    torch.set_num_threads(1)
    loaded = [load_learner(d) for d in args.run_dirs]
    runs = make_runs(args.runs, loaded[0][1], args.num_runs, args.seed)
    shown = ("models", "runs", "shift", "affine", "views", "mean_error", "ci95")
    results = []
    for shift, affine in [(s, v) for v in view_sets for s in args.shift]:
        log_probs = [run_log_probs(learner, runs, shift, affine) for learner, _ in loaded]
        for group in groups:
            result = members_error([log_probs[i] for i in group], runs, shift, affine)
            row = {"models": [args.run_dirs[i] for i in group], "runs": args.runs, **result}
            results.append(row)
            print(json.dumps({k: row[k] for k in shown}), flush=True)
    if args.out:
        command = "python -m experiments.tables.omniglot_eval " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        write_results(Path(args.out), args.title, command, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
