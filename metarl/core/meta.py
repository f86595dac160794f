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

from metarl.core import ppo
from metarl.core.algorithms import Group
from metarl.core.policy import Params
from metarl.tasks.base import Batch, StackedBatch, Task, TaskStack


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


@dataclass(frozen=True)
class InnerPPO:
    """meta.inner_epochs x meta.inner_minibatches: each inner step's batch is used for that many
    SGD steps of alpha under PPO's clipped surrogate (ratio against the sampling log-probabilities,
    advantages from the recorded values, normalised per minibatch), instead of one actor-critic
    step on the whole batch. First-order only: theta' is a function of theta that no gradient
    flows through (fomaml with the shift rule, reptile)."""

    epochs: int
    minibatches: int
    clip: float

    @property
    def updates(self) -> int:
        return self.epochs * self.minibatches


def adapt(task: Task, model: nn.Module, theta: Params, inner_lr: float, inner_steps: int,
          inner: InnerPPO | None = None) -> Adaptation:
    """S inner steps, each on a fresh batch sampled with the current parameters (or all on the
    first one, for a task whose data are a fixed K-shot support set): one plain SGD step of size
    alpha (the MAML form), or with `inner` several clipped SGD steps on minibatches of the batch.
    The result is detached: first-order and Reptile never differentiate through it, and MAML
    re-derives what it needs with `maml_backward`."""
    params = detached(theta)
    thetas, batches, losses = [], [], []
    t_sample = t_grad = 0.0
    for _ in range(inner_steps):
        t0 = time.perf_counter()
        batch = task.sample(model, params) if task.fresh_data_each_step or not batches else batches[0]
        t1 = time.perf_counter()
        thetas.append(params)
        if inner is None:
            grads, loss, _ = task.grad(model, detached(params, requires_grad=True), batch)
            params = detached(sgd_step(params, grads, inner_lr))
        else:
            params, loss = ppo_steps(task, model, params, batch, inner_lr, inner)
        t_grad += time.perf_counter() - t1
        t_sample += t1 - t0
        batches.append(batch)
        losses.append(loss)
    return Adaptation(params, thetas, batches, losses, t_sample, t_grad)


def ppo_steps(task: Task, model: nn.Module, params: Params, batch: Batch, inner_lr: float,
              inner: InnerPPO) -> tuple[Params, float]:
    """`inner.updates` clipped SGD steps of alpha on minibatches of one batch: metarl.core.ppo's
    pass (index sets drawn from the task's generator, which the worker reseeds per iteration; a non-finite
    minibatch stops it as it stops every PPO learner). Returns theta' and the mean minibatch loss."""
    adv, ret = task.advantages(batch)
    # minibatches from the task's own generator (seeded per task, reseeded per iteration by the worker):
    # a fixed-seed run draws the same ones wherever it runs; torch's global RNG is seeded by no one
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=getattr(task, "gen", None))))
    theta_prime = [params]

    def grad_at(idx: torch.Tensor):
        return task.ppo_grad(model, detached(theta_prime[0], requires_grad=True), batch, adv, ret, idx, inner.clip)

    def apply(grads) -> None:
        theta_prime[0] = detached(sgd_step(theta_prime[0], grads, inner_lr))

    loss, _ = ppo.run_updates(ppo.index_sets(adv.numel(), inner.epochs, inner.minibatches, gen, adv.device),
                              grad_at, apply)
    return theta_prime[0], loss


def distinct_batches(batches: list) -> list:
    """The batches an adaptation collected, each once (K-shot tasks reuse one for every step)."""
    return [b for n, b in enumerate(batches) if all(b is not c for c in batches[:n])]


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
    return pull_back(lambda p, batch: task.loss(model, p, batch)[0], adaptation.thetas, adaptation.batches,
                     inner_lr, [None] * (len(adaptation.thetas) - 1) + [v])


def minus_hvp(p: Params, g: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], inner_lr: float,
              keep_graph: bool = False) -> tuple[torch.Tensor, ...]:
    """v - alpha H v, with g = grad of the loss at p taken with create_graph (H v by double backward;
    keep_graph: g's graph stays for more products)."""
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), tuple(p.values()), retain_graph=keep_graph,
                             allow_unused=True)
    return tuple(vi - inner_lr * (h.detach() if h is not None else torch.zeros_like(vi)) for vi, h in zip(v, hv))


