# Over 400 lines: training, resuming and scoring one Omniglot cell with its checkpoints and chunked held-out scores are one bookkeeping unit; the table and its figure are elsewhere.
"""The cells of the Omniglot table: one trained model each (method, N-way, K-shot, seed, iterations).

``run_cell`` trains (or resumes) one model and scores it on the held-out episodes and, for one-shot
models, on the 20 official runs; its result is a JSON file under ``experiments/results/
omniglot_cells`` whose command reproduces it. ``experiments.tables.omniglot`` schedules the cells
and builds the table from them; ``experiments.tables.families`` reads the families' cells.

A cell read or trained here carries its run as a structured value under ``"run"`` (a
:class:`~experiments.tables.run_identity.RunSpec`, parsed once from the stored command when the
cell is read; not written to the cell's file): its device, checkpoint interval and identity (what
the run computes) come from it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from experiments.tables.run_identity import RunSpec
from metarl.runtime import machine

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
# Held-out episodes a gradient learner's cell scores between two saves of its scores: a multiple
# of maml.VMAP_EVAL_CHUNK, so that chunked scoring batches the episodes as one call would.
SCORE_CHUNK = 24
# Under the cells folder: copies of runs stopped before they finished, for a fresh clone to resume.
UNFINISHED = "unfinished"


def cell_machines(results: list[dict[str, Any]]) -> dict[str, int]:
    """Each machine the cells were trained on (with the device they used), and how many."""
    out: dict[str, int] = {}
    for r in results:
        device = r["run"].device
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


def cell_run(method: str, overrides: list[str]) -> RunSpec:
    """The training run of one cell of ``method`` with these ``--set`` overrides."""
    return RunSpec.of(f"experiments/omniglot_{method}.toml", overrides)


def cell_command(method: str, overrides: list[str]) -> str:
    return cell_run(method, overrides).command()


def trained_runs(method: str) -> list[tuple[int, int, tuple[int, ...]]]:
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


def _finished(
    method: str,
    ways: int,
    shots: int,
    seed: int,
    iterations: int,
    overrides: list[str],
    run_dir: Path,
    cells_dir: str | None,
) -> dict[str, Any] | None:
    """The cell's result if it was scored before: committed in ``cells_dir`` with a run of the
    same identity (the same experiment and seed, on any device, checkpointed at any interval), or
    left in ``run_dir`` by a finished run of the same length."""
    if cells_dir is not None:  # trained earlier or on another machine
        name = cell_name(
            {"method": method, "ways": ways, "shots": shots, "seed": seed, "iterations": iterations}
        )
        saved = Path(cells_dir) / name
        if saved.exists():
            cell = read_cell(saved)
            if cell["run"].identity() == cell_run(method, overrides).identity():
                return cell
    done = run_dir / "table.json"
    if done.exists():
        previous = read_cell(done)
        if previous["iterations"] == iterations:
            return previous
    return None


def cell_dir(root: str, method: str, ways: int, shots: int, seed: int) -> Path:
    """The run directory of one cell under ``root``."""
    return Path(root) / f"{method}-{ways}w{shots}s-s{seed}"


def parked_dir(cells_dir: str | Path, run_dir: Path) -> Path:
    """Where :func:`park` keeps a copy of the unfinished run ``run_dir`` beside the cells."""
    return Path(cells_dir) / UNFINISHED / run_dir.name


def park(root: str | Path, cells_dir: str | Path) -> list[tuple[str, int]]:
    """Copies each unfinished run under ``root`` (checkpointed, not yet written as a cell) to
    ``cells_dir/unfinished/NAME``: its config, checkpoint, logs and saved held-out scores, without
    TensorBoard events. Committed with the cells, it lets a fresh clone resume the run
    (:func:`run_cell` starts from it when ``root`` has no run of that name). Returns
    ``(name, checkpointed iteration)`` of each run parked."""
    from metarl.logger import load_checkpoint

    parked = []
    runs = sorted(Path(root).iterdir()) if Path(root).is_dir() else []
    for run_dir in runs:
        checkpoint = run_dir / "checkpoint.pt"
        if not (run_dir / "config.toml").is_file() or not checkpoint.is_file():
            continue  # not a run, or nothing trained yet
        if (run_dir / "table.json").exists():
            continue  # finished: its cell is in cells_dir
        dest = parked_dir(cells_dir, run_dir)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns("tb", "*.tmp", "checkpoint.prev.pt", ".lock"))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        parked.append((run_dir.name, int(load_checkpoint(checkpoint)["iteration"])))
    return parked


def _unpark(run_dir: Path, cells_dir: str | None) -> Path | None:
    """Copies the parked run of ``run_dir`` there if ``run_dir`` holds no run; returns its source."""
    if cells_dir is None or (run_dir / "config.toml").exists():
        return None
    parked = parked_dir(cells_dir, run_dir)
    if not (parked / "config.toml").is_file():
        return None
    shutil.copytree(parked, run_dir, dirs_exist_ok=True)
    return parked


def cell_state(
    method: str,
    ways: int,
    shots: int,
    seed: int,
    iterations: int,
    root: str,
    extra: list[str],
    cells_dir: str | None = None,
) -> str:
    """What ``run_cell`` would do with this cell, in words: reuse a finished result, resume a
    checkpoint (and at which iteration), or train from the start. Builds no experiment; reads
    only the checkpoint's iteration."""
    from metarl.logger import load_checkpoint

    overrides = cell_overrides(method, ways, shots, seed, iterations) + list(extra)
    run_dir = cell_dir(root, method, ways, shots, seed)
    finished = _finished(method, ways, shots, seed, iterations, overrides, run_dir, cells_dir)
    if finished is not None:
        committed = cells_dir is not None and (Path(cells_dir) / cell_name(finished)).exists()
        return f"done ({'committed' if committed else run_dir})"
    if not (run_dir / "config.toml").exists():
        parked = None if cells_dir is None else parked_dir(cells_dir, run_dir)
        if parked is None or not (parked / "config.toml").is_file():
            return "to train"
        run_dir = parked
    checkpoint = run_dir / "checkpoint.pt"
    done = int(load_checkpoint(checkpoint)["iteration"]) if checkpoint.exists() else 0
    if done == iterations:
        return f"trained, to score ({run_dir}{_scored_so_far(run_dir, done)})"
    return f"resumes at iteration {done} of {iterations} ({run_dir})"


