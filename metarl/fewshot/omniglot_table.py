"""Builds ``experiments/results/omniglot.{md,json}``: every learner, 5/20-way, 1/5-shot, several seeds.

    python -m metarl.fewshot.omniglot_table --iterations 2000 --seeds 3 --workers 2
    python -m metarl.fewshot.omniglot_table --methods protonet maml --method-iterations protonet=20000

Each cell is one ``metarl run experiments/omniglot_METHOD.toml --set ...`` followed by its held-out
evaluation (600 fixed test episodes) and, for the 20-way 1-shot model (ProtoNets: the 1-shot model),
the error on the 20 official one-shot runs of the Omniglot challenge. ProtoNets trains one 60-way
model per K and tests it at 5 and 20 ways; the others train one model per (N, K), as in their papers.
Finished runs are reused, so a killed sweep picks up where it stopped; so are the committed cells
of ``--cells`` whose command is the one a job would run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from metarl.bench.adapt import machine

METHODS = (
    "maml", "fomaml", "metasgd", "anil", "reptile", "protonet", "protonet_aug", "protonet_affine",
    "matchingnet",
)
# ProtoNets trained with augmented images, for the official runs: one 1-shot model each.
AUGMENTED_PROTONET = ("protonet_aug", "protonet_affine")
# Metric learners that train wider than they test (60-way) and are tested at 5 and 20 ways.
WIDE_METRIC = ("protonet",) + AUGMENTED_PROTONET
# The other meta-learning families (probabilistic MAML, MANN, learned optimizer): trained here
# with --methods, 5-way 1-shot only, for experiments/results/families.md; not rows of omniglot.md.
FAMILY_METHODS = ("probmaml", "mann", "learnedopt")
ALL_METHODS = METHODS + FAMILY_METHODS
GRADIENT = ("maml", "fomaml", "metasgd", "anil", "reptile", "probmaml", "learnedopt")
CELLS = ((5, 1), (5, 5), (20, 1), (20, 5))
# MAML's 20-way settings (Finn et al. 2017, appendix A.1), shared by the methods that reuse them.
MAML_20WAY = ("agent.inner_lr=0.1", "agent.adapt_steps=5", "agent.meta_batch_size=16")
# Inner steps after which held-out accuracy is reported: MAML evaluates 5-way models after 3 steps
# and 20-way models after 5 (appendix A.1, as recalled); Reptile after 50 (Nichol et al. 2018).
# MANN is scored after reading the support set (its step 1); metric learners at their only step, 0.
REPORT_STEP = {"reptile": {5: 50, 20: 50}, "mann": {5: 1, 20: 1}, "default": {5: 3, 20: 5}}
PUBLISHED = {  # full background set (1,200 characters), conv4; see the sources in the markdown
    "maml": (98.7, 99.9, 95.8, 98.9),
    "fomaml": (98.3, 99.2, 89.4, 97.9),
    "metasgd": (99.53, 99.93, 95.93, 98.97),
    "anil": (None, None, 96.2, 98.0),
    "reptile": (95.39, 98.90, 88.14, 96.65),
    "protonet": (98.8, 99.7, 96.0, 98.9),
    "matchingnet": (98.1, 98.9, 93.8, 98.5),
}
SOURCES = {
    "maml": "Finn et al. 2017, table 1",
    "fomaml": "Finn et al. 2017 / Nichol et al. 2018",
    "metasgd": "Li et al. 2017",
    "anil": "Raghu et al. 2020",
    "reptile": "Nichol et al. 2018",
    "protonet": "Snell et al. 2017, table 1",
    "matchingnet": "Vinyals et al. 2016",
}
for _method in AUGMENTED_PROTONET:  # the same learner, published without augmentation
    PUBLISHED[_method] = PUBLISHED["protonet"]
    SOURCES[_method] = "ProtoNets, " + SOURCES["protonet"]


# Published error rates on the 20 official within-alphabet runs: (model, background set, error %,
# source). The Lake et al. 2019 minimal-set figures come from a reproduction of its table 1, not
# from the paper itself; the table says so.
OFFICIAL_REFERENCE = (
    ("people", "–", 4.5, "Lake et al. 2015, Science"),
    ("Bayesian program learning", "30 alphabets", 3.3, "Lake et al. 2015"),
    ("Bayesian program learning", "5 alphabets (two sets)", "4.3 / 4.0", "Lake et al. 2015"),
    ("Bayesian program learning", "minimal", 4.2, "Lake et al. 2019, table 1 (as reproduced)"),
    ("deep Siamese convnet (Koch et al.)", "30 alphabets", 8.0, "Lake et al. 2015"),
    ("deep convnet", "30 alphabets", 13.5, "Lake et al. 2015"),
    ("deep convnet", "5 alphabets (two sets)", "24.0 / 22.3", "Lake et al. 2015"),
    ("Prototypical Networks", "30 alphabets", 13.7, "Lake et al. 2019, table 1 (as reproduced)"),
    ("Prototypical Networks", "minimal", 30.1, "Lake et al. 2019, table 1 (as reproduced)"),
)


def cell_machines(results: list[dict[str, Any]]) -> dict[str, int]:
    """Each machine the cells were trained on (with the device they used), and how many."""
    out: dict[str, int] = {}
    for r in results:
        device = device_of(r["command"])
        key = f"{r.get('machine', 'unknown machine')}, " + (
            "cpu" if device == "cpu" else f"agent.device={device}"
        )
        out[key] = out.get(key, 0) + 1
    return out


def cell_overrides(method: str, ways: int, shots: int, seed: int, iterations: int) -> list[str]:
    """``--set`` overrides of one training run (ProtoNets: ``ways`` is only the 5-way test)."""
    out = [f"run.seed={seed}", f"run.num_iterations={iterations}", f"agent.num_shots={shots}"]
    if method in ("maml", "fomaml", "metasgd", "anil", "probmaml", "learnedopt"):
        out.append(f"agent.num_queries={shots}")
    if method == "reptile":
        out.append(f"agent.num_queries={10 - shots}")
    if ways == 20 and method not in WIDE_METRIC:
        out.append("tasks.num_ways=20")
        if method in ("maml", "fomaml", "metasgd", "anil"):
            out.extend(MAML_20WAY)
    return out


def _command(method: str, overrides: list[str]) -> str:
    return f"metarl run experiments/omniglot_{method}.toml " + " ".join(
        f"--set {o}" for o in overrides
    )


_DEVICE = re.compile(r" --set agent\.device=(\S+)")


def device_of(command: str) -> str:
    """The ``agent.device`` a cell's command sets (``cpu`` when it sets none)."""
    found = _DEVICE.search(command)
    return found.group(1) if found else "cpu"


