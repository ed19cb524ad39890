"""Models run functionally: a module defines the computation, a ``dict[str, Tensor]`` holds the weights.

``FunctionalModel`` pairs a module with :func:`torch.func.functional_call` so that
learners only ever handle parameter dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarl.types import Params

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
}
# Matrix products on CPU pick kernels by the number of rows, and rows in a ragged tail can be
# summed in another order. Padding the batch to a multiple of this keeps every row on one path.
# 8 sufficed on AMD EPYC; on Intel AVX-512 with MKL a batch of 8 rows takes another kernel than
# 16 or more (tested in tests/test_policies.py on every machine the suite runs on).
_ROW_BLOCK = 16


def mlp_layer_names(num_layers: int) -> list[str]:
    """The layers' names: ``fc0``, ``fc1``, ... for the hidden layers, ``out`` for the last."""
    return [f"fc{i}" for i in range(num_layers - 1)] + ["out"]


def _check_mlp(sizes: Sequence[int], activation: str) -> None:
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"layer sizes must be positive, got {list(sizes)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
        )


def mlp_forward(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, activation: str
) -> torch.Tensor:
    """The multilayer perceptron's computation, the one both front ends run: ``(weight, bias)``
    per layer, ``activation`` after every layer but the last. ``x [..., in] -> [..., out]``."""
    act = _ACTIVATIONS[activation]
    for weight, bias in layers[:-1]:
        x = act(F.linear(x, weight, bias))
    weight, bias = layers[-1]
    return F.linear(x, weight, bias)


class FunctionalMLP:
    """A multilayer perceptron run on a parameter dict (``fc0.weight``, ..., ``out.bias``).

    Holds only its architecture, so it pickles in a few bytes (the policies and the networks of
    PEARL and the discriminator use it). :class:`MLP` is the same network as a module.

    Args:
        sizes: layer widths including input and output, e.g. ``[obs_dim, 64, 64, act_dim]``.
        activation: ``"relu"`` or ``"tanh"`` between layers.
    """

    def __init__(self, sizes: Sequence[int], activation: str) -> None:
        _check_mlp(sizes, activation)
        self.sizes = list(sizes)
        self.activation = activation
        # Parameter keys built once: the policy forward runs at every environment step.
        self._keys = [(f"{n}.weight", f"{n}.bias") for n in mlp_layer_names(len(self.sizes) - 1)]

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` -> ``[..., out]``."""
        return mlp_forward([(params[w], params[b]) for w, b in self._keys], x, self.activation)

    def rows(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Like calling it, but each row of a ``[B, in]`` batch is independent of the others bit
        for bit (the batch is padded to a multiple of ``_ROW_BLOCK`` rows)."""
        num_rows = x.shape[0]
        pad = (-num_rows) % _ROW_BLOCK
        if x.dim() == 2 and pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        return self(params, x)[:num_rows]


def init_mlp(sizes: Sequence[int], seed: int, output_scale: float) -> Params:
    """Parameters of a :class:`FunctionalMLP`: Glorot-uniform weights and zero biases, the output
    layer scaled by ``output_scale`` (small for policies, so the first actions are near zero)."""
    generator = torch.Generator().manual_seed(seed)
    params: Params = {}
    names = mlp_layer_names(len(sizes) - 1)
    for name, fan_in, fan_out in zip(names, sizes[:-1], sizes[1:], strict=True):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight = (torch.rand(fan_out, fan_in, generator=generator) * 2.0 - 1.0) * bound
        if name == "out":
            weight = weight * output_scale
        params[f"{name}.weight"] = weight
        params[f"{name}.bias"] = torch.zeros(fan_out)
    return params


class _Hidden(nn.Module):
    """The hidden layers of an :class:`MLP` as a module of their own (ANIL's body)."""

    def __init__(self, layers: dict[str, nn.Linear], activation: str) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        for layer in self.children():
            assert isinstance(layer, nn.Linear)
            x = act(layer(x))
        return x


class MLP(nn.Module):
    """The multilayer perceptron as a module, e.g. the MAML sinusoid regressor 1-40-40-1 ReLU, for
    :class:`FunctionalModel`: the same layer names and computation as :class:`FunctionalMLP`, with
    PyTorch's default initialisation of ``nn.Linear`` (as the few-shot papers' code).

    Args:
        sizes: layer widths including input and output, e.g. ``(1, 40, 40, 1)``.
        activation: ``"relu"`` or ``"tanh"`` between layers.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu"):
        super().__init__()
        _check_mlp(sizes, activation)
        self.activation = activation
        self._names = mlp_layer_names(len(sizes) - 1)
        for name, a, b in zip(self._names, sizes[:-1], sizes[1:], strict=True):
            self.add_module(name, nn.Linear(a, b))

    def _layer(self, name: str) -> nn.Linear:
        layer = getattr(self, name)
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        layers = [(self._layer(n).weight, self._layer(n).bias) for n in self._names]
        return mlp_forward(layers, x, self.activation)

    def body_and_head(self) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module]]:
        """``forward`` as ``head(body(x))``: (name prefix, module) of each part."""
        hidden = {n: self._layer(n) for n in self._names[:-1]}
        return ("", _Hidden(hidden, self.activation)), ("out.", self._layer("out"))


def _conv_block(in_channels: int, channels: int) -> nn.Sequential:
    # Batch statistics only (no running averages), as MAML uses them in the inner loop. The
    # max-pool runs before the ReLU: ReLU is monotone, so relu(max(x)) = max(relu(x)) in floating
    # point too, values and gradients alike, and ReLU and its backward touch a quarter of the
    # elements (a MAML meta-step on conv4, 2-core CPU: 0.88 of the time, 0.80 to 0.97 over 8 rounds).
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False),
        nn.MaxPool2d(2),
        nn.ReLU(),
    )


class Conv4(nn.Module):
    """The four-block convolutional network of MAML / ProtoNets for 28×28 Omniglot.

    Each block: 3×3 conv with ``channels`` filters, batch norm (batch statistics), ReLU, 2×2
    max-pool (run as max-pool then ReLU: the same function); 28 → 14 → 7 → 3 → 1. With ``num_classes`` a linear head follows; with 0 the
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