def _scored_so_far(run_dir: Path, iteration: int) -> str:
    """``"; 48 of 600 held-out 20-way episodes scored"`` for the scores saved in ``run_dir`` for
    the model of ``iteration`` (see :func:`score_held_out`); empty if none were."""
    said = []
    for path in sorted(run_dir.glob("scores-*way.json")):
        saved = json.loads(path.read_text())
        if saved["key"]["iteration"] == iteration:
            scored = sum(len(part["loss"]) for part in saved["parts"].values())
            ways = path.stem.removeprefix("scores-").removesuffix("way")
            said.append(f"{scored} of {saved['key']['num_tasks']} held-out {ways}-way episodes scored")
    return "".join(f"; {s}" for s in said)


def _open(method: str, overrides: list[str], run_dir: Path, iterations: int) -> Any:
    """The cell's experiment: resumed from ``run_dir`` if a run was started there, else new."""
    from metarl.experiment import Experiment

    if not (run_dir / "config.toml").exists():
        return Experiment.create(f"experiments/omniglot_{method}.toml", overrides, run_dir)
    experiment = Experiment.resume(run_dir)
    if experiment.run_cfg.num_iterations != iterations:
        raise ValueError(
            f"{run_dir} holds a run of {experiment.run_cfg.num_iterations} iterations, not {iterations}; "
            "pass another --root, or delete that directory to retrain it"
        )
    return experiment


def _evaluate(agent: Any, tasks: list[Any], seed: int) -> dict[str, Any]:
    """``agent.evaluate`` on ``tasks`` with its generators seeded by ``seed``."""
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    return dict(agent.evaluate(tasks, rng))


