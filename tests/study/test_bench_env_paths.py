"""metarl bench env_paths: the faster env step paths timed against the packages' own code."""

from __future__ import annotations

import json
import sys

import pytest


def test_env_paths_bench_writes_identical_rows_and_puts_metaworld_back(tmp_path):
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    from experiments.bench import env_paths

    out = tmp_path / "env_paths"
    cases = ["halfcheetah-vel (frame_skip 1, observation maml)", "ml1 reach-v3"]
    assert env_paths.main(["--steps", "60", "--repeats", "2", "--out", str(out), "--cases", *cases]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [r["case"] for r in doc["rows"]] == cases
    assert all(r["identical"] and r["steps"] == 120 and r["ratio"] > 0 for r in doc["rows"])
    assert "| **" in out.with_suffix(".md").read_text() and doc["command"].startswith("metarl bench env_paths")
    # the reference's steps borrowed metaworld's own code; ours is back in place afterwards
    from scipy.spatial.transform import Rotation

    import envs

    dist = envs.make("ml1", env_name="reach-v3")
    sim = dist.make_env(dist.train_tasks()[0]).unwrapped._sim
    assert type(sim).touching_object is not SawyerXYZEnv.touching_object
    assert sys.modules[type(sim).__module__].Rotation is not Rotation


def test_env_paths_bench_refuses_bad_arguments(tmp_path):
    from experiments.bench import env_paths

    with pytest.raises(SystemExit):
        env_paths.main(["--steps", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        env_paths.main(["--cases", "no-such-env", "--out", str(tmp_path / "x")])
    assert not list(tmp_path.iterdir())
