"""The errors that cross module boundaries, in one place.

* :class:`ConfigError`: a configuration key or value is wrong (the CLI prints it in one line and
  exits with code 2).
* :class:`NonFiniteLossError`: a loss became NaN or Inf; raised by every learner before any
  parameter changes (the CLI names the last good checkpoint).

Errors that belong to one subsystem stay beside it: :class:`metarl.rollout.sampler.WorkerError`
(it must survive pickling between worker processes) and the stop signals of
:mod:`metarl.stopping`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is valid."""


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; parameters were left as they were before the step."""
