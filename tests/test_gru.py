"""metarl.gru against PyTorch's nn.GRU: the same hidden states and the same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarl.gru import _GRUSequence, gru_sequence


def _case(
    dtype: torch.dtype, batch: int, length: int, seed: int = 0
) -> tuple[nn.GRU, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    gru = nn.GRU(6, 5, batch_first=True).to(dtype)
    with torch.no_grad():  # biases away from zero so every gate's gradient is exercised
        for p in gru.parameters():
            p.mul_(3.0)
    x = torch.randn(batch, length, 6, dtype=dtype, requires_grad=True)
    h0 = torch.randn(batch, 5, dtype=dtype, requires_grad=True)
    return gru, x, h0


def _grads(
    out: torch.Tensor, weight: torch.Tensor, leaves: list[torch.Tensor]
) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * weight).sum() + out.pow(2).sum(), leaves))


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (2, 40)])
def test_values_and_gradients_match_nn_gru_in_float64(batch: int, length: int) -> None:
    gru, x, h0 = _case(torch.float64, batch, length)
    leaves = [x, h0, *gru.parameters()]
    weight = torch.randn(batch, length, 5, dtype=torch.float64)
    ours = gru_sequence(gru, x, h0)
    theirs = gru(x, h0[None])[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(ours, weight, leaves), _grads(theirs, weight, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradients_match_finite_differences() -> None:
    gru, x, h0 = _case(torch.float64, 2, 5, seed=1)
    weights = [p.detach().clone().requires_grad_() for p in gru.parameters()]
    assert torch.autograd.gradcheck(_GRUSequence.apply, (x, h0, *weights))


def test_float32_long_sequence_and_default_state() -> None:
    gru, x, _ = _case(torch.float32, 4, 300, seed=2)
    leaves = [x, *gru.parameters()]
    weight = torch.randn(4, 300, 5)
    ours = gru_sequence(gru, x)
    theirs = gru(x)[0]
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(_grads(ours, weight, leaves), _grads(theirs, weight, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_without_grad_is_nn_gru_exactly() -> None:
    gru, x, h0 = _case(torch.float32, 3, 9)
    with torch.no_grad():
        assert torch.equal(gru_sequence(gru, x, h0), gru(x, h0[None])[0])


def test_refuses_a_gru_it_does_not_compute() -> None:
    with pytest.raises(ValueError, match="one-layer"):
        gru_sequence(nn.GRU(3, 4, num_layers=2, batch_first=True), torch.zeros(1, 2, 3))
