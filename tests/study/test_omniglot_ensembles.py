"""The official-run ensembles gathered for omniglot.md: order, validation twins, counts."""

from __future__ import annotations

import json

import pytest

from experiments.tables.omniglot_ensembles import (
    ensemble_lines,
    ensemble_rows,
    models_label,
    validation_name,
)

TURNS = [[-10.0, 1.0], [0.0, 1.0], [10.0, 1.0]]


def _result(models, runs, error, views=25, affine=None, num_runs=20):
    result = {"models": models, "runs": runs, "mean_error": error, "ci95": 1.0, "num_runs": num_runs,
              "shift": 2, "views": views}
    if affine is not None:
        result["affine"] = affine
    return result


def _table(folder, name, results):
    (folder / f"{name}.json").write_text(json.dumps({"command": f"cmd {name}", "machine": "m", "results": results}))


def test_ensembles_are_listed_in_scoring_order_with_their_validation_twin(tmp_path):
    a, b, c = "runs/x/a-s0", "runs/x/a-s1", "runs/y/b-s0"
    _table(tmp_path, "omniglot_ensemble", [
        _result([a], "official", 6.5),  # a single model: not an ensemble
        _result([a, b], "official", 5.0),
    ])
    _table(tmp_path, "omniglot_ensemble_val", [_result([a, b], "val", 5.7, num_runs=200)])
    _table(tmp_path, "omniglot_ensemble_turned", [
        _result([a, b], "official", 5.0, affine=[[0.0, 1.0]]),  # the first ensemble again: listed once
        _result([a, b, c], "official", 4.0, views=75, affine=TURNS),  # its twin did not score it
    ])
    _table(tmp_path, "omniglot_ensemble_val_turned", [_result([a, b], "val", 9.9, affine=[[0.0, 1.0]])])
    rows = ensemble_rows(tmp_path, ("omniglot_ensemble", "omniglot_ensemble_turned", "omniglot_ensemble_absent"))
    assert [r["order"] for r in rows] == [1, 2]
    first, second = rows
    assert first["table"] == "omniglot_ensemble" and first["num_models"] == 2
    assert (first["validation_error"], first["validation_runs"]) == (5.7, 200)
    assert first["wrong"] == 20 and first["num_images"] == 400  # 5% of 20 runs × 20 drawings
    assert second["wrong"] == 16 and second["validation_error"] is None
    assert second["models"] == "runs/x: a-s0, a-s1; runs/y: b-s0"
    lines = ensemble_lines(rows)
    assert lines[-1].startswith("| 2 | 3 (runs/x: a-s0, a-s1; runs/y: b-s0) | 75 | – | 4.00 ± 1.00 | 16 / 400 |")
    assert "| 5.70 (200) | 5.00 ± 1.00 | 20 / 400 |" in lines[-2]
    assert ensemble_lines([]) == []


def test_validation_twin_names_and_labels():
    assert validation_name("omniglot_ensemble") == "omniglot_ensemble_val"
    assert validation_name("omniglot_ensemble_long") == "omniglot_ensemble_val_long"
    with pytest.raises(ValueError, match="should start with 'omniglot_ensemble'"):
        validation_name("omniglot")
    assert models_label(["r/a", "s/b", "r/c"]) == "r: a, c; s: b"


def test_omniglot_table_adds_the_ensembles_beside_it_to_its_markdown_json_and_figure(tmp_path):
    from experiments.tables.omniglot import main
    from experiments.tables.omniglot_cells import cell_name

    cells = tmp_path / "cells"
    cells.mkdir()
    cell = {"method": "protonet", "ways": 5, "shots": 1, "seed": 0, "iterations": 10,
            "command": "metarl run experiments/omniglot_protonet.toml --set run.seed=0",
            "train_s": 1.0, "machine": "m", "accuracy": {"5": {"step": 0, "per_task": [90.0, 100.0]}},
            "official": {"mean_error": 12.0, "error_per_run": [10.0, 14.0], "protocol": "p"}}
    (cells / cell_name(cell)).write_text(json.dumps(cell))
    out = tmp_path / "results"
    out.mkdir()
    _table(out, "omniglot_ensemble_long", [_result(["r/a", "r/b"], "official", 4.0, views=75, affine=TURNS)])
    assert main(["--from-cells", "--cells", str(cells), "--out", str(out / "omniglot")]) == 0
    document = json.loads((out / "omniglot.json").read_text())
    assert [e["error"] for e in document["official_runs_ensembles"]] == [4.0]
    text = (out / "omniglot.md").read_text()
    assert "## Ensembles on the official runs" in text and "| 1 | 2 (r: a, b) | 75 |" in text
    assert (out / "omniglot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
