"""RL²'s PPO minibatch step with metarl's GRU backward against PyTorch's nn.GRU, in one process.

    metarl bench rl2_update --out experiments/results/rl2_update [--trials 5] [--length 5000]

One minibatch of RL²'s update on the ML1 shapes (39-dimensional observations, 4 actions, GRU
256; trials of 10 episodes x 500 steps, 5 trials per minibatch: 25 tasks in 5 minibatches):
``agents.rl2.ppo_loss`` and its backward, once through ``RecurrentPolicy`` (``metarl.gru``) and
once through the same parameters run by ``nn.GRU`` over the sequence, in alternating repeats so
whatever else the machine does falls on both alike. Reports milliseconds per minibatch step,
their ratio, and the largest gradient difference relative to the parameter's largest gradient.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import gymnasium as gym
import torch

from agents.rl2 import PPOBatch, RL2Config, ppo_loss
from experiments.bench import save_results
from metarl.recurrent import RecurrentPolicy


class _NNGRUPolicy(RecurrentPolicy):
    """The reference: the same policy with the sequence run by ``nn.GRU`` and its autograd."""

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.gru(inputs)
        return self.head(out), self.value(out)[..., 0]


def _batch(policy: RecurrentPolicy, trials: int, length: int, seed: int) -> PPOBatch:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(trials, length, policy.input_dim, generator=gen)
    actions = torch.randn(trials, length, policy.act_dim, generator=gen)
    with torch.no_grad():
        old = policy.log_prob(policy(inputs)[0], actions)
    advantages = torch.randn(trials, length, generator=gen)
    targets = torch.randn(trials, length, generator=gen)
    mask = torch.ones(trials, length)
    mask[-1, length // 2 :] = 0.0  # one shorter trial, padded as pack() does
    return PPOBatch(inputs, actions, old, advantages, targets, mask)


def _step(policy: RecurrentPolicy, batch: PPOBatch, cfg: RL2Config) -> tuple[float, list[torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _ = ppo_loss(policy, batch, cfg)
    loss.backward()
    elapsed = time.perf_counter() - start
    return elapsed, [p.grad.detach().clone() for p in policy.parameters() if p.grad is not None]


def measure(trials: int, length: int, hidden: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Seconds per minibatch step of both paths over ``repeats`` alternating runs."""
    torch.manual_seed(seed)
    space = gym.spaces.Box(-1.0, 1.0, (4,))
    ours = RecurrentPolicy(39, space, hidden)
    reference = _NNGRUPolicy(39, space, hidden)
    reference.load_state_dict(ours.state_dict())
    batch = _batch(ours, trials, length, seed)
    cfg = RL2Config(entropy_coef=5e-6)
    _step(ours, batch, cfg)  # warm-up
    _step(reference, batch, cfg)
    totals = {"ours": 0.0, "reference": 0.0}
    worst = 0.0
    for _ in range(repeats):
        elapsed, grads_ours = _step(ours, batch, cfg)
        totals["ours"] += elapsed
        elapsed, grads_ref = _step(reference, batch, cfg)
        totals["reference"] += elapsed
        for a, b in zip(grads_ours, grads_ref, strict=True):
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    return {"trials": trials, "length": length, "hidden": hidden, "repeats": repeats,
            "threads": torch.get_num_threads(),
            "ours_ms": 1e3 * totals["ours"] / repeats, "reference_ms": 1e3 * totals["reference"] / repeats,
            "ratio": totals["ours"] / totals["reference"], "max_relative_grad_diff": worst}


def _markdown(doc: dict[str, Any]) -> str:
    r = doc["row"]
    return "\n".join([
        "# RL²'s PPO minibatch step: metarl's GRU backward against nn.GRU", "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']}.", "",
        "Milliseconds per minibatch step (`agents.rl2.ppo_loss` and its backward) on "
        f"{r['trials']} trials of {r['length']} steps, GRU {r['hidden']}, {r['threads']} torch "
        f"thread(s), {r['repeats']} alternating repeats; the gradient difference is the largest over "
        "parameters, relative to that parameter's largest gradient entry.", "",
        "| trials × steps | ours ms | nn.GRU ms | ratio | max relative gradient difference |",
        "|---|---:|---:|---:|---:|",
        f"| {r['trials']} × {r['length']} | {r['ours_ms']:.0f} | {r['reference_ms']:.0f} | "
        f"**{r['ratio']:.2f}** | {r['max_relative_grad_diff']:.1e} |", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per minibatch")
    parser.add_argument("--length", type=int, default=5000, help="steps per trial")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a sweep's run: 1)")
    parser.add_argument("--out", default="experiments/results/rl2_update")
    args = parser.parse_args(argv)
    if min(args.trials, args.length, args.hidden, args.repeats, args.threads) < 1:
        parser.error("--trials, --length, --hidden, --repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    row = measure(args.trials, args.length, args.hidden, args.repeats)
    print(json.dumps(row), flush=True)
    save_results(args.out, "metarl bench rl2_update", argv, {"row": row}, _markdown)
    agree = row["max_relative_grad_diff"] < 1e-3
    print(json.dumps({"ratio": round(row["ratio"], 3), "gradients_agree": agree, "out": args.out}))
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
