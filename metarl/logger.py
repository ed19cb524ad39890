"""Run-directory outputs: JSONL metrics, TensorBoard events, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Saves a checkpoint atomically (temp file, then rename)."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; a run directory holds checkpoint.pt once it has saved one")
    # Onto the CPU: a run trained on a GPU resumes or evaluates anywhere (agents move state to their device).
    return torch.load(path, weights_only=False, map_location="cpu")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsLogger:
    """Appends one JSON line per logged iteration and mirrors scalars to TensorBoard.

    ``metrics.jsonl`` holds only values that depend on the seed, not on wall time, so two runs with one
    seed give identical files; ``time/*`` scalars go to ``timing.jsonl`` and TensorBoard.
    """

    def __init__(self, run_dir: Path, resume_from: int | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.timing_path = run_dir / "timing.jsonl"
        if resume_from is not None:
            for path in (self.metrics_path, self.timing_path):
                self._truncate(path, resume_from)
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_from is None else resume_from + 1
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    @staticmethod
    def _truncate(path: Path, iteration: int) -> None:
        """Drops lines logged after ``iteration`` (they are recomputed after a resume)."""
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        timing = {k: v for k, v in metrics.items() if k.startswith("time/")}
        values = {k: _clean(v) for k, v in metrics.items() if not k.startswith("time/")}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **values}, sort_keys=True) + "\n")
        if timing:
            with open(self.timing_path, "a") as f:
                f.write(json.dumps({"iteration": iteration, **timing}, sort_keys=True) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, iteration)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