def device_free(command: str) -> str:
    """A cell's command without its ``agent.device`` override: the device changes where a run
    computes, not what it computes, so a cell trained on a GPU and one trained on CPUs are seeds of
    one experiment."""
    return _DEVICE.sub("", command)


def _trained_runs(method: str) -> list[tuple[int, int, tuple[int, ...]]]:
    """(training ways, shots, test ways) of each model a method trains."""
    if method == "protonet":
        return [(5, 1, (5, 20)), (5, 5, (5, 20))]
    if method in AUGMENTED_PROTONET:  # the official runs' model: one shot
        return [(5, 1, (5, 20))]
    if method in FAMILY_METHODS:
        return [(5, 1, (5,))]
    return [(w, k, (w,)) for w, k in CELLS]


def report_step(method: str, ways: int) -> int:
    """The adaptation step whose held-out accuracy a cell reports."""
    if method in REPORT_STEP:
        return REPORT_STEP[method][ways]
    return REPORT_STEP["default"][ways] if method in GRADIENT else 0


def _accuracy(document: dict[str, Any], step: int) -> list[float]:
    steps = list(document["adaptation_steps"])
    if step not in steps:
        raise ValueError(
            f"the table reports accuracy after {step} inner steps, but the run evaluated {steps}; "
            f"add {step} to agent.eval_adapt_steps in the config"
        )
    return (100.0 * np.asarray(document["accuracy"], dtype=float)[:, steps.index(step)]).tolist()


