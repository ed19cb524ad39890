"""Process-wide settings that make the CPU meta-updates fast.

glibc's ``malloc`` serves every allocation above its mmap threshold (a few MiB at most) with a
fresh ``mmap`` and gives it back with ``munmap`` when freed. A MAML-TRPO update on a paper-sized
batch (40 tasks × 20 episodes × 200 steps) allocates and frees activations of 60+ MiB hundreds
of times, so every one of them is faulted in page by page and zeroed by the kernel: on a 2-core
machine that doubled the time of the conjugate-gradient step (18.8 s -> 10.6 s, 10
Hessian-vector products through the inner step) and of the inner step itself.
:func:`tune_allocator` raises the mmap and trim thresholds so freed blocks stay in the heap and
are reused. It is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Literal

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest value glibc accepts for either threshold.
_THRESHOLD = 2**31 - 1

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keeps large freed blocks in glibc's heap for reuse; returns whether the setting took.

    Idempotent and cheap, so every entry point may call it. The settings are process-wide and
    do not change any result, only how memory is recycled.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    name = ctypes.util.find_library("c")
    if name is None:
        return _tuned
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _tuned
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
    return _tuned


def on_device(batch: Any, device: torch.device | str | None) -> Any:
    """A NamedTuple of tensors with every tensor on ``device`` (the same batch when ``None``)."""
    return batch if device is None else type(batch)(*(t.to(device) for t in batch))


def check_device(device: str) -> None:
    """Raises ``ValueError`` unless ``device`` names a torch device this machine has."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this machine has no CUDA device; use device='cpu'")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")


def task_batching(distribution: Any, device: torch.device | str) -> Literal["vmap", "loop"]:
    """How ``batch="auto"`` maps a learner over tasks: ``"vmap"`` or ``"loop"``.

    On CUDA, vmap turns a meta-batch into one launch per operation instead of one per task, which
    is what keeps the GPU busy (Omniglot conv4, meta-batch 32: the loop left an H100 waiting on
    kernel launches). On the CPU the distribution's own measured choice stands (conv4: the loop).
    """
    if torch.device(device).type == "cuda":
        return "vmap"
    return "loop" if getattr(distribution, "batch_mode", "vmap") == "loop" else "vmap"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (the architecture where that is unreadable)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def machine() -> str:
    """One line naming the machine a figure was taken on: CPU, cores, torch, threads and GPUs."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
            + "".join(f", GPU {name}" for name in gpus))


def code_version() -> str:
    """The commit of the git checkout this ``metarl`` is imported from, ``+modified`` when tracked
    files under ``metarl/``, ``envs/`` or ``agents/`` differ from it; ``"unknown"`` when the
    package does not sit at the top of a checkout (an installed wheel) or git cannot answer.

    Recorded beside the machine in a run's ``machines.jsonl``, so a run continued under other
    code says so.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=5)
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return "unknown"  # e.g. installed into a virtual environment inside some checkout
        commit = git("rev-parse", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no", "--", "metarl", "envs", "agents")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+modified" if modified else "")
