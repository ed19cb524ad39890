"""metarl bench adapt (experiments/bench/adapt.py)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # times higher's per-task loop too: tens of seconds on 2 busy cores
def test_bench_adapt_reports_every_path_against_higher_in_one_run(tmp_path, capsys):
    from experiments.bench.adapt import main

    out = tmp_path / "bench_adapt"
    assert (
        main(["--models", "sinusoid_mlp", "--repeats", "3", "--warmup", "0", "--out", str(out)])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sinusoid_mlp"]
    impls = result["implementations"]
    assert {"metarl_vmap", "metarl_loop", "metarl_loop_one_backward", "autograd_loop"} <= set(impls)
    for name in ("metarl_loop", "metarl_loop_one_backward"):
        assert impls[name]["ms"] > 0
        if impls["higher"] is not None:
            assert impls[name]["ms_over_higher"] == impls[name]["ms"] / impls["higher"]["ms"]
            # every round's ratio at least m means every time at least m times higher's, so the
            # ratio of the medians lies between the lowest and the highest round's
            low, high = impls[name]["ms_over_higher_rounds"]
            assert low * (1 - 1e-12) <= impls[name]["ms_over_higher"] <= high * (1 + 1e-12)
    table = out.with_suffix(".md").read_text()
    assert "| sinusoid_mlp | metarl_loop |" in table and "memory / higher" in table
