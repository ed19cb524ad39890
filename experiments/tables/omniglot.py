# Over 400 lines: the Omniglot table's command line (training plan, parking, rebuilding from cells) and its markdown; the cells themselves are in omniglot_cells.py, the figure in omniglot_plot.py.
"""Builds ``experiments/results/omniglot.{md,json}``: every learner, 5/20-way, 1/5-shot, several seeds.

    python -m experiments.tables.omniglot --iterations 2000 --seeds 3 --workers 2
    python -m experiments.tables.omniglot --methods protonet maml --method-iterations protonet=20000

Each cell is one ``metarl run experiments/omniglot_METHOD.toml --set ...`` followed by its held-out
evaluation (600 fixed test episodes) and, for the 20-way 1-shot model (ProtoNets: the 1-shot model),
the error on the 20 official one-shot runs of the Omniglot challenge. ProtoNets trains one 60-way
model per K and tests it at 5 and 20 ways; the others train one model per (N, K), as in their papers.
Finished runs are reused, so a killed sweep picks up where it stopped; so are the committed cells
of ``--cells`` whose run computes what a job's would (the same config, resolved, and seed; the
device and the checkpoint and log intervals may differ). ``--park`` copies the unfinished runs
under ``--root`` into ``--cells``/unfinished, to be committed: a clone without those runs resumes
each from its parked copy, and a finished cell's parked copy is removed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from experiments.tables.common import references
from experiments.tables.omniglot_cells import (
    ALL_METHODS,
    AUGMENTED_PROTONET,
    CELLS,
    FAMILY_METHODS,
    METHODS,
    cell_machines,
    cell_state,
    load_cells,
    merge_cells,
    park,
    parked_dir,
    run_cell,
    seed_command,
    trained_runs,
)
from experiments.tables.omniglot_ensembles import ensemble_lines, ensemble_rows
from experiments.tables.omniglot_plot import plot_table
from metarl.config import count_at_least
from metarl.runtime import machine
from metarl.stopping import StoppablePool

# Published accuracies (full background set, conv4) and official-run error rates, with their
# sources: experiments/references.toml.
_REFERENCES = references()
PUBLISHED = {
    method: tuple(entry["accuracy"].get(f"{ways}w{shots}s") for ways, shots in CELLS)
    for method, entry in _REFERENCES["omniglot"].items()
}
SOURCES = {method: entry["source"] for method, entry in _REFERENCES["omniglot"].items()}
for _method in AUGMENTED_PROTONET:  # the same learner, published without augmentation
    PUBLISHED[_method] = PUBLISHED["protonet"]
    SOURCES[_method] = "ProtoNets, " + SOURCES["protonet"]
OFFICIAL_REFERENCE = tuple(
    (r["model"], r["background"], r["error"], r["source"]) for r in _REFERENCES["omniglot_official_runs"]
)


def _cell(values: list[float]) -> dict[str, float]:
    from metarl.evaluation import mean_ci95

    mean, ci = mean_ci95(np.asarray(values, dtype=float))
    return {"mean": mean, "ci95": ci, "num": len(values)}


def _rows(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, official = [], []
    for method in METHODS:
        for index, (ways, shots) in enumerate(CELLS):
            cells = [
                r
                for r in results
                if r["method"] == method and r["shots"] == shots and str(ways) in r["accuracy"]
            ]
            if not cells:
                continue
            cells.sort(key=lambda r: r["seed"])
            scores: list[float] = sum((r["accuracy"][str(ways)]["per_task"] for r in cells), [])
            rows.append(
                {
                    "method": method,
                    "ways": ways,
                    "shots": shots,
                    "seeds": [r["seed"] for r in cells],
                    "iterations": cells[0]["iterations"],
                    "step": cells[0]["accuracy"][str(ways)]["step"],
                    "accuracy": _cell(scores),
                    "published": PUBLISHED[method][index],
                    "commands": [r["command"] for r in cells],
                    "runs": [r["run"] for r in cells],  # for the markdown; not in the JSON
                }
            )
        runs = sorted(
            (r for r in results if r["method"] == method and "official" in r),
            key=lambda r: r["seed"],
        )
        if runs:
            errors: list[float] = sum((r["official"]["error_per_run"] for r in runs), [])
            official.append(
                {
                    "method": method,
                    "model": f"{runs[0]['ways']}-way {runs[0]['shots']}-shot",
                    "protocol": runs[0]["official"]["protocol"],
                    "seeds": [r["seed"] for r in runs],
                    "error": _cell(errors),
                    "commands": [r["command"] for r in runs],
                    "runs": [r["run"] for r in runs],
                }
            )
    return rows, official


def _fmt(cell: dict[str, float]) -> str:
    return (
        f"{cell['mean']:.2f} ± {cell['ci95']:.2f}"
        if np.isfinite(cell["ci95"])
        else f"{cell['mean']:.2f}"
    )


SETUP = (
    "Training: the minimal background sets of the Omniglot challenge (images_background_small1/2, 242 "
    "characters from 8 alphabets; split by alphabet with seed 0: 131 training characters from 5 "
    "alphabets, test = Korean + Japanese (katakana), 87 characters), 28×28, rotations by 90° as extra "
    "classes, conv4 with 64 filters. Held-out: 600 fixed test episodes per cell, 15 query images per "
    "class, mean accuracy (%) ± 95% CI over episodes × seeds. Gradient learners are scored after the "
    "inner-step count in the `step` column. The published figures were obtained on the full "
    "background set (1,200 training characters), a much larger training set than ours."
)
COMPARABLE = (
    "Our training split holds 5 alphabets (131 characters) of the two minimal sets, the same "
    "size as one of the five-alphabet sets of Lake et al. 2015, so the five-alphabet and "
    "minimal rows are the comparable ones; the 30-alphabet rows are what more background "
    "data buys."
)


def _accuracy_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | N-way K-shot | seeds | iterations | step | accuracy | published (full set) | command (seeds in braces) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pub = "–" if row["published"] is None else f"{row['published']} ({SOURCES[row['method']]})"
        lines.append(
            f"| {row['method']} | {row['ways']}-way {row['shots']}-shot | {len(row['seeds'])} | "
            f"{row['iterations']} | {row['step']} | {_fmt(row['accuracy'])} | {pub} | "
            f"`{seed_command(row['runs'], row['seeds'])}` |"
        )
    return lines


def _official_lines(official: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The 20 official within-alphabet 20-way one-shot runs (error %, mean ± 95% CI over runs × seeds)",
        "",
        "| method | model | error | protocol | command |",
        "|---|---|---|---|---|",
    ]
    for row in official:
        lines.append(
            f"| {row['method']} | {row['model']} | {_fmt(row['error'])} | {row['protocol']} | "
            f"`{seed_command(row['runs'], row['seeds'])}` |"
        )
    lines += [
        "",
        "Published errors on the same 20 runs (background set the model learned from → error %):",
        "",
        "| model | background | error | source |",
        "|---|---|---|---|",
    ]
    return lines + [f"| {m} | {b} | {e} | {src} |" for m, b, e, src in OFFICIAL_REFERENCE]


def _stored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the JSON holds them: each seed's command as text, without its parsed run."""
    return [{k: v for k, v in row.items() if k != "runs"} for row in rows]


