"""Shared fixtures: RNG state restored after every test, and the shared data directory."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Every test starts from the same seeded global RNGs, whatever ran before it (imports and
    module fixtures draw too, so an unseeded draw would change with the selection of tests);
    tests may seed freely, and the global RNGs are put back as they were afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


@pytest.fixture
def shared_data_dir() -> Path:
    """``../shared/data`` beside the project root (read-only data the project cannot download)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data directory not found at {SHARED_DATA}; CI places ../shared beside the clone")
    return SHARED_DATA


@pytest.fixture
def cli():
    """Runs ``metarl ARGS...`` in-process; returns its stdout and fails the test on a non-zero exit."""
    from metarl.cli import main

    def run(*args: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
        assert code == 0, err.getvalue()
        return out.getvalue()

    return run
