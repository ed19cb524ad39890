"""A single-layer GRU over whole sequences whose backward is one loop of one product per step.

PyTorch's CPU GRU records every time step in the autograd graph, so the backward of a trial of
``L`` steps runs two small matrix products per step (the gradient with respect to the previous
hidden state and the one with respect to the recurrent weights) plus the bookkeeping of about
ten autograd nodes. Here the forward runs PyTorch's own GRU without a graph, the gates are
recomputed for all steps at once from the hidden states it returned, and the backward carries
only the hidden state's gradient step by step; the weight and input gradients are then single
products over all ``B * L`` steps. RL²'s PPO update (trials of 5,000 steps, batches of a few
trials) spends most of its time in this backward. On CUDA, cuDNN's sequence kernels are used
as they are.

The arithmetic is PyTorch's GRU (gate order reset, update, new; ``n = tanh(W_in x + b_in +
r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``); results agree with ``nn.GRU`` to float
rounding, not bit for bit (tests/test_gru.py checks values and gradients against it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _gates(
    x_proj: torch.Tensor, h_prev: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``r, z, n, hh_n`` for all steps from the input projection and the previous hidden states."""
    hh = torch.addmm(b_hh, h_prev.reshape(-1, h_prev.shape[-1]), w_hh.t()).view(
        *h_prev.shape[:-1], -1
    )
    xr, xz, xn = x_proj.chunk(3, dim=-1)
    hr, hz, hn = hh.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return r, z, n, hn


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        h0: torch.Tensor,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor,
        b_hh: torch.Tensor,
    ) -> torch.Tensor:
        out, _ = torch._VF.gru(  # type: ignore[attr-defined]
            x, h0[None], [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False, False, True
        )
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, h0, w_ih, w_hh, b_ih, b_hh, out = ctx.saved_tensors
        batch, length, hidden = out.shape
        # Time-major from here on, so that each step's slices are contiguous.
        h_prev = torch.cat([h0[None], out.transpose(0, 1)[:-1]], dim=0)  # [L, B, H]
        x_tm = x.transpose(0, 1).reshape(length * batch, -1)
        x_proj = torch.addmm(b_ih, x_tm, w_ih.t()).view(length, batch, -1)
        r, z, n, hn = _gates(x_proj, h_prev, w_hh, b_hh)
        # Each gate's pre-activation gradient is dh_t times a factor known before the loop.
        dn_pre = (1.0 - z) * (1.0 - n * n)
        factors = torch.stack(
            [dn_pre * hn * r * (1.0 - r), (h_prev - n) * z * (1.0 - z), dn_pre * r], 2
        )
        del r, n, hn
        grad_tm = grad_out.transpose(0, 1).contiguous()
        dh_all = torch.empty_like(grad_tm)  # [L, B, H]: the gradient reaching each h_t
        d_hh = torch.empty_like(factors)  # [L, B, 3, H]: ... and each step's recurrent product
        dh_all[-1] = grad_tm[-1]
        for t in range(length - 1, 0, -1):
            dh = dh_all[t]
            torch.mul(factors[t], dh[:, None], out=d_hh[t])
            prev = torch.addcmul(
                torch.mm(d_hh[t].view(batch, -1), w_hh), dh, z[t], out=dh_all[t - 1]
            )
            prev.add_(grad_tm[t - 1])
        torch.mul(factors[0], dh_all[0][:, None], out=d_hh[0])
        grad_h0 = torch.addcmul(torch.mm(d_hh[0].view(batch, -1), w_hh), dh_all[0], z[0])
        d_hh_flat = d_hh.view(length * batch, 3 * hidden)
        d_x_proj = d_hh.clone()
        d_x_proj[:, :, 2] = dh_all * dn_pre
        d_x_flat = d_x_proj.view(length * batch, 3 * hidden)
        grad_w_hh = d_hh_flat.t().mm(h_prev.view(length * batch, hidden))
        grad_w_ih = d_x_flat.t().mm(x_tm)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = d_x_flat.mm(w_ih).view(length, batch, -1).transpose(0, 1)
        return grad_x, grad_h0, grad_w_ih, grad_w_hh, d_x_flat.sum(0), d_hh_flat.sum(0)


def gru_sequence(gru: nn.GRU, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All hidden states of a one-layer, batch-first ``nn.GRU`` over ``x [B, L, in]`` -> ``[B, L, H]``.

    Same values as ``gru(x, h0)[0]``; with gradients required on the CPU it takes the backward
    above (on CUDA, cuDNN's own sequence backward is kept).
    """
    if gru.num_layers != 1 or not gru.batch_first or gru.bidirectional or not gru.bias:
        raise ValueError(
            "gru_sequence takes a one-layer, batch-first, unidirectional GRU with biases"
        )
    if h0 is None:
        h0 = x.new_zeros(x.shape[0], gru.hidden_size)
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    if not torch.is_grad_enabled() or x.device.type != "cpu" or x.shape[1] == 0:
        return gru(x, h0[None])[0]
    return _GRUSequence.apply(x, h0, *weights)
