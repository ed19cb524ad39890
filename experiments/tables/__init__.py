"""Builders of the results tables in ``experiments/results/``, one module per table, run from the
repository root as ``python -m experiments.tables.NAME`` (see ``docs/reproducing.md``)."""
