"""State-value baselines for policy-gradient advantages.

* :class:`LinearFeatureBaseline`: the baseline of the MAML paper (Finn et al. 2017, §5.3, taken
  from Duan et al. 2016, "Benchmarking Deep RL for Continuous Control", arXiv 1604.06778,
  appendix): a linear function of ``[o, o², t, t², t³, 1]`` with ``o`` the observation clipped to
  ``[-10, 10]`` and ``t = step / 100``, fit separately for each task by regularised least squares
  on that task's discounted returns. It holds no state between calls.
* :class:`ValueNetworkBaseline`: a small MLP on ``[o, t, t², t³]`` shared by all tasks, regressed
  on the returns with a few full-batch Adam steps per call. It carries its weights and optimiser
  across iterations (checkpointed through :meth:`state_dict`).

Both expose ``fit_values(obs, next_obs, returns, mask) -> (values, next_values)``, each
``[N, E, T]``: the values of each step's observation and of the observation after it.
"""

from __future__ import annotations

from typing import Any

import torch

OBS_CLIP = 10.0
TIME_SCALE = 100.0
_MAX_REG_TRIES = 5


def time_features(num_steps: int, offset: int = 0) -> torch.Tensor:
    """``[T, 3]`` the features ``(t, t², t³)`` with ``t = (step + offset) / 100``."""
    t = (torch.arange(num_steps, dtype=torch.float64) + offset) / TIME_SCALE
    return torch.stack([t, t**2, t**3], dim=-1)


def linear_features(obs: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``[..., T, obs_dim]`` -> float64 ``[..., T, 2 obs_dim + 4]`` features ``[o, o², t, t², t³, 1]``.

    Args:
        obs: observations, the step index running along the second-to-last axis.
        offset: added to the step index (1 for the observation *after* each step).
    """
    o = obs.to(torch.float64).clamp(-OBS_CLIP, OBS_CLIP)
    t = time_features(obs.shape[-2], offset).expand(*obs.shape[:-1], 3)
    ones = torch.ones(*obs.shape[:-1], 1, dtype=torch.float64)
    return torch.cat([o, o.pow(2), t, ones], dim=-1)


class LinearFeatureBaseline:
    """Per-task ridge regression of returns on :func:`linear_features`.

    Args:
        reg_coeff: ridge coefficient added to the diagonal of ``XᵀX``; multiplied by 10 (up to 4
            times) for a task whose solution is not finite.
    """

    def __init__(self, reg_coeff: float = 1e-5) -> None:
        if reg_coeff <= 0:
            raise ValueError(f"reg_coeff={reg_coeff} must be > 0")
        self.reg_coeff = float(reg_coeff)

    def fit(self, obs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Least-squares weights of each task from its alive steps.

        Args:
            obs: ``[N, E, T, obs_dim]``.
            returns: ``[N, E, T]`` regression targets.
            mask: ``[N, E, T]`` 1.0 while alive (only alive steps enter the fit).

        Returns:
            ``[N, 2 obs_dim + 4]`` float64 weights.
        """
        m = mask.to(torch.float64).unsqueeze(-1)
        features = (linear_features(obs) * m).flatten(1, 2)  # [N, E*T, K]
        targets = (returns.to(torch.float64) * mask).flatten(1, 2).unsqueeze(-1)
        gram = features.transpose(1, 2) @ features
        rhs = features.transpose(1, 2) @ targets
        eye = torch.eye(gram.shape[-1], dtype=torch.float64)
        weights = torch.full_like(rhs, float("nan"))
        reg = self.reg_coeff
        for _ in range(_MAX_REG_TRIES):
            bad = ~torch.isfinite(weights).all(dim=(1, 2))
            if not bad.any():
                break
            # Cholesky: the regularised Gram matrix is symmetric positive definite; LU
            # (torch.linalg.solve) fails inside some oneMKL builds on these ill-conditioned
            # matrices (Ant's zero contact features) with an invalid-pivot error.
            factor, info = torch.linalg.cholesky_ex(gram[bad] + reg * eye)
            solved = torch.cholesky_solve(rhs[bad], factor)
            solved[info != 0] = float("nan")  # not positive definite at this ridge: try a larger one
            weights[bad] = solved
            reg *= 10.0
        return weights.squeeze(-1)

    @staticmethod
    def predict(weights: torch.Tensor, obs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``weights [N, K]``, ``obs [N, E, T, obs_dim]`` -> ``[N, E, T]`` values (dtype of obs)."""
        values = (linear_features(obs, offset) * weights[:, None, None, :]).sum(-1)
        return values.to(obs.dtype)

    def fit_values(
        self, obs: torch.Tensor, next_obs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fits on ``returns`` and returns the values of ``obs`` and of ``next_obs`` (``[N, E, T]`` each)."""
        weights = self.fit(obs, returns, mask)
        return self.predict(weights, obs), self.predict(weights, next_obs, offset=1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class ValueNetworkBaseline:
    """An MLP value function on ``[o, t, t², t³]`` shared by every task (tanh hidden layers).

    Args:
        obs_dim: size of the observation.
        hidden_sizes: widths of the hidden layers.
        lr: Adam step size.
        num_steps: full-batch Adam steps per :meth:`fit_values` call.
        seed: seeds the initial weights.
    """

    def __init__(
        self,
        obs_dim: int,
        hidden_sizes: tuple[int, ...] = (32, 32),
        lr: float = 1e-2,
        num_steps: int = 20,
        seed: int = 0,
    ) -> None:
        if num_steps < 1 or lr <= 0:
            raise ValueError(f"need num_steps >= 1 and lr > 0, got num_steps={num_steps}, lr={lr}")
        generator = torch.Generator().manual_seed(seed)
        layers: list[torch.nn.Module] = []
        sizes = [obs_dim + 3, *hidden_sizes]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Tanh()]
        layers.append(torch.nn.Linear(sizes[-1], 1))
        self.net = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if p.dim() > 1 else 0.0))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.num_steps = num_steps

    def _inputs(self, obs: torch.Tensor, offset: int) -> torch.Tensor:
        o = obs.clamp(-OBS_CLIP, OBS_CLIP)
        t = time_features(obs.shape[-2], offset).to(obs.dtype).expand(*obs.shape[:-1], 3)
        return torch.cat([o, t], dim=-1)

    def fit_values(
        self, obs: torch.Tensor, next_obs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Regresses on ``returns`` (masked MSE), then returns the values of ``obs`` and ``next_obs``."""
        inputs = self._inputs(obs, 0)
        count = mask.sum().clamp(min=1.0)
        for _ in range(self.num_steps):
            loss = ((self.net(inputs).squeeze(-1) - returns).pow(2) * mask).sum() / count
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            values = self.net(inputs).squeeze(-1)
            next_values = self.net(self._inputs(next_obs, 1)).squeeze(-1)
        return values, next_values

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])


Baseline = LinearFeatureBaseline | ValueNetworkBaseline


def make_baseline(kind: str, obs_dim: int, seed: int) -> Baseline:
    """``"linear"`` (:class:`LinearFeatureBaseline`) or ``"mlp"`` (:class:`ValueNetworkBaseline`)."""
    if kind == "linear":
        return LinearFeatureBaseline()
    if kind == "mlp":
        return ValueNetworkBaseline(obs_dim, seed=seed)
    raise ValueError(f"baseline={kind!r} is unknown; use 'linear' or 'mlp'")
