"""The meta-learning math, pure and Ray-free: skip grouping, inner adaptation, meta-gradients.

Notation follows the MAML paper and seed 000: theta is the meta-parameter, theta_prime the
parameters after S inner SGD steps of size alpha (inner_lr) on task i, L_j the loss of task j.

  FOMAML   g_j = grad_{theta'} L_j(theta'_i)                     (no second derivative)
  MAML     (I - alpha H_i(theta_{S-1})) ... (I - alpha H_i(theta_0)) g_j, H_i the Hessian of
           task i's inner loss on its own adaptation batch (Hessian-vector products, chained)
  Reptile  theta - theta'_i

Task skipping (seed 000, section 3): the N tasks are shuffled into ceil(N/k) groups of k; one
member of each group, chosen at random, is its leader and adapts theta'; every member evaluates
that theta'. k = 1 is plain (FO)MAML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metarl.policy import Params
from metarl.tasks.base import Batch, Task


@dataclass(frozen=True)
class Group:
    leader: int
    """Index of the task whose data adapts theta' for the whole group."""
    members: tuple[int, ...]
    """Indices of the tasks that evaluate theta' (the leader included)."""


def make_groups(num_tasks: int, skip: int, rng: np.random.Generator) -> list[Group]:
    """Shuffle tasks 0..N-1 into ceil(N/k) groups of k (the last one smaller when k does not
    divide N) and pick a uniformly random leader inside each group."""
    if not 1 <= skip <= num_tasks:
        raise ValueError(f"skip {skip} does not fit {num_tasks} tasks")
    order = rng.permutation(num_tasks)
    groups = []
    for start in range(0, num_tasks, skip):
        members = tuple(int(i) for i in order[start : start + skip])
        leader = members[int(rng.integers(len(members)))]
        groups.append(Group(leader, members))
    return groups


def group_sizes(num_tasks: int, skip: int) -> list[int]:
    """Sizes of the groups make_groups builds (independent of the shuffle)."""
    return [min(skip, num_tasks - s) for s in range(0, num_tasks, skip)]


def detached(params: Params, requires_grad: bool = False) -> Params:
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in params.items()}


def sgd_step(params: Params, grads: tuple[torch.Tensor, ...], lr: float) -> Params:
    return {k: p - lr * g for (k, p), g in zip(params.items(), grads)}


@dataclass
class Adaptation:
    """The result of an inner loop: theta', and the points and batches a MAML backward needs."""

    theta_prime: Params
    thetas: list[Params]
    """theta_0 = theta, ..., theta_{S-1}: where each inner gradient was taken."""
    batches: list[Batch]
    """The adaptation batch of each inner step (collected with theta_s)."""
    losses: list[float]
    seconds_sample: float
    seconds_grad: float


def adapt(task: Task, model: nn.Module, theta: Params, inner_lr: float, inner_steps: int) -> Adaptation:
    """S plain SGD steps of size alpha, each on a fresh batch sampled with the current parameters.
    The result is detached: first-order and Reptile never differentiate through it, and MAML
    re-derives what it needs with `maml_backward`."""
    params = detached(theta)
    thetas, batches, losses = [], [], []
    t_sample = t_grad = 0.0
    for _ in range(inner_steps):
        t0 = time.perf_counter()
        batch = task.sample(model, params)
        t1 = time.perf_counter()
        grads, loss, _ = task.grad(model, detached(params, requires_grad=True), batch)
        t_grad += time.perf_counter() - t1
        t_sample += t1 - t0
        thetas.append(params)
        batches.append(batch)
        losses.append(loss)
        params = detached(sgd_step(params, grads, inner_lr))
    return Adaptation(params, thetas, batches, losses, t_sample, t_grad)


def loss_grad(task: Task, model: nn.Module, params: Params, batch: Batch) -> tuple[tuple[torch.Tensor, ...], float, dict]:
    """grad_params L(params; batch) at the parameters that collected `batch`: the first-order
    meta-gradient when params = theta'."""
    return task.grad(model, detached(params, requires_grad=True), batch)


def maml_backward(task: Task, model: nn.Module, adaptation: Adaptation, inner_lr: float,
                  v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Pull a gradient v taken at theta' back to theta through the S inner SGD steps:
    v <- v - alpha * H_s v for s = S-1 .. 0, with H_s the Hessian of the inner loss at theta_s on
    batch_s. One Hessian-vector product (double backward) per inner step; v may be the sum of a
    whole group's gradients, so the cost is one backward per group, not per member."""
    v = tuple(x.detach() for x in v)
    for theta_s, batch_s in zip(reversed(adaptation.thetas), reversed(adaptation.batches)):
        p = detached(theta_s, requires_grad=True)
        loss, _ = task.loss(model, p, batch_s)
        g = torch.autograd.grad(loss, tuple(p.values()), create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
        hv = torch.autograd.grad(dot, tuple(p.values()), allow_unused=True)
        v = tuple(vi - inner_lr * (h.detach() if h is not None else torch.zeros_like(vi)) for vi, h in zip(v, hv))
    return v


def reptile_direction(theta: Params, theta_prime: Params) -> tuple[torch.Tensor, ...]:
    """theta - theta': fed to the outer optimiser like a gradient (Nichol et al. 2018)."""
    return tuple((theta[k] - theta_prime[k]).detach() for k in theta)
