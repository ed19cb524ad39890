"""Run-directory outputs: JSONL metrics, TensorBoard events, atomic checkpoints, the run lock.

A run directory is owned by one process at a time: :func:`lock_run_dir` takes an advisory lock
(``flock``) on ``RUN_DIR/.lock``, which the kernel releases when the process exits, so a crash
leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from metarl.config import ConfigError

LOCK_NAME = ".lock"
# resolved run dir -> [open lock file descriptor, holders in this process, owning pid]
_held: dict[Path, list[int]] = {}


class CheckpointError(ConfigError):
    """A checkpoint file cannot be read, or does not fit the run's config."""


class RunDirLocked(ConfigError):
    """Another process owns the run directory."""


def _write_temp(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Saves a checkpoint atomically and keeps the one it replaces as ``*.prev.pt`` (unless not
    ``keep_previous``).

    At every moment ``path`` holds a whole checkpoint: the new one is written to a temporary file,
    the old one is linked (or copied) to its ``.prev`` name, then the new one renamed over it.
    """
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = _write_temp(path, buf.getvalue())
    try:
        if keep_previous and path.exists():
            prev = previous_checkpoint(path)
            prev_tmp = f"{tmp}.prev"
            try:
                os.link(path, prev_tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}.prev"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU.

    Raises:
        FileNotFoundError: there is none at ``path``.
        CheckpointError: the file is empty, truncated or not a checkpoint (one line, saying
            whether the previous checkpoint can be restored).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; a run directory holds checkpoint.pt once it has saved one")
    try:
        # Onto the CPU: a run trained on a GPU resumes or evaluates anywhere (agents move state to their device).
        state = torch.load(path, weights_only=False, map_location="cpu")
        reason = None if isinstance(state, dict) and "iteration" in state else f"it holds a {type(state).__name__}"
    except Exception as e:  # torch raises several kinds (EOFError, RuntimeError, UnpicklingError, ...)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}"
    if reason is None:
        return state
    prev = previous_checkpoint(path)
    advice = (f"restore the previous one with `cp {prev} {path}`" if prev.is_file() and prev != path
              else "no previous checkpoint is kept: delete it to resume from scratch, or start a new run")
    raise CheckpointError(f"cannot read checkpoint {path} (empty, truncated or not a checkpoint; {reason}); {advice}")


def lock_run_dir(run_dir: Path) -> Path:
    """Makes this process the owner of ``run_dir`` (re-entrant within the process); returns the key
    to give :func:`unlock_run_dir`.

    Raises:
        RunDirLocked: another process holds it (the message names its PID).
    """
    key = Path(run_dir).resolve()
    held = _held.get(key)
    if held is not None and held[2] == os.getpid():
        held[1] += 1
        return key
    try:
        fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot take the lock of run directory {run_dir} ({e.strerror}); it must be a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirLocked(
            f"run directory {run_dir} is in use by process {owner}; wait for it to end (or stop it: "
            f"kill {owner}) and try again, or pick another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = [fd, 1, os.getpid()]
    return key


def unlock_run_dir(key: Path) -> None:
    """Gives up one hold on a run directory taken by :func:`lock_run_dir`; the last one unlocks it."""
    held = _held.get(key)
    if held is None or held[2] != os.getpid():
        return
    held[1] -= 1
    if held[1] == 0:
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(held[0], 0)
        os.close(held[0])  # closing the descriptor releases the flock


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def _scalar(value: Any) -> bool:
    """Whether a logged value goes to TensorBoard (finite numbers; ``_clean``'s ±1e308 are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) < 1e308


def _lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` of each line of a JSONL log; a half-written last line (a run killed while
    writing) is dropped, a damaged line before it is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path} line {i + 1} is not JSON ({line[:40]!r}); repair or delete that line") from None
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log, without a half-written last line (see :func:`_lines`)."""
    return [record for _, record in _lines(path)]


class MetricsLogger:
    """Appends one JSON line per logged iteration and mirrors scalars to TensorBoard.

    ``metrics.jsonl`` holds only values that depend on the seed, not on wall time, so two runs with one
    seed give identical files; ``time/*`` scalars go to ``timing.jsonl`` and TensorBoard.

    ``resume_from``: the iteration of the checkpoint training continues from (0: none). Lines logged
    after it are dropped (they are recomputed); a run directory without ``tb/`` (e.g. carried to
    another machine without its events) gets its TensorBoard scalars rebuilt from the kept lines.
    """

    def __init__(self, run_dir: Path, resume_from: int = 0):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.timing_path = run_dir / "timing.jsonl"
        kept = [self._truncate(path, resume_from) for path in (self.metrics_path, self.timing_path)]
        from torch.utils.tensorboard import SummaryWriter

        tb = run_dir / "tb"
        purge = resume_from + 1 if tb.exists() else None
        self.writer = SummaryWriter(str(tb), purge_step=purge)
        if purge is None:
            for record in (r for records in kept for r in records):
                for k, v in record.items():
                    if k != "iteration" and _scalar(v):
                        self.writer.add_scalar(k, v, record["iteration"])

    @staticmethod
    def _truncate(path: Path, iteration: int) -> list[dict[str, Any]]:
        """Drops lines logged after ``iteration`` (they are recomputed after a resume); returns the rest."""
        if not path.exists():
            return []
        keep = [(line, r) for line, r in _lines(path) if r["iteration"] <= iteration]
        atomic_write_bytes(path, "".join(line + "\n" for line, _ in keep).encode())
        return [r for _, r in keep]

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

    def sync(self) -> None:
        """Puts the metric and timing lines on disk, so that a checkpoint written after them never
        outlives them (a power loss would otherwise keep the checkpoint and lose its last lines)."""
        for path in (self.metrics_path, self.timing_path):
            if path.exists():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())

    def close(self) -> None:
        self.writer.close()
