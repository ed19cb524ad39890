"""Benchmarks, run from the repository root as ``metarl bench NAME`` or
``python -m experiments.bench.NAME``; the last line each prints is one JSON object."""