def run_cell(
    method: str,
    ways: int,
    shots: int,
    test_ways: tuple[int, ...],
    seed: int,
    iterations: int,
    root: str,
    extra: list[str],
    cells_dir: str | None = None,
    gpu_share: float | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) one model, then scores it on held-out episodes and the official runs.

    The result is also written to ``cells_dir`` (committed with the table), so that a table can
    be assembled from cells trained at different times or on several machines.
    """
    import torch

    from metarl.experiment import Experiment
    from metarl.fewshot.omniglot_tasks import official_runs_error

    torch.set_num_threads(1)
    overrides = cell_overrides(method, ways, shots, seed, iterations) + list(extra)
    run_dir = Path(root) / f"{method}-{ways}w{shots}s-s{seed}"
    done = run_dir / "table.json"
    if cells_dir is not None:  # trained earlier or on another machine
        name = cell_name(
            {"method": method, "ways": ways, "shots": shots, "seed": seed, "iterations": iterations}
        )
        saved = Path(cells_dir) / name
        if saved.exists():
            cell: dict[str, Any] = json.loads(saved.read_text())
            if device_free(cell["command"]) == device_free(_command(method, overrides)):
                return cell
    if done.exists():
        previous: dict[str, Any] = json.loads(done.read_text())
        if previous["iterations"] == iterations:
            return previous
    if (run_dir / "config.toml").exists():
        experiment = Experiment.resume(run_dir)
        if experiment.run_cfg.num_iterations != iterations:
            raise ValueError(
                f"{run_dir} holds a run of {experiment.run_cfg.num_iterations} iterations, not {iterations}; "
                "pass another --root, or delete that directory to retrain it"
            )
    else:
        experiment = Experiment.create(f"experiments/omniglot_{method}.toml", overrides, run_dir)
    device = getattr(experiment.agent, "device", None)
    if gpu_share is not None and device is not None and device.type == "cuda":
        # Each worker's caching allocator keeps its peak; without a cap, one worker's held-out
        # evaluation can take the memory the others then fail to get (seen with 16 workers).
        torch.cuda.set_per_process_memory_fraction(gpu_share)
    start = time.perf_counter()
    experiment.run(progress=False)
    train_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "method": method,
        "ways": ways,
        "shots": shots,
        "seed": seed,
        "iterations": iterations,
        "command": _command(method, overrides),
        "train_s": train_s,
        "accuracy": {},
    }
    for n in test_ways:
        rng = np.random.default_rng(experiment.eval_cfg.seed)
        torch.manual_seed(experiment.eval_cfg.seed)
        evaluation = experiment.agent.evaluate(experiment.distribution.test_tasks(num_ways=n), rng)
        step = report_step(method, n)
        result["accuracy"][str(n)] = {
            "step": step,
            "per_task": _accuracy(evaluation, step),
            # every evaluated step, [step][task] (%), for curves such as families.md's
            "curve": {
                "steps": list(evaluation["adaptation_steps"]),
                "per_task": [
                    [round(a, 4) for a in _accuracy(evaluation, k)]
                    for k in evaluation["adaptation_steps"]
                ],
            },
        }
    if shots == 1 and (ways == 20 or method in WIDE_METRIC):
        result["official"] = official_runs_error(experiment.agent)
    experiment.close()
    result["machine"] = machine()
    done.write_text(json.dumps(result))
    if cells_dir is not None:
        Path(cells_dir).mkdir(parents=True, exist_ok=True)
        (Path(cells_dir) / cell_name(result)).write_text(json.dumps(result) + "\n")
    return result


def cell_name(result: dict[str, Any]) -> str:
    """The file name of one trained cell: method, ways, shots, seed and iterations."""
    r = result
    return f"{r['method']}-{r['ways']}w{r['shots']}s-s{r['seed']}-i{r['iterations']}.json"


def load_cells(cells_dir: str | Path) -> list[dict[str, Any]]:
    """Every committed cell result under ``cells_dir`` (none if the folder does not exist)."""
    folder = Path(cells_dir)
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def merge_cells(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells keyed by (method, ways, shots, seed): later groups win; per (method, ways, shots)
    only the cells of the largest iteration count are kept, so a row never mixes budgets."""
    keyed: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        for r in group:
            keyed[(r["method"], r["ways"], r["shots"], r["seed"])] = r
    longest: dict[tuple, int] = {}
    for (method, ways, shots, _), r in keyed.items():
        longest[(method, ways, shots)] = max(longest.get((method, ways, shots), 0), r["iterations"])
    return [r for (m, w, k, _), r in keyed.items() if r["iterations"] == longest[(m, w, k)]]


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
                }
            )
    return rows, official


def _fmt(cell: dict[str, float]) -> str:
    return (
        f"{cell['mean']:.2f} ± {cell['ci95']:.2f}"
        if np.isfinite(cell["ci95"])
        else f"{cell['mean']:.2f}"
    )


def seed_command(commands: list[str], seeds: list[int]) -> str:
    """One command for a row's seeds (in braces). Where the seeds ran on different devices, the
    command is given without the device and a trailing shell comment names the seeds run on each."""
    braces = "run.seed={" + ",".join(map(str, seeds)) + "}"
    devices = [device_of(c) for c in commands]
    if len(set(devices)) == 1:
        return commands[0].replace(f"run.seed={seeds[0]}", braces)
    on: dict[str, list[int]] = {}
    for seed, device in zip(seeds, devices, strict=True):
        on.setdefault(device, []).append(seed)
    where = "; ".join(
        f"seed{'s' if len(s) > 1 else ''} {','.join(map(str, s))} with "
        + ("no agent.device (CPU)" if d == "cpu" else f"--set agent.device={d}")
        for d, s in on.items()
    )
    return device_free(commands[0]).replace(f"run.seed={seeds[0]}", braces) + f"  # {where}"