def score_held_out(
    agent: Any,
    tasks: list[Any],
    seed: int,
    partial: Path | None = None,
    iteration: int = 0,
    chunk: int | None = None,
    stop_requested: Callable[[], str | None] = lambda: None,
) -> dict[str, Any]:
    """``agent.evaluate(tasks)``, scored ``chunk`` tasks at a time (default ``SCORE_CHUNK``) and
    saved to ``partial`` after each chunk, so that a stopped scoring resumes where it stopped.

    Only for a learner that scores each task on its own (``scores_tasks_independently``) on tasks
    that fix their own episodes, so the chunks give the values of one call on all the tasks;
    other learners are scored in one call and save nothing. Saved chunks are reused only for the
    same model (``iteration``), ``seed``, task count and ``chunk``. After each saved chunk,
    ``stop_requested()`` returning a signal name raises :class:`ScoringStopped`.
    """
    if partial is None or not agent.scores_tasks_independently:
        return _evaluate(agent, tasks, seed)
    from metarl.logger import atomic_write_bytes
    from metarl.stopping import ScoringStopped

    chunk = chunk or SCORE_CHUNK
    key = {"iteration": iteration, "seed": seed, "num_tasks": len(tasks), "chunk": chunk}
    parts: dict[str, Any] = {}
    if partial.exists():
        saved = json.loads(partial.read_text())
        if saved.get("key") == key:
            parts = saved["parts"]
    starts = range(0, len(tasks), chunk)
    for start in starts:
        if str(start) in parts:
            continue
        began = time.perf_counter()
        e = _evaluate(agent, tasks[start : start + chunk], seed)
        parts[str(start)] = {
            "adaptation_steps": list(e["adaptation_steps"]),
            "loss": np.asarray(e["loss"]).tolist(),
            "accuracy": None if e["accuracy"] is None else np.asarray(e["accuracy"]).tolist(),
        }
        # a kill mid-write leaves the previous save whole
        atomic_write_bytes(partial, json.dumps({"key": key, "parts": parts}).encode())
        scored = min(start + chunk, len(tasks))
        print(
            f"{partial.parent.name}: scored {scored} of {len(tasks)} held-out episodes "
            f"({time.perf_counter() - began:.0f} s for the last {scored - start})",
            flush=True,
        )
        signal_name = stop_requested()
        if signal_name is not None and scored < len(tasks):
            raise ScoringStopped(signal_name, iteration, partial.parent, scored, len(tasks))
    ordered = [parts[str(start)] for start in starts]
    accuracy = [p["accuracy"] for p in ordered]
    return {
        "adaptation_steps": ordered[0]["adaptation_steps"],
        "loss": np.concatenate([np.asarray(p["loss"]) for p in ordered]),
        "accuracy": None
        if any(a is None for a in accuracy)
        else np.concatenate([np.asarray(a) for a in accuracy]),
    }


