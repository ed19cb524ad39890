"""What the results-table builders share: reading finished ``metarl sweep`` directories, rows
kept from an earlier table, and the ``IQM [lo, hi]`` cell format."""

from __future__ import annotations

import json
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from metarl.stats import bootstrap_difference_ci
from metarl.sweep import grid_cells, label_of

REFERENCES = Path(__file__).resolve().parents[1] / "references.toml"


def references() -> dict[str, Any]:
    """The published figures of ``experiments/references.toml``, each with its source."""
    with open(REFERENCES, "rb") as f:
        return tomllib.load(f)


def load_sweep(sweep_dir: Path) -> dict[str, Any]:
    """The ``sweep.json`` of a finished sweep directory; a clear error when the sweep has not ended."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `metarl sweep ... --out {sweep_dir}` to the end first"
        )
    return json.loads(path.read_text())


def kept_rows(
    path: Path, new_rows: list[dict[str, Any]], key: str = "rows"
) -> list[dict[str, Any]]:
    """Rows (under ``key``) of an earlier table's JSON whose sweep cell is not among ``new_rows``.

    A table rebuilt from a few fresh sweeps keeps the rows it already had for sweeps whose run
    directories are not given again; each kept row carries the machine it ran on.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--keep {path}: no such table JSON (drop --keep to start a new table)")
    document = json.loads(path.read_text())
    fresh = {(r["sweep"], r["cell"]) for r in new_rows}
    return [
        {**row, "machine": row.get("machine", document["machine"])}
        for row in document.get(key, [])
        if (row["sweep"], row["cell"]) not in fresh
    ]


def _stretches(run: Path) -> list[tuple[int, str]]:
    """(first iteration, machine) of each line of a run's machines.jsonl, in order."""
    path = run / "machines.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sorted((int(e["iteration"]), str(e["machine"])) for e in (json.loads(x) for x in lines if x.strip()))


def machine_at_iteration(run: Path) -> Callable[[int], str | None]:
    """Which machine trained a run's iteration: from its machines.jsonl (each line: the machine
    from that iteration on); None where the run records no machines."""
    stretches = _stretches(run)

    def machine_at(iteration: int) -> str | None:
        found = None
        for start, name in stretches:
            if start < iteration:
                found = name
        return found

    return machine_at


def machines_of(run_dirs: list[Path]) -> dict[str, int]:
    """Iterations trained on each machine, over the runs (from their timing and machines logs);
    a run with no timing log counts 0 iterations on each machine it records."""
    counts: dict[str, int] = {}
    for run in run_dirs:
        if not (run / "timing.jsonl").exists():
            for _, name in _stretches(run):
                counts.setdefault(name, 0)
            continue
        machine_at = machine_at_iteration(run)
        lines = (run / "timing.jsonl").read_text().splitlines()
        for line in lines:
            name = machine_at(int(json.loads(line)["iteration"]))
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def several_machines(rows: list[dict[str, Any]], default: str) -> bool:
    """Whether a table's rows ran on more than one machine (then each row names its own)."""
    return len({r.get("machine", default) for r in rows}) > 1


def fmt_iqm(stats: dict[str, Any] | None, j: int) -> str:
    """``IQM [lo, hi]`` of adaptation step ``j`` of a pooled metric (``–`` when absent)."""
    if stats is None:
        return "–"
    return f"{stats['iqm'][j]:.3g} [{stats['lo'][j]:.3g}, {stats['hi'][j]:.3g}]"


def command_config(command: str, cell: str) -> dict[str, Any]:
    """The run config that a ``metarl sweep CONFIG --set ... --grid ...`` command gave grid cell
    ``cell``: how rows kept from an earlier table (whose run directories are gone) recover it."""
    from metarl.config import apply_overrides, load_toml

    tokens = shlex.split(command)
    sets = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--set"]
    grids = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--grid"]
    cells = {label_of(c): c for c in grid_cells(grids)}
    if cell not in cells:
        raise ValueError(f"cell {cell!r} is not one of the grid cells of {command!r}: {sorted(cells)}")
    return apply_overrides(load_toml(tokens[tokens.index("sweep") + 1]), sets + cells[cell])


def gain(runs: list[Path], metric: str, step: int = 1) -> dict[str, float] | None:
    """Held-out ``metric`` after adaptation step ``step`` (``-1``: the last one scored) minus
    before, over tasks × seeds: the mean difference and its paired 95% bootstrap interval (each
    task scored before and after), from every run's ``eval.json``; ``None`` without runs, when
    one has no ``eval.json`` or when they did not score ``metric``."""
    pre, post = [], []
    if not runs or not all((run / "eval.json").exists() for run in runs):
        return None
    for run in runs:
        table = json.loads((run / "eval.json").read_text())["per_task"].get(metric)
        if table is None:
            return None
        scores = np.asarray(table, dtype=float)  # [tasks, adaptation steps]
        pre.append(scores[:, 0])
        post.append(scores[:, step])
    a, b = np.concatenate(post), np.concatenate(pre)
    lo, hi = bootstrap_difference_ci(a, b, np.mean)
    return {"mean": float(a.mean() - b.mean()), "lo": lo, "hi": hi, "num": int(a.size)}


def fmt_gain(g: dict[str, float] | None) -> str:
    """``+mean [+lo, +hi]`` of a :func:`gain` (``–`` when absent)."""
    return "–" if not g else f"{g['mean']:+.3g} [{g['lo']:+.3g}, {g['hi']:+.3g}]"
