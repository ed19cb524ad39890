"""A learned inner optimizer: a coordinate-wise LSTM replaces SGD in the adaptation core.

One small LSTM is applied to every parameter coordinate independently (Andrychowicz et al. 2016,
"Learning to learn by gradient descent by gradient descent"; for few-shot learning, the
meta-learner LSTM of Ravi & Larochelle 2017). Per coordinate, per inner step:

* inputs: the gradient ``g`` after the log-magnitude / sign preprocessing of Andrychowicz et al.
  (appendix A, ``p = 10``) and, optionally, the inner loss preprocessed the same way;
* the hidden and cell states of that coordinate, carried from the previous inner step;
* output: the update ``Δ = α (w_h · h + b + w_g · g)`` added to the parameter, ``α`` a fixed
  scale (the learner's ``inner_lr``). The direct path ``w_g · g`` from the raw gradient means
  ``w_h = 0, b = 0, w_g = −1`` is exactly SGD with rate ``α`` (``w_g = −r`` with ``α = 1``: rate
  ``r``); the rule starts there, with small random LSTM weights. Measuring the output in units of
  ``α`` keeps Adam's outer steps (``outer_lr``) small relative to the SGD rule it starts from.

:class:`LearnedOptimizerLearner` meta-learns the initial parameters and the rule together with
Adam on the query loss after ``adapt_steps`` inner steps, backpropagating through the whole
unroll (truncated backpropagation through time, truncated at ``adapt_steps``). It serves the
few-shot distributions of :class:`~metarl.fewshot.maml.GradientLearner` (sinusoid, Omniglot).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from envs.base import Task
from metarl.adaptation import (
    Params,
    UpdateRule,
    adapt,
    map_task_chunks,
    meta_backward,
    task_objective,
)
from metarl.config import require_at_least
from metarl.errors import NonFiniteLossError
from metarl.fewshot.maml import EpisodicConfig, trainable_params
from metarl.runtime import on_device, task_batching

LSTMState = tuple[tuple[torch.Tensor, torch.Tensor], ...]
DEFAULT_EVAL_CHUNK = 100


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s input scaling: ``x [...] -> [..., 2]``.

    ``(log|x| / p, sign(x))`` where ``|x| >= e^{-p}``, else ``(−1, e^p · x)``: both features stay
    of order one for gradients spanning many orders of magnitude.
    """
    threshold = math.exp(-p)
    large = x.abs() >= threshold
    log_magnitude = torch.log(x.abs().clamp(min=threshold)) / p
    first = torch.where(large, log_magnitude, -torch.ones_like(x))
    second = torch.where(large, torch.sign(x), math.exp(p) * x)
    return torch.stack([first, second], dim=-1)


def init_rule_params(
    hidden_size: int, num_layers: int, num_inputs: int, init_range: float, seed: int
) -> Params:
    """Meta-parameters of the coordinate-wise LSTM, initialised to SGD (at the rule's scale).

    LSTM weights are uniform in ``±init_range`` (forget-gate bias 1); the output weight on the
    hidden state and the output bias are zero and the direct gradient weight is ``−1``.

    Returns:
        ``lstm.{l}.weight_ih [4H, in]``, ``lstm.{l}.weight_hh [4H, H]``, ``lstm.{l}.bias [4H]``
        per layer, ``out.weight [H]``, ``out.bias []``, ``out.grad_weight []``.
    """
    generator = torch.Generator().manual_seed(int(np.random.default_rng([seed, 2]).integers(2**31)))

    def uniform(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1) * init_range

    params: Params = {}
    for layer in range(num_layers):
        width = num_inputs if layer == 0 else hidden_size
        params[f"lstm.{layer}.weight_ih"] = uniform(4 * hidden_size, width)
        params[f"lstm.{layer}.weight_hh"] = uniform(4 * hidden_size, hidden_size)
        bias = torch.zeros(4 * hidden_size)
        bias[hidden_size : 2 * hidden_size] = 1.0  # forget gate: remember by default
        params[f"lstm.{layer}.bias"] = bias
    params["out.weight"] = torch.zeros(hidden_size)
    params["out.bias"] = torch.zeros(())
    params["out.grad_weight"] = torch.tensor(-1.0)
    return params