def pull_back(loss_at, thetas: list[Params], batches: list, inner_lr: float,
              v_steps: list[tuple[torch.Tensor, ...] | None]) -> tuple[torch.Tensor, ...]:
    """The chained Hessian-vector products behind every MAML correction. v_steps[s] is a gradient
    taken at theta_{s+1} (None: none there); walking s = S-1 .. 0 it joins the chain where its point
    is reached and the sum is pulled through step s: v <- (I - alpha H_s)(v + v_steps[s]), H_s the
    Hessian of loss_at(., batches[s]) at thetas[s]. One double backward per step."""
    acc = None
    for s in reversed(range(len(thetas))):
        if v_steps[s] is not None:
            add = tuple(x.detach() for x in v_steps[s])
            acc = add if acc is None else tuple(a + b for a, b in zip(acc, add))
        if acc is None:
            continue
        p = detached(thetas[s], requires_grad=True)
        g = torch.autograd.grad(loss_at(p, batches[s]), tuple(p.values()), create_graph=True)
        acc = minus_hvp(p, g, acc, inner_lr)
    return acc


def reptile_direction(theta: Params, theta_prime: Params) -> tuple[torch.Tensor, ...]:
    """theta - theta': fed to the outer optimiser like a gradient (Nichol et al. 2018)."""
    return tuple((theta[k] - theta_prime[k]).detach() for k in theta)


# ------------------------------------------------------------------------------------------
# the same math for many groups at once, on a TaskStack (families whose tasks are cheap enough
# that one call per task would cost more than the task itself: sinusoids, 2D navigation)


def stack_params(theta: Params, n: int) -> Params:
    """n detached copies of theta along a new first dimension (one row per task)."""
    return {k: v.detach().unsqueeze(0).expand(n, *v.shape).clone() for k, v in theta.items()}


def take_rows(params: Params, rows: list[int]) -> Params:
    index = torch.tensor(rows, dtype=torch.long)
    return {k: v.detach().index_select(0, index) for k, v in params.items()}


