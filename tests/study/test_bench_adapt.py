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
            low, high = impls[name]["ms_over_higher_rounds"]
            assert 0 < low <= high
    table = out.with_suffix(".md").read_text()
    assert "| sinusoid_mlp | metarl_loop |" in table and "memory / higher" in table


def test_timing_rounds_call_every_implementation_once_each_starting_one_further_along():
    from experiments.bench.adapt import time_interleaved

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = time_interleaved(fns, repeats=4, warmup=1)
    assert calls == list("abc" "abc" "bca" "cab" "abc")  # warm-up, then rounds 0 to 3
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