def write_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Writes ``args.out``.json, .md and .png from the cells' results."""
    results = [r for r in results if r["method"] in METHODS]  # the families' cells: families.md
    rows, official = _rows(results)
    ensembles = ensemble_rows(Path(args.out).parent)
    document = {
        "benchmark": "Omniglot few-shot classification, minimal background sets",
        "machine": machine(),
        "num_seeds": max((len(r["seeds"]) for r in rows), default=0),
        "num_test_tasks": 600,
        "table_command": args.table_command,
        "rows": _stored(rows),
        "official_runs": _stored(official),
        "official_runs_reference": OFFICIAL_REFERENCE,
        "official_runs_ensembles": ensembles,
        "cell_machines": cell_machines(results),
        "plot": plot_table(rows, official, Path(args.out), ensembles).name,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(document, indent=1))
    lines = [
        "# Omniglot: few-shot accuracy on the minimal background sets",
        "",
        SETUP,
        "",
        f"Table written by `{args.table_command}` on {document['machine']}. Cells trained on: "
        + "; ".join(f"{m} ({n} cells)" for m, n in document["cell_machines"].items())
        + ".",
        "",
        f"![Accuracy per setting and error on the official runs]({document['plot']})",
        "",
        *_accuracy_lines(rows),
        "",
        *_official_lines(official),
        "",
        COMPARABLE,
    ]
    if ensembles:
        lines += ["", *ensemble_lines(ensembles)]
    if args.note_file:
        lines += ["", Path(args.note_file).read_text().strip()]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--iterations", type=int, default=2000, help="training iterations of every run"
    )
    parser.add_argument(
        "--method-iterations",
        nargs="*",
        default=[],
        metavar="METHOD=N",
        help="per-method iterations, e.g. protonet=20000",
    )
    parser.add_argument("--seeds", type=int, default=3, help="train seeds 0 .. SEEDS-1")
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        metavar="S",
        help="train only these seeds (instead of --seeds), e.g. to split one row's seeds "
        "between two commands running at once",
    )
    parser.add_argument("--workers", type=count_at_least(1), default=2)
    parser.add_argument(
        "--threads",
        type=count_at_least(1),
        default=1,
        help="torch CPU threads per worker (default 1: one worker per core); e.g. --workers 1 "
        "--threads 2 gives a last cell both cores of a 2-core machine",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=ALL_METHODS,
        help=f"learners to train (default: the table's); {', '.join(FAMILY_METHODS)} train "
        "5-way 1-shot cells for families.md",
    )
    parser.add_argument(
        "--settings",
        nargs="*",
        metavar="NwKs",
        help="train only these models, e.g. 5w1s (ProtoNets: the model trained with K shots); "
        "default: all of a method's",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra override of every run (e.g. tasks.channels=8 for a smoke test)",
    )
    parser.add_argument("--root", default="runs/omniglot_table")
    parser.add_argument(
        "--cells",
        default="experiments/results/omniglot_cells",
        help="folder of per-cell results, committed; the table holds these and the cells trained now",
    )
    parser.add_argument(
        "--from-cells",
        action="store_true",
        help="train nothing: build the table from --cells alone",
    )
    parser.add_argument(
        "--park",
        action="store_true",
        help="train nothing: copy each unfinished run under --root (config, checkpoint, logs, saved "
        "scores) to CELLS/unfinished/, to commit, so that a fresh clone resumes it there",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="train nothing: list the cells the command would train, resume or reuse",
    )
    parser.add_argument("--out", default="experiments/results/omniglot")
    parser.add_argument(
        "--gpu-share",
        type=float,
        help="fraction of the GPU's memory each CUDA worker may hold (default 0.9 / workers)",
    )
    parser.add_argument(
        "--note-file",
        help="a Markdown file whose text is added under the table (machines, budgets)",
    )
    return parser