def _lstm_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step for ``N`` coordinates, coordinates along the last axis: ``x [in, N]``,
    ``h, c [H, N]``.

    With the coordinates last, each gate is a contiguous block of rows, so the elementwise gate
    arithmetic runs on contiguous memory (about 3 times faster on a CPU than gates taken as column
    slices of an ``[N, 4H]`` product).
    """
    gates = torch.addmm(torch.addmm(bias.unsqueeze(1), w_ih, x), w_hh, h)
    hidden = h.shape[0]
    input_forget, g, o = gates.split([2 * hidden, hidden, hidden])  # split, not slices: one
    i, f = torch.sigmoid(input_forget).chunk(2)  # gradient concatenation, no zero-filled buffers
    g, o = torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


class CoordinateLSTM:
    """The coordinate-wise LSTM update rule, an :class:`~metarl.adaptation.UpdateRule`.

    Args:
        rule_params: from :func:`init_rule_params`; gradients reach them through :func:`adapt`.
        scale: the fixed output scale ``α``; with the initial ``rule_params`` the rule is SGD at
            rate ``α``.
        p: the preprocessing constant (10 in Andrychowicz et al.).
        loss_input: also feed the preprocessed inner loss to every coordinate.
    """

    def __init__(self, rule_params: Params, scale: float, p: float = 10.0, loss_input: bool = True):
        self.rule_params, self.scale, self.p, self.loss_input = rule_params, scale, p, loss_input
        self.num_layers = sum(k.endswith(".weight_ih") for k in rule_params)

    def __call__(
        self, params: Params, grads: Params, loss: torch.Tensor, step: int, state: LSTMState | None
    ) -> tuple[Params, LSTMState]:
        """One inner step on all coordinates of ``params`` at once; ``state`` holds ``[H, N]``."""
        w = self.rule_params
        flat = torch.cat([grads[k].reshape(-1) for k in params])  # [N]
        x = preprocess(flat, self.p).T  # [2, N]
        if self.loss_input:
            x = torch.cat([x, preprocess(loss, self.p).reshape(2, 1).expand(2, flat.shape[0])])
        if state is None:
            zeros = flat.new_zeros(w["out.weight"].shape[0], flat.shape[0])
            state = tuple((zeros, zeros) for _ in range(self.num_layers))
        new_state = []
        for layer, (h, c) in enumerate(state):
            h, c = _lstm_cell(
                x,
                h,
                c,
                w[f"lstm.{layer}.weight_ih"],
                w[f"lstm.{layer}.weight_hh"],
                w[f"lstm.{layer}.bias"],
            )
            new_state.append((h, c))
            x = h
        delta = self.scale * ((w["out.weight"] @ x + w["out.bias"]) + w["out.grad_weight"] * flat)
        new, offset = {}, 0
        for k, v in params.items():
            new[k] = v + delta[offset : offset + v.numel()].view_as(v)
            offset += v.numel()
        return new, tuple(new_state)


@dataclass(frozen=True)
class LearnedOptimizerConfig(EpisodicConfig):
    inner_lr: float = 0.01
    """The SGD rate the rule starts from, and the fixed scale α of its output."""
    adapt_steps: int = 5
    """Unroll length in meta-training; the meta-gradient flows through all of it (truncated BPTT)."""
    eval_adapt_steps: tuple[int, ...] = (0, 1, 10)
    """Inner steps after which held-out tasks are scored (may exceed adapt_steps)."""
    outer_lr: float = 0.001
    """Adam step size for the initial parameters and the rule."""
    hidden_size: int = 20
    """LSTM units per layer (20 in Andrychowicz et al.)."""
    num_layers: int = 2
    """LSTM layers (2 in Andrychowicz et al.)."""
    loss_input: bool = True
    """Feed the preprocessed inner loss to the LSTM besides the gradient."""
    preprocess_p: float = 10.0
    """The constant p of the gradient preprocessing (10 in Andrychowicz et al.)."""
    init_range: float = 0.1
    """LSTM weights start uniform in ±init_range."""
    first_order: bool = False
    """Treat inner gradients (and losses) as constants in the meta-gradient."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("hidden_size", "num_layers"))
        if self.preprocess_p <= 0 or self.init_range < 0:
            raise ValueError(
                f"need preprocess_p > 0 (10 in the paper) and init_range >= 0, got "
                f"{self.preprocess_p} and {self.init_range}"
            )