def stacked_grads(stack: TaskStack, model: nn.Module, params: Params,
                  batch: StackedBatch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Every row's gradient of its own loss at its own parameters (rows x parameter shape), and
    the rows' losses: one backward pass of the summed losses."""
    p = detached(params, requires_grad=True)
    losses = stack.losses(model, p, batch)
    return torch.autograd.grad(losses.sum(), tuple(p.values())), losses.detach()


@dataclass
class StackedAdaptation:
    """`Adaptation` for a stack of leaders: row r of every tensor is leader r."""

    theta_prime: Params
    thetas: list[Params]
    batches: list[StackedBatch]
    losses: list[list[float]]
    """losses[s][r]: leader r's inner loss at step s"""


def adapt_stacked(stack: TaskStack, model: nn.Module, theta: Params, rows: list[int], inner_lr: float,
                  inner_steps: int, replay: list[StackedBatch] | None = None) -> StackedAdaptation:
    """`adapt` for tasks stack.tasks[rows], all from the same theta, each step on fresh data (or
    on replay[s], the batches of an earlier adaptation: theta' as a function of theta alone)."""
    params = stack_params(theta, len(rows))
    thetas, batches, losses = [], [], []
    fresh = stack.tasks[0].fresh_data_each_step
    for s in range(inner_steps):
        if replay is not None:
            batch = replay[s]
        else:
            batch = stack.sample(model, params, rows) if fresh or not batches else batches[0]
        grads, loss = stacked_grads(stack, model, params, batch)
        thetas.append(params)
        batches.append(batch)
        losses.append(loss.tolist())
        params = detached(sgd_step(params, grads, inner_lr))
    return StackedAdaptation(params, thetas, batches, losses)


def maml_backward_stacked(stack: TaskStack, model: nn.Module, adaptation: StackedAdaptation, inner_lr: float,
                          v: tuple[torch.Tensor, ...] | list[tuple[torch.Tensor, ...] | None]) -> tuple[torch.Tensor, ...]:
    """`maml_backward` for every leader at once: v holds one row per leader (its group's summed
    gradient at theta'); each chained Hessian-vector product is one double backward for all groups.
    v may also be a list of S gradients (or None), entry s taken at theta_{s+1} (meta.step_loss =
    mean): each joins the chain where its point is reached, v <- (I - alpha H_s)(v + v_s)."""
    steps = list(v) if isinstance(v, list) else [None] * (len(adaptation.thetas) - 1) + [v]
    return pull_back(lambda p, batch: stack.losses(model, p, batch).sum(), adaptation.thetas, adaptation.batches,
                     inner_lr, steps)


def _row_norms(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.sqrt(sum(g.detach().double().pow(2).flatten(1).sum(1) for g in grads))


def groups_step(stack: TaskStack, model: nn.Module, theta: Params, groups: list[Group], algo: str,
                inner_lr: float, inner_steps: int, step_loss: str = "last",
                keep: list | None = None) -> tuple[tuple[torch.Tensor, ...], dict[int, dict], dict[int, dict]]:
    """One meta-iteration's work for `groups` (indices into stack.tasks), all in one pass:
    leaders adapt, members evaluate their leader's theta', and the meta-gradients are summed
    (MAML: each group's sum pulled back through its leader's inner steps; Reptile: theta - theta').
    step_loss = mean: the members' loss is the mean over the points after each inner step,
    theta_1 .. theta_S (the multi-step loss of Antoniou et al. 2019), not theta_S alone.
    Returns the summed meta-gradient (theta's shapes) and per-task statistics for the leaders
    (adapt) and members (eval), as the task-by-task worker calls report them. `keep` (a list): the
    leaders' adaptation, the members' leader rows and their batch are appended to it, what a
    TrustRegion is built from (meta.outer = trpo)."""
    t0 = time.perf_counter()
    leaders = [g.leader for g in groups]
    a = adapt_stacked(stack, model, theta, leaders, inner_lr, inner_steps)
    t_adapt = time.perf_counter() - t0
    adapt_stats = {}
    distinct = distinct_batches(a.batches)
    for r, i in enumerate(leaders):
        rows = [b.row_stats(r) for b in distinct]
        adapt_stats[i] = {"env_steps": sum(x["env_steps"] for x in rows), "frames": sum(x["frames"] for x in rows),
                          "returns": [v for x in rows for v in x["returns"]], "reward_sum": sum(x["reward_sum"] for x in rows),
                          "inner_losses": [step[r] for step in a.losses], "seconds": t_adapt / len(leaders)}
    if algo == "reptile":
        direction = tuple(theta[k].detach().unsqueeze(0) - a.theta_prime[k] for k in theta)
        norms = _row_norms(direction).tolist()
        for r, i in enumerate(leaders):
            adapt_stats[i].update(finite=bool(np.isfinite(norms[r])), grad_norm=norms[r])
        return tuple(d.sum(0) for d in direction), adapt_stats, {}
    t1 = time.perf_counter()
    members = [j for g in groups for j in g.members]
    lead_row = [r for r, g in enumerate(groups) for _ in g.members]
    points = [a.theta_prime] if step_loss == "last" else a.thetas[1:] + [a.theta_prime]
    batch = stack.sample(model, take_rows(a.theta_prime, lead_row), members)  # theta' first: its stats are reported
    per_point = []  # (member-row gradients, losses) at each point, theta' last
    for n, point in enumerate(points):
        at = take_rows(point, lead_row)
        data = batch if n == len(points) - 1 or not stack.tasks[0].fresh_data_each_step else stack.sample(model, at, members)
        per_point.append(stacked_grads(stack, model, at, data))
    grads, losses = per_point[-1]
    point_norms = [_row_norms(g) for g, _ in per_point]
    norms, losses = point_norms[-1].tolist(), losses.tolist()
    finite = torch.stack([torch.isfinite(n) for n in point_norms]).all(0)
    eval_stats = {j: {**batch.row_stats(m), "loss": losses[m], "grad_norm": norms[m], "finite": bool(finite[m]),
                      "seconds": (time.perf_counter() - t1) / len(members)} for m, j in enumerate(members)}
    if keep is not None:
        keep.extend([a, lead_row, batch])
    w = 1.0 / len(points)
    if algo == "maml":
        index = torch.tensor(lead_row, dtype=torch.long)
        per_group = [tuple(w * torch.zeros_like(a.theta_prime[k]).index_add_(0, index, x) for k, x in zip(theta, g))
                     for g, _ in per_point]
        grads = maml_backward_stacked(stack, model, a, inner_lr,
                                      per_group if step_loss == "mean" else per_group[-1])
    elif len(points) > 1:
        grads = tuple(w * sum(xs) for xs in zip(*(g for g, _ in per_point)))
    return tuple(g.sum(0) for g in grads), adapt_stats, eval_stats


# ------------------------------------------------------------------------------------------
# the KL-constrained outer step (meta.outer = trpo), the MAML paper's outer optimiser for RL:
# maximise the members' post-update surrogate subject to mean KL(pi_theta'_old || pi_theta') <= delta,
# theta' = U(theta) the inner steps on the leaders' stored adaptation batches. The KL's Hessian in
# theta is J^T F J with J = dtheta'/dtheta = (I - alpha H_{S-1}) ... (I - alpha H_0) (maml; identity
# for fomaml) and F the post-update policy's Fisher information. metarl.core.trust solves and searches;
# a worker keeps one TrustRegion per iteration and answers its products and objective values.


class TrustRegion:
    """One iteration's groups, kept for the outer step: the leaders' adaptation (points and
    batches), which leader each member row follows, the members' evaluation batch and the action
    distributions that collected it. Curvature products use a fixed random `fraction` of each
    row's samples (TRPO's subsampled Fisher), drawn from that row's seed (`row_seeds`: one per
    leader, one per member; by default 0, 1, ...), so they do not depend on which worker holds the
    row; values and gradients use all samples."""

    def __init__(self, stack: TaskStack, model: nn.Module, adaptation: StackedAdaptation, lead_row: list[int],
                 batch: StackedBatch, second_order: bool, inner_lr: float, fraction: float = 1.0,
                 row_seeds: tuple[list[int], list[int]] | None = None):
        self.stack, self.model, self.a, self.batch = stack, model, adaptation, batch
        self.index = torch.tensor(lead_row, dtype=torch.long)
        self.second_order, self.inner_lr = second_order, inner_lr
        with torch.no_grad():
            self.old = tuple(x.detach() for x in stack.distribution(model, take_rows(adaptation.theta_prime, lead_row), batch))
        n_leaders = next(iter(adaptation.theta_prime.values())).shape[0]
        self.fraction = fraction
        self.row_seeds = row_seeds or (list(range(n_leaders)), list(range(n_leaders, n_leaders + len(lead_row))))
        self._hvps = self._fisher = None

    def _columns(self, batch: StackedBatch, seeds: list[int]) -> StackedBatch:
        if self.fraction >= 1.0:
            return batch
        n = next(iter(batch.data.values())).shape[1]
        k = max(2, int(round(n * self.fraction)))
        index = [torch.randperm(n, generator=torch.Generator().manual_seed(int(s) % 2**63))[:k].sort().values
                 for s in seeds]
        return batch.columns(torch.stack(index))

    def _build(self) -> None:
        """The graphs every product reuses: each inner step's gradient with its graph (for H_s v),
        and the post-update policy's forward pass (for F u)."""
        self._hvps = []
        if self.second_order:
            leaders = self.row_seeds[0]
            subs = {id(b): self._columns(b, [x + 7919 * step for x in leaders])
                    for step, b in enumerate(distinct_batches(self.a.batches))}
            for point, batch in zip(self.a.thetas, self.a.batches):
                p = detached(point, requires_grad=True)
                g = torch.autograd.grad(self.stack.losses(self.model, p, subs[id(batch)]).sum(), tuple(p.values()),
                                        create_graph=True)
                self._hvps.append((p, g))
        members = take_rows(self.a.theta_prime, self.index.tolist())
        self._fisher = self.stack.fisher(self.model, members, self._columns(self.batch, self.row_seeds[1]))

    def _through_steps(self, v: tuple[torch.Tensor, ...], order) -> tuple[torch.Tensor, ...]:
        for s in order:
            v = minus_hvp(*self._hvps[s], v, self.inner_lr, keep_graph=True)
        return v

    def fvp(self, v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """sum over member rows of J_g^T F_j J_g v (theta's shapes): the KL's Hessian-vector product,
        summed (the caller averages over every worker's members)."""
        if self._fisher is None:
            self._build()
        n_leaders = next(iter(self.a.theta_prime.values())).shape[0]
        rows = tuple(x.detach().unsqueeze(0).expand(n_leaders, *x.shape) for x in v)
        if self.second_order:
            rows = self._through_steps(rows, range(len(self._hvps)))
        per_member = self._fisher(tuple(x.index_select(0, self.index) for x in rows))
        back = tuple(torch.zeros_like(x).index_add_(0, self.index, f) for x, f in zip(rows, per_member))
        if self.second_order:
            back = self._through_steps(back, reversed(range(len(self._hvps))))
        return tuple(x.sum(0).detach() for x in back)

    @torch.no_grad()
    def objective(self, theta: Params) -> tuple[float, float]:
        """(sum of the members' surrogate losses, sum of their mean KLs) with theta' re-derived from
        `theta` by the same inner steps on the stored adaptation batches."""
        with torch.enable_grad():
            n_leaders = next(iter(self.a.theta_prime.values())).shape[0]  # with replay, rows only count
            params = adapt_stacked(self.stack, self.model, theta, list(range(n_leaders)), self.inner_lr,
                                   len(self.a.batches), replay=self.a.batches).theta_prime
        surrogate, kl = self.stack.surrogate_kl(self.model, take_rows(params, self.index.tolist()), self.batch, self.old)
        return float(surrogate.sum()), float(kl.sum())
