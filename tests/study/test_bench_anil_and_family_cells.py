"""metarl bench anil (experiments/bench/anil.py) and the families' Omniglot cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_anil_reports_both_paths_from_one_run_and_their_losses_agree(tmp_path):
    import contextlib
    import io

    from experiments.bench.anil import main as bench_anil

    out = tmp_path / "bench_anil"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert bench_anil(["--ways", "5", "--shots", "1", "--tasks", "2", "--channels", "4",
                           "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert json.loads(printed.getvalue().splitlines()[-1])["train_speedup"] == r["train_speedup"]
    assert r["train_speedup"] == pytest.approx(r["reference_train_ms"] / r["cached_train_ms"])
    assert r["score_speedup"] == pytest.approx(r["reference_score_ms"] / r["cached_score_ms"])
    assert r["max_loss_difference"] < 1e-4 and "machine" in r
    assert f"{r['train_speedup']:.2f}×" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("method, step", [("mann", 1), ("probmaml", 3), ("learnedopt", 3)])
def test_omniglot_table_trains_the_other_families_cells(tmp_path, monkeypatch, method, step):
    """probabilistic MAML, MANN and the learned optimizer train 5-way 1-shot cells through the
    Omniglot table (for families.md): scored at their own step, with the whole curve kept."""
    from experiments.tables import omniglot_cells as table

    monkeypatch.chdir(ROOT)
    assert table.trained_runs(method) == [(5, 1, (5,))]
    tiny = ["tasks.channels=8", "tasks.num_test_tasks=4", "agent.meta_batch_size=2",
            "run.checkpoint_every=2", "run.eval_at_end=false"]
    cell = table.run_cell(method, 5, 1, (5,), 0, 2, str(tmp_path / "runs"), tiny, str(tmp_path / "cells"))
    scores = cell["accuracy"]["5"]
    assert scores["step"] == step and len(scores["per_task"]) == 4
    curve = scores["curve"]
    assert curve["steps"] == ([0, 1] if method == "mann" else [0, 1, 3, 5, 10])
    assert curve["per_task"][curve["steps"].index(step)] == pytest.approx(scores["per_task"], abs=1e-3)
    assert "official" not in cell and (tmp_path / "cells" / table.cell_name(cell)).exists()
    if method != "mann":
        assert "agent.num_queries=1" in cell["command"]