def write_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    results = [r for r in results if r["method"] in METHODS]  # the families' cells: families.md
    rows, official = _rows(results)
    document = {
        "benchmark": "Omniglot few-shot classification, minimal background sets",
        "machine": machine(),
        "num_seeds": max((len(r["seeds"]) for r in rows), default=0),
        "num_test_tasks": 600,
        "table_command": args.table_command,
        "rows": rows,
        "official_runs": official,
        "official_runs_reference": OFFICIAL_REFERENCE,
        "cell_machines": cell_machines(results),
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(document, indent=1))
    lines = [
        "# Omniglot: few-shot accuracy on the minimal background sets",
        "",
        "Training: the minimal background sets of the Omniglot challenge (images_background_small1/2, 242 "
        "characters from 8 alphabets; split by alphabet with seed 0: 131 training characters from 5 "
        "alphabets, test = Korean + Japanese (katakana), 87 characters), 28×28, rotations by 90° as extra "
        "classes, conv4 with 64 filters. Held-out: 600 fixed test episodes per cell, 15 query images per "
        "class, mean accuracy (%) ± 95% CI over episodes × seeds. Gradient learners are scored after the "
        "inner-step count in the `step` column. The published figures were obtained on the full "
        "background set (1,200 training characters), a much larger training set than ours.",
        "",
        f"Table written by `{args.table_command}` on {document['machine']}. Cells trained on: "
        + "; ".join(f"{m} ({n} cells)" for m, n in document["cell_machines"].items())
        + ".",
        "",
        "| method | N-way K-shot | seeds | iterations | step | accuracy | published (full set) | command (seeds in braces) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pub = "–" if row["published"] is None else f"{row['published']} ({SOURCES[row['method']]})"
        lines.append(
            f"| {row['method']} | {row['ways']}-way {row['shots']}-shot | {len(row['seeds'])} | "
            f"{row['iterations']} | {row['step']} | {_fmt(row['accuracy'])} | {pub} | "
            f"`{seed_command(row['commands'], row['seeds'])}` |"
        )
    lines += [
        "",
        "## The 20 official within-alphabet 20-way one-shot runs (error %, mean ± 95% CI over runs × seeds)",
        "",
        "| method | model | error | protocol | command |",
        "|---|---|---|---|---|",
    ]
    for row in official:
        lines.append(
            f"| {row['method']} | {row['model']} | {_fmt(row['error'])} | {row['protocol']} | "
            f"`{seed_command(row['commands'], row['seeds'])}` |"
        )
    lines += [
        "",
        "Published errors on the same 20 runs (background set the model learned from → error %):",
        "",
        "| model | background | error | source |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {b} | {e} | {src} |" for m, b, e, src in OFFICIAL_REFERENCE]
    lines += [
        "",
        "Our training split holds 5 alphabets (131 characters) of the two minimal sets, the same "
        "size as one of the five-alphabet sets of Lake et al. 2015, so the five-alphabet and "
        "minimal rows are the comparable ones; the 30-alphabet rows are what more background "
        "data buys.",
    ]
    if args.note_file:
        lines += ["", Path(args.note_file).read_text().strip()]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
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
    args = parser.parse_args(argv)
    per_method = dict(item.split("=", 1) for item in args.method_iterations)
    unknown = sorted(set(per_method) - set(ALL_METHODS))
    if unknown:
        parser.error(
            f"--method-iterations names unknown methods {unknown}; choose from {list(ALL_METHODS)}"
        )
    args.table_command = "python -m metarl.fewshot.omniglot_table " + " ".join(
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
    committed = load_cells(args.cells)
    share = args.gpu_share if args.gpu_share is not None else 0.9 / args.workers
    if args.from_cells:
        if not committed:
            parser.error(f"--from-cells: no cell results in {args.cells}")
        write_table(merge_cells(committed), args)
        print(json.dumps({"runs": len(committed), "out": args.out}))
        return 0
    jobs = [
        (
            m,
            w,
            k,
            tw,
            s,
            int(per_method.get(m, args.iterations)),
            args.root,
            args.set,
            args.cells,
            share,
        )
        for s in range(args.seeds)
        for m in args.methods
        for w, k, tw in _trained_runs(m)
        if settings is None or (w, k) in settings
    ]
    if not jobs:
        parser.error("no cell to train: --settings matches none of the chosen methods' models")
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_cell, *job) for job in jobs]
        failures: list[str] = []
        for i, (job, future) in enumerate(zip(jobs, futures, strict=True)):
            try:
                r = future.result()
            except Exception as exc:  # one failed cell (e.g. out of GPU memory) spares the rest
                failures.append(
                    f"{job[0]} {job[1]}w{job[2]}s seed={job[4]}: {type(exc).__name__}: {exc}"
                )
                print(f"[{i + 1}/{len(jobs)}] FAILED {failures[-1][:300]}", flush=True)
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
    if failures:
        print(
            f"{len(failures)} cells failed; the table holds the others. Run the same command again "
            f"to retrain only the missing cells (finished runs under {args.root} are reused).",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
