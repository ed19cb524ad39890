"""Benchmarks, run from the repository root as ``metarl bench NAME`` or
``python -m experiments.bench.NAME``; the last line each prints is one JSON object."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_results(
    out: str | Path, command: str, argv: list[str] | None, fields: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Writes ``OUT.json`` (the command line, the machine and ``fields``) and ``OUT.md`` from it.

    ``command`` is how the benchmark is started (``"metarl bench env_paths"``); the arguments it
    was given (``argv``, or the process's own) are appended. Returns the document.
    """
    from metarl.runtime import machine

    line = " ".join([command, *(sys.argv[1:] if argv is None else argv)])
    document = {"command": line, "machine": machine(), **fields}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(document, indent=1))
    path.with_suffix(".md").write_text(markdown(document))
    return document
