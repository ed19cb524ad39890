"""The ensembles scored on the 20 official one-shot runs, gathered for the Omniglot table.

``python -m experiments.tables.omniglot_eval`` writes one table per evaluation
(``experiments/results/omniglot_ensemble*.{md,json}``). Each official-run table has a twin on the
validation alphabet (``omniglot_ensemble_val*``) on which its ensemble was chosen. This module reads
the official-run tables in the order they were scored, pairs each ensemble with its validation
error, and gives the rows ``omniglot_table`` adds to ``omniglot.md`` and to its figure, so that the
best result on the official runs, and how many choices were scored there before it, stand beside
the single models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The official-run tables in the order they were scored; a name missing from the folder is skipped.
ENSEMBLE_TABLES = (
    "omniglot_ensemble",
    "omniglot_ensemble_turned",
    "omniglot_ensemble_eight",
    "omniglot_ensemble_long",
)
PREFIX = "omniglot_ensemble"
IMAGES_PER_RUN = 20


def validation_name(name: str) -> str:
    """The validation-alphabet twin of an official-run table: omniglot_ensemble_X → _val_X."""
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r} is not an ensemble table name (it should start with {PREFIX!r})")
    return PREFIX + "_val" + name[len(PREFIX) :]


def _key(result: dict[str, Any]) -> tuple:
    """What makes two evaluations the same ensemble: its models and its test-time views."""
    affine = tuple(map(tuple, result.get("affine", [[0.0, 1.0]])))
    return tuple(result["models"]), result.get("shift", 0), affine, result["views"]


def models_label(models: list[str]) -> str:
    """Run directories grouped by folder: ``runs/protonet_long: aug-s0, aug-s1``."""
    groups: dict[str, list[str]] = {}
    for model in models:
        path = Path(model)
        groups.setdefault(str(path.parent), []).append(path.name)
    return "; ".join(f"{folder}: {', '.join(names)}" for folder, names in groups.items())


def ensemble_rows(folder: Path, names: tuple[str, ...] = ENSEMBLE_TABLES) -> list[dict[str, Any]]:
    """Every ensemble (two or more models) scored on the official runs, in the order scored.

    Each row: ``order`` (1 = first ensemble scored on the official runs; one scored again later is
    listed once), ``table``, ``models``, ``num_models``, ``views``, ``error`` and ``ci95`` (% over
    the runs), ``wrong`` (test drawings misclassified, of ``num_images``), and
    ``validation_error`` / ``validation_runs``: the same ensemble on the validation alphabet in the
    twin table, or None where that did not score it.
    """
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()  # an ensemble scored again in a later table is listed once, first
    for name in names:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        document = json.loads(path.read_text())
        twin = folder / f"{validation_name(name)}.json"
        validation = (
            {_key(r): r for r in json.loads(twin.read_text())["results"]} if twin.is_file() else {}
        )
        for result in document["results"]:
            if result["runs"] != "official" or len(result["models"]) < 2 or _key(result) in seen:
                continue
            seen.add(_key(result))
            chosen_on = validation.get(_key(result))
            rows.append(
                {
                    "order": len(rows) + 1,
                    "table": name,
                    "models": models_label(result["models"]),
                    "num_models": len(result["models"]),
                    "views": result["views"],
                    "error": result["mean_error"],
                    "ci95": result["ci95"],
                    "wrong": round(result["mean_error"] * result["num_runs"] * IMAGES_PER_RUN / 100),
                    "num_images": result["num_runs"] * IMAGES_PER_RUN,
                    "validation_error": None if chosen_on is None else chosen_on["mean_error"],
                    "validation_runs": None if chosen_on is None else chosen_on["num_runs"],
                    "command": document["command"],
                }
            )
    return rows


def ensemble_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown section of ``omniglot.md`` that lists the ensembles (empty without any)."""
    if not rows:
        return []
    lines = [
        "## Ensembles on the official runs (ProtoNets with test-time views)",
        "",
        "Each ensemble averages its models' class log-probabilities; each image's embedding is the "
        "mean over its views (shifts up to 2 px, and turns where there are 75). Ensembles and views "
        "were chosen on 100 one-shot runs of the validation alphabet (Greek, never trained on) and "
        "only then scored on the official runs, each table alongside the smaller ensembles it "
        "compared; `#` is the order in which they were first scored there, so a later row had more "
        "looks at the official runs behind it. Commands and single models: the tables named in "
        "the last column.",
        "",
        "| # | models | views | validation error % (runs) | official error % | wrong | table |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        validation = (
            "–"
            if r["validation_error"] is None
            else f"{r['validation_error']:.2f} ({r['validation_runs']})"
        )
        lines.append(
            f"| {r['order']} | {r['num_models']} ({r['models']}) | {r['views']} | {validation} | "
            f"{r['error']:.2f} ± {r['ci95']:.2f} | {r['wrong']} / {r['num_images']} | "
            f"[{r['table']}]({r['table']}.md) |"
        )
    return lines
