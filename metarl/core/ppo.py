"""PPO's update, in one place: epochs of minibatch steps on one rollout under the clipped
surrogate (Schulman et al. 2017; the loss itself is `losses.ppo_loss`, taken by a task's
`ppo_grad`). Four learners share it:

- the held-out fine-tuner (`metarl.experiments.finetune`): one task, its own parameters, Adam or SGD;
- the outer loop (`metarl.distributed.learner`, `metarl.distributed.iteration`): the members' evaluation rollouts,
  gradients taken at theta' (which follows theta between steps), summed over members, one Adam
  step on theta per minibatch (ProMP's and RLlib MAML's outer loop);
- Joint PPO: the outer loop with no inner step (theta' = theta);
- the inner loop with meta.inner_epochs x inner_minibatches > 1 (`metarl.core.meta.ppo_steps`): SGD
  steps of alpha on the leader's adaptation rollout.

Pure: no Ray, no config. What differs between them is how a minibatch's gradient is taken
and where it is applied; `run_updates` takes both as functions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from metarl.core.seeds import key_seed

Grads = tuple[torch.Tensor, ...]
STAT_KEYS = ("pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac")


def finite(*tensors: torch.Tensor) -> bool:
    """Every value of every tensor is finite (one host sync, whatever the device)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def index_sets(n: int, epochs: int, minibatches: int, gen: torch.Generator,
               device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The sample indices of every update of one PPO pass over n samples: `epochs` random
    permutations, each cut into `minibatches` near-equal parts, in update order."""
    return [idx.to(device) for _ in range(epochs) for idx in torch.randperm(n, generator=gen).tensor_split(minibatches)]


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers (run seed, iteration, ...), the same on every process:
    the outer loop's minibatches do not depend on which worker or learner draws them."""
    return torch.Generator().manual_seed(key_seed(*keys))


def mean_stats(parts: list[dict[str, float]], prefix: str = "outer/") -> dict[str, float]:
    """The mean of each PPO statistic (STAT_KEYS) over a list of per-update, per-member stats."""
    out = {}
    for k in STAT_KEYS:
        vals = [p[k] for p in parts if k in p]
        if vals:
            out[f"{prefix}{k}"] = float(sum(vals) / len(vals))
    return out


def run_updates(indices: list[torch.Tensor], grad_at: Callable[[torch.Tensor], tuple[Grads, torch.Tensor, dict]],
                apply: Callable[[Grads], None]) -> tuple[float, dict[str, float]]:
    """One PPO pass: for each index set, take the minibatch gradient (`grad_at(idx)` -> grads, loss,
    stats as tensors) and apply it (`apply(grads)`). A non-finite loss or gradient stops the pass
    before it is applied (returns a nan loss; what was applied before stays). Returns the mean loss
    and the mean of each stat over the updates."""
    total: torch.Tensor | float = 0.0
    sums: dict[str, torch.Tensor] = {}
    for idx in indices:
        grads, loss, parts = grad_at(idx)
        if not finite(loss, *grads):
            return math.nan, {}
        apply(grads)
        total = total + loss
        for k, x in parts.items():
            sums[k] = sums[k] + x if k in sums else x
    n = max(len(indices), 1)
    return float(total) / n, {k: float(x) / n for k, x in sums.items()}