def _jobs(args: argparse.Namespace, settings: set[tuple[int, int]] | None) -> list[tuple]:
    """``run_cell`` arguments of every cell the command asks for, seed by seed."""
    per_method = dict(item.split("=", 1) for item in args.method_iterations)
    share = args.gpu_share if args.gpu_share is not None else 0.9 / args.workers
    return [
        (m, w, k, tw, s, int(per_method.get(m, args.iterations)))
        + (args.root, args.set, args.cells, share, args.threads)
        for s in (args.seed if args.seed else range(args.seeds))
        for m in args.methods
        for w, k, tw in trained_runs(m)
        if settings is None or (w, k) in settings
    ]


def _train(jobs: list[tuple], committed: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Trains the cells (``args.workers`` at a time), rewriting the table after each one."""
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    with StoppablePool(args.workers) as pool:
        futures = [pool.submit(run_cell, *job) for job in jobs]
        for i, (job, future) in enumerate(zip(jobs, futures, strict=True)):
            try:
                r = pool.result(future, f"{job[0]} {job[1]}w{job[2]}s seed={job[4]}")
            except Exception as exc:  # one failed cell (e.g. out of GPU memory) spares the rest
                failures.append(
                    f"{job[0]} {job[1]}w{job[2]}s seed={job[4]}: {type(exc).__name__}: {exc}"
                )
                print(f"[{i + 1}/{len(jobs)}] FAILED {failures[-1][:300]}", flush=True)
                continue
            if r is None:  # stopped by Ctrl-C or kill
                continue
            results.append(r)
            accs = {n: round(float(np.mean(a["per_task"])), 2) for n, a in r["accuracy"].items()}
            print(
                f"[{i + 1}/{len(jobs)}] {r['method']} {r['ways']}w{r['shots']}s seed={r['seed']} accuracy {accs}"
                + (f" official error {r['official']['mean_error']:.1f}" if "official" in r else ""),
                flush=True,
            )
            write_table(merge_cells(committed, results), args)
    print(json.dumps({"runs": len(results), "failed": len(failures), "out": args.out}))
    stopped = pool.stop_report(len(results))
    if stopped is not None:
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    if failures:
        print(
            f"{len(failures)} cells failed; the table holds the others. Run the same command again "
            f"to retrain only the missing cells (finished runs under {args.root} are reused).",
            file=sys.stderr,
        )
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted({item.split("=", 1)[0] for item in args.method_iterations} - set(ALL_METHODS))
    if unknown:
        parser.error(
            f"--method-iterations names unknown methods {unknown}; choose from {list(ALL_METHODS)}"
        )
    args.table_command = "python -m experiments.tables.omniglot " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    settings = None
    if args.settings:
        parsed = [re.fullmatch(r"(\d+)w(\d+)s", x) for x in args.settings]
        bad = [x for x, m in zip(args.settings, parsed, strict=True) if m is None]
        if bad:
            parser.error(f"--settings {bad}: write each as NwKs, e.g. 5w1s or 20w5s")
        settings = {(int(m.group(1)), int(m.group(2))) for m in parsed if m is not None}
    if args.note_file and not Path(args.note_file).is_file():
        parser.error(f"--note-file {args.note_file}: no such file")
    if args.park:
        parked = park(args.root, args.cells)
        for name, iteration in parked:
            print(f"{name}: parked at iteration {iteration} in {parked_dir(args.cells, Path(name))}")
        print(f"{len(parked)} unfinished runs under {args.root} parked; commit them to resume elsewhere")
        return 0
    committed = load_cells(args.cells)
    if args.from_cells:
        if not committed:
            parser.error(f"--from-cells: no cell results in {args.cells}")
        write_table(merge_cells(committed), args)
        print(json.dumps({"runs": len(committed), "out": args.out}))
        return 0
    jobs = _jobs(args, settings)
    if not jobs:
        parser.error("no cell to train: --settings matches none of the chosen methods' models")
    if args.plan:
        return _plan(jobs)
    return _train(jobs, committed, args)


def _plan(jobs: list[tuple]) -> int:
    """Prints, cell by cell, whether the command would reuse, resume or train it."""
    states = [cell_state(*job[:3], *job[4:9]) for job in jobs]
    names = [f"{job[0]} {job[1]}w{job[2]}s seed={job[4]}" for job in jobs]
    width = max(map(len, names))
    for name, job, state in zip(names, jobs, states, strict=True):
        print(f"{name:<{width}}  {job[5]:>6} iterations  {state}")
    left = sum(not s.startswith("done") for s in states)
    print(f"{len(jobs) - left} of {len(jobs)} cells done; {left} to train or resume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