def _held_out_accuracy(
    experiment: Any,
    method: str,
    num_ways: int,
    stop_requested: Callable[[], str | None] = lambda: None,
) -> dict[str, Any]:
    """Accuracy (%) per fixed test episode at the reported step, and at every evaluated step.
    Scores are saved in the run directory as they come (see :func:`score_held_out`)."""
    evaluation = score_held_out(
        experiment.agent,
        experiment.distribution.test_tasks(num_ways=num_ways),
        experiment.eval_cfg.seed,
        Path(experiment.run_dir) / f"scores-{num_ways}way.json",
        experiment.iteration,
        stop_requested=stop_requested,
    )
    step = report_step(method, num_ways)
    return {
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
    threads: int = 1,
) -> dict[str, Any]:
    """Trains (or resumes) one model, then scores it on held-out episodes and the official runs.

    ``threads`` is torch's CPU thread count in this worker: 1 when a worker runs on each core,
    more when fewer cells than cores are left.

    The result is also written to ``cells_dir`` (committed with the table), so that a table can
    be assembled from cells trained at different times or on several machines.
    """
    import torch

    from metarl.fewshot.omniglot_tasks import official_runs_error
    from metarl.stopping import stop_signals

    torch.set_num_threads(threads)
    overrides = cell_overrides(method, ways, shots, seed, iterations) + list(extra)
    run = cell_run(method, overrides)
    run_dir = cell_dir(root, method, ways, shots, seed)
    finished = _finished(method, ways, shots, seed, iterations, overrides, run_dir, cells_dir)
    if finished is not None:
        return finished
    parked = _unpark(run_dir, cells_dir)
    if parked is not None:
        print(f"{run_dir.name}: resumes the run parked in {parked}", flush=True)
    experiment = _open(method, overrides, run_dir, iterations)
    device = getattr(experiment.agent, "device", None)
    if gpu_share is not None and device is not None and device.type == "cuda":
        # Each worker's caching allocator keeps its peak; without a cap, one worker's held-out
        # evaluation can take the memory the others then fail to get (seen with 16 workers).
        torch.cuda.set_per_process_memory_fraction(gpu_share)
    first, start = experiment.iteration, time.perf_counter()
    experiment.run(progress=False)
    result: dict[str, Any] = {
        "method": method,
        "ways": ways,
        "shots": shots,
        "seed": seed,
        "iterations": iterations,
        "command": run.command(),
        # wall time of the iterations trained by this call (all of them unless it resumed a run)
        "train_s": time.perf_counter() - start,
        "train_s_iterations": iterations - first,
    }
    with stop_signals() as received:  # a stop while scoring waits for the next save of scores
        result["accuracy"] = {
            str(n): _held_out_accuracy(
                experiment, method, n, lambda: received[0] if received else None
            )
            for n in test_ways
        }
    if shots == 1 and (ways == 20 or method in WIDE_METRIC):
        result["official"] = official_runs_error(experiment.agent)
    experiment.close()
    result["machine"] = machine()
    (run_dir / "table.json").write_text(json.dumps(result))
    if cells_dir is not None:
        Path(cells_dir).mkdir(parents=True, exist_ok=True)
        (Path(cells_dir) / cell_name(result)).write_text(json.dumps(result) + "\n")
        shutil.rmtree(parked_dir(cells_dir, run_dir), ignore_errors=True)  # now a cell
    return {**result, "run": run}


def read_cell(path: Path) -> dict[str, Any]:
    """One cell's stored result, with its run under ``"run"``, parsed from its command."""
    cell: dict[str, Any] = json.loads(path.read_text())
    return {**cell, "run": RunSpec.parse(cell["command"])}


def cell_name(result: dict[str, Any]) -> str:
    """The file name of one trained cell: method, ways, shots, seed and iterations."""
    r = result
    return f"{r['method']}-{r['ways']}w{r['shots']}s-s{r['seed']}-i{r['iterations']}.json"


def load_cells(cells_dir: str | Path) -> list[dict[str, Any]]:
    """Every committed cell result under ``cells_dir`` (none if the folder does not exist)."""
    folder = Path(cells_dir)
    if not folder.is_dir():
        return []
    return [read_cell(p) for p in sorted(folder.glob("*.json"))]


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


def seed_command(runs: list[RunSpec], seeds: list[int]) -> str:
    """One command for a row's seeds (in braces). Where the seeds ran on different devices, or
    checkpointed at different intervals (neither changes what a run computes), the command is given
    without that override and a trailing shell comment names the value each seed ran with."""
    base = runs[0]
    notes = []
    devices = [r.device for r in runs]
    if len(set(devices)) > 1:
        base = base.without("agent.device")
        notes.append(_per_seed(
            seeds, devices,
            lambda d: "no agent.device (CPU)" if d == "cpu" else f"--set agent.device={d}"))
    intervals = [r.checkpoint_every for r in runs]
    if len(set(intervals)) > 1:
        base = base.without("run.checkpoint_every")
        notes.append(_per_seed(
            seeds, intervals,
            lambda v: "no run.checkpoint_every" if v is None else f"--set run.checkpoint_every={v}"))
    command = base.setting("run.seed", "{" + ",".join(map(str, seeds)) + "}").command()
    return command + (f"  # {'; '.join(notes)}" if notes else "")


def _per_seed(seeds: list[int], values: list[Any], describe: Callable[[Any], str]) -> str:
    """``seed 0 with X; seeds 1,2 with Y``: the seeds that ran with each value, in order."""
    on: dict[Any, list[int]] = {}
    for seed, value in zip(seeds, values, strict=True):
        on.setdefault(value, []).append(seed)
    return "; ".join(
        f"seed{'s' if len(s) > 1 else ''} {','.join(map(str, s))} with {describe(v)}"
        for v, s in on.items()
    )