class LearnedOptimizerLearner:
    """Meta-learns an initialisation and a coordinate-wise LSTM inner optimizer.

    Args:
        config: the learner's settings.
        distribution: the few-shot task distribution (provides data, model and loss).
        seed: seeds the initial parameters, the LSTM weights and the learner's data stream.
    """

    Config = LearnedOptimizerConfig
    family = "optimization"
    adaptation_unit = "gradient step"
    scores_tasks_independently = False

    def __init__(self, config: LearnedOptimizerConfig, distribution: Any, seed: int):
        self.config = config
        self.distribution = distribution
        self.model = distribution.make_model()
        self.device = torch.device(config.device)
        self.params = trainable_params(self.model, seed, self.device)
        num_inputs = 4 if config.loss_input else 2
        self.rule_params: Params = {
            k: v.to(self.device).requires_grad_()
            for k, v in init_rule_params(
                config.hidden_size, config.num_layers, num_inputs, config.init_range, seed
            ).items()
        }
        self.batch = (
            task_batching(distribution, config.device) if config.batch == "auto" else config.batch
        )
        trainable = list(self.params.values()) + list(self.rule_params.values())
        self.optimizer = torch.optim.Adam(trainable, lr=config.outer_lr)
        self.rng = np.random.default_rng([seed, 1])

    def loss_fn(self, params: Params, data: Any) -> torch.Tensor:
        """Inner and outer loss of one task: ``data`` holds ``x [P, ...]`` and targets ``[P, ...]``."""
        return self.distribution.loss(self.model(params, data.x), data)

    def rule(self, detached: bool = False) -> UpdateRule:
        """The current update rule (on detached meta-parameters when ``detached``)."""
        params = (
            {k: v.detach() for k, v in self.rule_params.items()} if detached else self.rule_params
        )
        cfg = self.config
        return CoordinateLSTM(params, cfg.inner_lr, cfg.preprocess_p, cfg.loss_input)

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns ``train/*`` metrics."""
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_queries, self.rng)
        support, query = on_device(support, self.device), on_device(query, self.device)
        one_task = task_objective(
            self.loss_fn, cfg.adapt_steps, first_order=cfg.first_order, update=self.rule()
        )
        self.optimizer.zero_grad(set_to_none=True)
        # Task by task with loop batching: one task's unroll graph in memory at a time.
        losses = meta_backward(
            one_task, (self.params,), (support, query), self.batch, cfg.backward_chunk or None
        )
        loss = losses.mean()
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"meta-loss is {loss.item()} after a {cfg.adapt_steps}-step learned-rule unroll; "
                "parameters unchanged (lower outer_lr or adapt_steps)"
            )
        trainable = [*self.params.items(), *self.rule_params.items()]
        bad = [k for k, v in trainable if v.grad is not None and not torch.isfinite(v.grad).all()]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"meta-gradient of {bad} is not finite (meta-loss {loss.item()}); parameters "
                "unchanged (lower outer_lr or adapt_steps)"
            )
        self.optimizer.step()
        return {
            "train/query_loss": loss.item(),
            "train/rule_direct_rate": -cfg.inner_lr * self.rule_params["out.grad_weight"].item(),
            "train/rule_lstm_weight_norm": self.rule_params["out.weight"].norm().item(),
        }

    def adapt(self, task: Task, data: Any, steps: int | None = None) -> Params:
        """Parameters adapted to one task on its support ``data`` (``x [P, ...]``, targets)."""
        steps = self.config.adapt_steps if steps is None else steps
        data = on_device(data, self.device)
        params = {k: v.detach() for k, v in self.params.items()}
        return adapt(self.loss_fn, params, data, steps, update=self.rule(detached=True))

    def _scores(
        self, params: Params, support: Any, query: Any, steps: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and accuracy ``[len(steps)]`` of one task, one unroll for all counts."""
        rule, snapshots = self.rule(detached=True), {0: params}

        def recording(
            params: Params, grads: Params, loss: torch.Tensor, step: int, state: Any
        ) -> tuple[Params, Any]:
            new, state = rule(params, grads, loss, step, state)
            if step + 1 in steps:
                snapshots[step + 1] = new
            return new, state

        adapt(self.loss_fn, params, support, max(steps), update=recording)
        losses, accs = [], []
        for target in steps:
            pred = self.model(snapshots[target], query.x)
            losses.append(self.distribution.loss(pred, query))
            acc = self.distribution.accuracy(pred, query)
            accs.append(acc if acc is not None else torch.tensor(float("nan"), device=pred.device))
        return torch.stack(losses), torch.stack(accs)

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Scores held-out ``tasks`` after each count in ``eval_adapt_steps`` of learned-rule steps.

        Counts beyond ``adapt_steps`` run the rule past the unroll it was trained on.

        Returns:
            ``{"adaptation_steps": [...], "loss": [num_tasks, num_steps], "accuracy": ... or None}``.
        """
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_eval_queries, rng)
        steps = sorted(set(cfg.eval_adapt_steps))
        params = {k: v.detach() for k, v in self.params.items()}
        chunk = int(getattr(self.distribution, "eval_chunk_size", DEFAULT_EVAL_CHUNK))
        loss, acc = map_task_chunks(
            lambda s1, q1: self._scores(params, s1, q1, steps),
            (),
            (support, query),
            self.batch,
            chunk,
            self.device,
        )
        return {
            "adaptation_steps": steps,
            "loss": loss.numpy(),
            "accuracy": None if torch.isnan(acc).all() else acc.numpy(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "rule_params": {k: v.detach().cpu().clone() for k, v in self.rule_params.items()},
            # A snapshot: Adam's own state_dict shares its moment tensors with the live optimizer.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
            for k, v in self.rule_params.items():
                v.copy_(state["rule_params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        """Holds no worker processes or files: nothing to release."""
