"""Models run functionally: a module defines the computation, a ``dict[str, Tensor]`` holds the weights.

``FunctionalModel`` pairs a module with :func:`torch.func.functional_call` so that
learners only ever handle parameter dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from metarl.types import Params


class MLP(nn.Module):
    """Fully connected network, e.g. the MAML sinusoid regressor 1-40-40-1 ReLU.

    Args:
        sizes: layer widths including input and output, e.g. ``(1, 40, 40, 1)``.
        activation: ``"relu"`` or ``"tanh"`` between hidden layers.
    """

    def __init__(self, sizes: tuple[int, ...], activation: str = "relu"):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {sizes}")
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(acts[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        return self.net(x)

    def body_and_head(self) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]]:
        """``forward`` as ``head(body(x))``: (name prefix, module) of each part."""
        return ("net.", self.net[:-1]), ("net.", self.net[-1:])


def _conv_block(in_channels: int, channels: int) -> nn.Sequential:
    # Batch statistics only (no running averages), as MAML uses them in the inner loop.
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """The four-block convolutional network of MAML / ProtoNets for 28×28 Omniglot.

    Each block: 3×3 conv with ``channels`` filters, batch norm (batch statistics), ReLU, 2×2
    max-pool; 28 → 14 → 7 → 3 → 1. With ``num_classes`` a linear head follows; with 0 the
    network is an encoder returning ``[B, channels]`` embeddings.

    Weights stay in the default (contiguous) layout. With every conv weight channels-last, oneDNN
    ran conv4's forward and backward 1.35-1.7× faster on one CPU core (torch 2.13, batches of 20
    to 360 images), but its float32 gradients (8 filters, one Omniglot task) were 0.2% (conv
    weights) to 2% (first batch-norm bias) away from float64 ones, against under 0.01% in the
    default layout: enough to move a 3-step Reptile loss by 1%.
    """

    def __init__(self, num_classes: int = 5, in_channels: int = 1, channels: int = 64):
        super().__init__()
        blocks = [_conv_block(in_channels, channels)] + [_conv_block(channels, channels) for _ in range(3)]
        self.encoder = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, 28, 28] -> logits [B, num_classes]`` (or embeddings ``[B, channels]``)."""
        return self.head(self.encoder(x))

    def body_and_head(self) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]]:
        """``forward`` as ``head(body(x))``: (name prefix, module) of each part."""
        return ("encoder.", self.encoder), ("head.", self.head)


class FunctionalModel:
    """A module used as a pure function of ``(params, inputs)``.

    Args:
        module: the computation; its own parameters only provide the initial values.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def init_params(self, seed: int) -> Params:
        """Fresh initial parameters from PyTorch's default initialisation under ``seed``."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for m in self.module.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset) and m is not self.module:
                    reset()
        finally:
            torch.random.set_rng_state(gen_state)
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (x,))

    def head_names(self, params: Params) -> list[str]:
        """Names of the last layer's parameters (what ANIL adapts)."""
        last = list(params)[-1].rsplit(".", 1)[0]
        return [k for k in params if k.rsplit(".", 1)[0] == last]

    def split(self, params: Params) -> HeadSplit | None:
        """The model as ``head(features(x))`` with the head made of :meth:`head_names`, or None
        when the module does not say how (it has no ``body_and_head``) or its head is another.

        ANIL adapts only the head, so it can run the body once per task and then take every
        inner step on the head alone: the same values as the whole model, for far less work.
        """
        parts = getattr(self.module, "body_and_head", None)
        if parts is None:
            return None
        (body_prefix, body), (head_prefix, head) = parts()
        body_names = {body_prefix + n: n for n, _ in body.named_parameters()}
        head_names = {head_prefix + n: n for n, _ in head.named_parameters()}
        if sorted(head_names) != sorted(self.head_names(params)) or set(body_names) | set(
            head_names
        ) != set(params):
            return None

        def features(p: Params, x: torch.Tensor) -> torch.Tensor:
            return functional_call(body, {n: p[k] for k, n in body_names.items()}, (x,))

        def head_fn(p: Params, h: torch.Tensor) -> torch.Tensor:
            return functional_call(head, {n: p[k] for k, n in head_names.items()}, (h,))

        return HeadSplit(features, head_fn, list(head_names))


class HeadSplit(NamedTuple):
    """A model as ``head(features(params, x))``: what :meth:`FunctionalModel.split` returns."""

    features: Callable[[Params, torch.Tensor], torch.Tensor]
    """``(params, x) -> h``: everything before the head (reads the body's entries of params)."""
    head: Callable[[Params, torch.Tensor], torch.Tensor]
    """``(params, h) -> output``: the head alone (reads only the entries named in ``names``)."""
    names: list[str]
    """The head's parameter names."""
