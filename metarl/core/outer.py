"""The outer loop as PPO (meta.outer_epochs x meta.outer_minibatches Adam steps per iteration),
pure and Ray-free. ProMP (Rothfuss et al. 2019) and RLlib's MAML optimise PPO's clipped surrogate
at the adapted policy with several steps per batch; this is that loop for first-order MAML with
task skipping:

  for each outer step r (epochs x minibatches, one index set of every rollout each):
      theta'_i(theta_r)  for every group i             (`follow`)
      g_r = sum_j grad_{theta'} L^clip_j(theta'_{lead(j)}; batch_j[idx_r])   over the members j
      theta_{r+1} = Adam(theta_r, clip_norm(g_r / n))

L^clip is PPO's loss (`losses.ppo_loss`), its ratio against the log-probabilities the member
recorded while sampling with theta'_0, advantages normalised within each minibatch. theta' follows
theta between steps by one of two rules:

  shift   theta'_r = theta'_0 + (theta_r - theta_0): the first-order assumption dtheta'/dtheta = I,
          no extra gradient (and, with no inner step, theta' = theta: Joint PPO);
  exact   theta'_r = U_i(theta_r): the leader's S inner SGD steps redone from theta_r on its stored
          adaptation batches (as ProMP and RLlib do).

A `Member` holds what one evaluation keeps for the rounds; the same functions serve a worker that
answers one round per call and a learner that runs every round itself (meta.grad_on = learner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metarl.core import meta, ppo
from metarl.core.policy import Params
from metarl.tasks.base import Batch, Task

FOLLOW = ("shift", "exact")


@dataclass(frozen=True)
class Plan:
    """How one iteration's outer steps run (from meta.*)."""

    epochs: int
    minibatches: int
    clip: float
    follow: str
    inner_lr: float
    seed: int
    """the run's seed; with the iteration it fixes every minibatch, wherever it is drawn"""

    @property
    def updates(self) -> int:
        return self.epochs * self.minibatches

    def indices(self, n: int, iteration: int, device: str | torch.device = "cpu") -> list[torch.Tensor]:
        """The index sets of the iteration's outer steps over a rollout of n samples. Every member
        of the iteration uses the same sets (its rollout has the same T x B), drawn from (seed,
        iteration): a worker and the learner draw the same minibatches."""
        return ppo.index_sets(n, self.epochs, self.minibatches, ppo.seeded_generator(self.seed, iteration), device)


@dataclass
class Member:
    """One member's evaluation, kept for the outer steps: its rollout (collected with theta'_0),
    the advantages and returns computed once from what the rollout recorded, and the parameters
    the shift rule moves from."""

    task: Task
    batch: Batch
    adv: torch.Tensor
    ret: torch.Tensor
    theta_prime0: Params
    theta0: Params

    @staticmethod
    def of(task: Task, batch: Batch, theta_prime0: Params, theta0: Params) -> "Member":
        adv, ret = task.advantages(batch)
        return Member(task, batch, adv, ret, meta.detached(theta_prime0), meta.detached(theta0))

    @property
    def samples(self) -> int:
        return self.adv.numel()


def shifted(theta_prime0: Params, theta0: Params, theta: Params) -> Params:
    """theta'_0 + (theta - theta_0), detached."""
    return {k: (theta_prime0[k] + (theta[k].detach() - theta0[k])).detach() for k in theta_prime0}


def readapt(task: Task, model: nn.Module, theta: Params, batches: list[Batch], inner_lr: float) -> Params:
    """The inner SGD steps redone from `theta` on stored adaptation batches (one per step), the
    gradients taken at the new points with the advantages the batches recorded: theta' as a
    function of theta alone (the exact rule)."""
    params = meta.detached(theta)
    for batch in batches:
        grads, _, _ = task.grad(model, meta.detached(params, requires_grad=True), batch)
        params = meta.detached(meta.sgd_step(params, grads, inner_lr))
    return params


def member_grad(model: nn.Module, m: Member, theta_prime: Params, idx: torch.Tensor,
                clip: float) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, dict[str, torch.Tensor]]:
    """grad_{theta'} of PPO's loss on the member's samples idx at theta' (the meta-gradient's part
    from this member at one outer step)."""
    return m.task.ppo_grad(model, meta.detached(theta_prime, requires_grad=True), m.batch, m.adv, m.ret, idx, clip)
