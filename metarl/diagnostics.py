"""Checks on a run's metrics that say, in plain words, when meta-learning is not happening.

The gradient meta-RL agents log ``adapt/inner_kl`` every iteration: the mean KL between the policy
before and after the inner step (:func:`metarl.meta_pg.adaptation_metrics`). When it stays near 0
the inner step does nothing and the run trains a multi-task policy while calling itself MAML; the
classic cause is a small ``inner_lr`` (e.g. garage's Meta-World 1e-4) used on per-task normalised
advantages, where the inner gradient is hundreds of times smaller than on raw returns.
"""

from __future__ import annotations

from typing import Any


class InnerStepWatch:
    """Fires once when ``adapt/inner_kl`` stays below ``threshold`` for ``patience`` iterations in a row.

    The runner prints what :meth:`update` returns as a one-line warning on stderr.

    Args:
        threshold: the KL (nats) under which an inner step counts as a no-op.
        patience: how many consecutive no-op iterations trigger the warning.
    """

    key = "adapt/inner_kl"

    def __init__(self, threshold: float = 1e-6, patience: int = 10) -> None:
        if not threshold > 0 or patience < 1:
            raise ValueError(f"need threshold > 0 and patience >= 1, got {threshold}, {patience}")
        self.threshold, self.patience = threshold, patience
        self.streak = 0
        self.warned = False

    def update(self, iteration: int, metrics: dict[str, Any]) -> str | None:
        """Feeds one iteration's metrics; returns the warning's text the first time it fires, else None."""
        kl = metrics.get(self.key)
        if kl is None:
            return None
        self.streak = self.streak + 1 if kl < self.threshold else 0
        if self.warned or self.streak < self.patience:
            return None
        self.warned = True
        message = (
            f"the inner step has moved the policy by a KL below {self.threshold:g} for "
            f"{self.streak} iterations in a row (iteration {iteration}: {kl:.2g}), so adaptation "
            "does nothing and this run trains a multi-task policy; raise agent.inner_lr, or set "
            "agent.normalize_advantages=false if inner_lr was tuned for raw returns"
        )
        return message
