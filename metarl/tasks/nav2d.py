"""2D point navigation (MAML paper, section 5.3) as a task family.

A point starts at the origin and moves by max_action * clip(a, -1, 1) per coordinate every step
(actions in normalised units, as rllab's `normalize` wrapper gives the paper's policy, so each move
is clipped to [-0.1, 0.1]); the reward is minus the distance to the goal after the move, and an
episode ends after `horizon` steps or when both coordinates are within `goal_tolerance` of it. The agent observes only its position, so it must find the goal from
rewards. The task name fixes the goal: `goal-0017` draws it uniformly from the goal square with an
RNG seeded by the index alone; `make_task`'s seed drives the policy's action noise.

The policy is a diagonal Gaussian: a ReLU MLP gives the mean, a state-independent log-std is part
of theta. The loss is REINFORCE (metarl.core.losses.gaussian_pg_loss) with advantages from GAE over a
linear feature baseline fitted to the batch's own returns (as in the paper's rllab setup). The
advantages depend only on the batch, never on the parameters being scored, so the loss is a pure
function of (params, batch) and its Hessian is the surrogate's, as in MAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metarl.core.families import TRAITS
from metarl.core.config import ConfigError, LossConfig, Nav2dConfig
from metarl.core.losses import gaussian_log_prob as log_prob, gaussian_pg_loss
from metarl.core.policy import Params, linear
from metarl.tasks.base import Batch, StackedBatch, Task, TaskFamily, TaskStack

NAME_RE = re.compile(r"^goal-(\d+)$")
_SALT = 0x2D_9A7


def task_index(name: str) -> int:
    """`goal-0017` -> 17; anything else is a ConfigError naming the expected form."""
    m = NAME_RE.match(name)
    if m is None:
        raise ConfigError(f"nav2d task name '{name}' is not of the form goal-<index>, e.g. goal-0017")
    return int(m.group(1))


def task_names(first: int, count: int) -> tuple[str, ...]:
    return tuple(f"goal-{i:04d}" for i in range(first, first + count))


def goal_of(index: int, cfg: Nav2dConfig) -> tuple[float, float]:
    rng = np.random.default_rng([_SALT, index])
    lo, hi = cfg.goal_range
    gx, gy = rng.uniform(lo, hi, size=2)
    return float(gx), float(gy)


def gaussian_policy(params: Params, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy as a pure function of its parameters: obs N x 2 -> (mean action N x 2, log-std 2).
    ReLU layers `layers.<i>` with the last one linear; the log-std does not depend on the state.
    With per-task stacked parameters (metarl.core.policy.linear): obs n x N x 2 -> (n x N x 2, n x 1 x 2)."""
    n = sum(1 for k in params if k.endswith(".weight"))
    h = obs
    for i in range(n):
        h = linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
        if i < n - 1:
            h = torch.relu(h)
    log_std = params["log_std"]
    return h, log_std if log_std.dim() == 1 else log_std.unsqueeze(1)


class GaussianPolicy(nn.Module):
    """Holds the parameters `gaussian_policy` reads (PyTorch's default Linear initialisation)."""

    def __init__(self, hidden: tuple[int, ...], init_log_std: float):
        super().__init__()
        dims = (2, *hidden, 2)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.log_std = nn.Parameter(torch.full((2,), float(init_log_std)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_policy(dict(self.named_parameters()), obs)


def linear_baseline(obs: torch.Tensor, t: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                    reg: float = 1e-5) -> torch.Tensor:
    """Least-squares fit of the returns on [s, s^2, t, t^2, t^3, 1] over the live steps (Duan et al.
    2016's feature baseline); returns its predictions for every step. obs: T x B x 2, t: T x B."""
    t = t[..., None]
    feats = torch.cat([obs, obs.pow(2), t, t.pow(2), t.pow(3), torch.ones_like(t)], -1)
    f, r = feats[mask], returns[mask]
    a = f.T @ f + reg * torch.eye(f.shape[1], dtype=f.dtype)
    coef = torch.linalg.solve(a, f.T @ r)
    return feats @ coef


def discounted(x: torch.Tensor, factor: float) -> torch.Tensor:
    """y_t = sum_{l >= t} factor^(l - t) x_l over T x ..., as one triangular matrix product. Steps
    after an episode ends carry x = 0 here (frozen episodes), so no episode boundary is needed."""
    T = x.shape[0]
    powers = torch.arange(T, dtype=x.dtype)
    exponent = powers[None, :] - powers[:, None]
    weights = torch.where(exponent >= 0, factor ** exponent.clamp(min=0), torch.zeros((), dtype=x.dtype))
    return (weights @ x.reshape(T, -1)).reshape(x.shape)


def advantages(rewards: torch.Tensor, values: torch.Tensor, alive: torch.Tensor, gamma: float,
               lam: float) -> torch.Tensor:
    """GAE over T x B with episodes that freeze when they end (alive[t] = 1 while running):
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, zero once ended."""
    values = values * alive
    next_values = torch.cat([values[1:], torch.zeros_like(values[:1])])
    deltas = (rewards + gamma * next_values - values) * alive
    return discounted(deltas, gamma * lam)


class Nav2dTask(Task):
    def __init__(self, name: str, seed: int, cfg: Nav2dConfig, loss_cfg: LossConfig):
        self.name = name
        self.cfg, self.loss_cfg = cfg, loss_cfg
        self.goal = torch.tensor(goal_of(task_index(name), cfg), dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def rollout(self, params: Params, episodes: int) -> Batch:
        """`episodes` episodes in parallel for up to T = horizon steps (finished ones freeze), in the
        parameters' dtype; advantages are GAE over the linear baseline."""
        c, T, B = self.cfg, self.cfg.horizon, episodes
        dtype = next(iter(params.values())).dtype
        goal = self.goal.to(dtype)
        noise = torch.randn(T, B, 2, generator=self.gen, dtype=torch.float64).to(dtype)
        pos = torch.zeros(B, 2, dtype=dtype)
        live = torch.ones(B, dtype=dtype)
        obs, actions = torch.zeros(T, B, 2, dtype=dtype), torch.zeros(T, B, 2, dtype=dtype)
        rewards, alive = torch.zeros(T, B, dtype=dtype), torch.zeros(T, B, dtype=dtype)
        for t in range(T):
            mean, log_std = gaussian_policy(params, pos)
            a = mean + log_std.exp() * noise[t]
            obs[t], actions[t], alive[t] = pos, a, live
            pos = pos + c.max_action * a.clamp(-1.0, 1.0) * live[:, None]
            offset = pos - goal
            rewards[t] = -offset.norm(dim=-1) * live
            live = live * (offset.abs().max(-1).values >= c.goal_tolerance)
            if not live.any():
                break
        mask = alive > 0
        steps = torch.arange(T, dtype=dtype)[:, None].expand(T, B) / T
        values = linear_baseline(obs, steps, discounted(rewards, self.loss_cfg.gamma), mask)
        adv = advantages(rewards, values, alive, self.loss_cfg.gamma, self.loss_cfg.gae_lambda)
        ep_returns = rewards.sum(0)
        n = int(mask.sum())
        return Batch({"obs": obs[mask], "actions": actions[mask], "advantages": adv[mask]}, env_steps=n,
                     episode_returns=ep_returns.tolist(), reward_sum=float(ep_returns.sum()), frames=n)

    def sample(self, model: nn.Module, params: Params) -> Batch:
        return self.rollout(params, self.cfg.episodes)

    def reseed(self, seed: int, redraw: bool = False) -> None:
        self.gen.manual_seed(int(seed))
        if redraw:  # a fresh goal from the same stream, before any action noise is drawn
            lo, hi = self.cfg.goal_range
            self.goal = lo + (hi - lo) * torch.rand(2, generator=self.gen, dtype=torch.float64)

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = next(iter(params.values())).dtype
        mean, log_std = gaussian_policy(params, batch.data["obs"].to(dtype))
        pg = gaussian_pg_loss(mean, log_std, batch.data["actions"].to(dtype), batch.data["advantages"].to(dtype),
                              self.loss_cfg.norm_adv)
        entropy = log_std.sum()  # + a constant: the Gaussian's entropy per step
        loss = pg - self.loss_cfg.ent_coef * entropy
        return loss, {"pg_loss": float(pg.detach()), "std": float(log_std.detach().exp().mean())}


class Nav2dStack(TaskStack):
    """n tasks x B episodes stepped together (the policy runs once per step over all of them).
    Row r's action noise comes from its own task's RNG, so a row is the rollout its task's
    sample() gives; rows keep every step (T x B per row) with a mask of the live ones, and the
    baseline, advantage normalisation and loss are taken over each row's live steps alone."""

    @torch.no_grad()
    def sample(self, model: nn.Module, params: Params, rows: list[int]) -> StackedBatch:
        tasks = [self.tasks[r] for r in rows]
        c, lc = tasks[0].cfg, tasks[0].loss_cfg
        T, B, n = c.horizon, c.episodes, len(rows)
        dtype = next(iter(params.values())).dtype
        goal = torch.stack([t.goal for t in tasks]).to(dtype)[:, None, :]
        noise = torch.stack([torch.randn(T, B, 2, generator=t.gen, dtype=torch.float64) for t in tasks], 1).to(dtype)
        pos = torch.zeros(n, B, 2, dtype=dtype)
        live = torch.ones(n, B, dtype=dtype)
        obs, actions = torch.zeros(T, n, B, 2, dtype=dtype), torch.zeros(T, n, B, 2, dtype=dtype)
        rewards, alive = torch.zeros(T, n, B, dtype=dtype), torch.zeros(T, n, B, dtype=dtype)
        for t in range(T):
            mean, log_std = gaussian_policy(params, pos)
            a = mean + log_std.exp() * noise[t]
            obs[t], actions[t], alive[t] = pos, a, live
            pos = pos + c.max_action * a.clamp(-1.0, 1.0) * live[..., None]
            offset = pos - goal
            rewards[t] = -offset.norm(dim=-1) * live
            live = live * (offset.abs().max(-1).values >= c.goal_tolerance)
            if not live.any():
                break
        steps = (torch.arange(T, dtype=dtype) / T)[:, None, None].expand(T, n, B)
        returns = discounted(rewards, lc.gamma)
        t_ = steps[..., None]
        feats = torch.cat([obs, obs.pow(2), t_, t_.pow(2), t_.pow(3), torch.ones_like(t_)], -1)  # T x n x B x F
        f = feats.transpose(0, 1).reshape(n, T * B, -1)
        m = alive.transpose(0, 1).reshape(n, T * B)
        r = returns.transpose(0, 1).reshape(n, T * B)
        gram = f.transpose(1, 2) @ (f * m[..., None]) + 1e-5 * torch.eye(f.shape[-1], dtype=dtype)
        coef = torch.linalg.solve(gram, (f.transpose(1, 2) @ (r * m)[..., None]))
        values = (f @ coef).squeeze(-1).reshape(n, T, B).transpose(0, 1)
        adv = advantages(rewards, values, alive, lc.gamma, lc.gae_lambda)
        flat = lambda x: x.transpose(0, 1).reshape(n, T * B, *x.shape[3:])  # noqa: E731
        ep_returns = rewards.sum(0)  # n x B
        counts = m.sum(1).to(torch.long).tolist()
        return StackedBatch({"obs": flat(obs), "actions": flat(actions), "advantages": flat(adv), "mask": m},
                            env_steps=counts, episode_returns=ep_returns.tolist(),
                            reward_sum=ep_returns.sum(1).tolist())

    def _data(self, params: Params, batch: StackedBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The batch in the parameters' dtype, its live-step counts and its advantages (normalised
        over each row's live steps when loss.norm_adv)."""
        dtype = next(iter(params.values())).dtype
        d = {k: v.to(dtype) for k, v in batch.data.items()}
        m, adv = d["mask"], d["advantages"]
        count = m.sum(1)
        if self.tasks[0].loss_cfg.norm_adv:
            mu = (adv * m).sum(1, keepdim=True) / count[:, None]
            var = ((adv - mu).pow(2) * m).sum(1, keepdim=True) / (count[:, None] - 1).clamp(min=1)
            normed = (adv - mu) / (var.sqrt() + 1e-8)
            adv = torch.where((count > 1)[:, None], normed, adv)
        return d, count, adv.detach()

    def losses(self, model: nn.Module, params: Params, batch: StackedBatch) -> torch.Tensor:
        d, count, adv = self._data(params, batch)
        mean, log_std = gaussian_policy(params, d["obs"])
        pg = -(log_prob(d["actions"], mean, log_std) * adv * d["mask"]).sum(1) / count
        return pg - self.tasks[0].loss_cfg.ent_coef * log_std.sum((-1, -2))

    def distribution(self, model: nn.Module, params: Params, batch: StackedBatch) -> tuple[torch.Tensor, ...]:
        dtype = next(iter(params.values())).dtype
        return gaussian_policy(params, batch.data["obs"].to(dtype))

    def surrogate_kl(self, model: nn.Module, params: Params, batch: StackedBatch,
                     old: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        d, count, adv = self._data(params, batch)
        mean, log_std = gaussian_policy(params, d["obs"])
        old_mean, old_log_std = (x.to(mean.dtype) for x in old)
        m = d["mask"]
        ratio = torch.exp(log_prob(d["actions"], mean, log_std) - log_prob(d["actions"], old_mean, old_log_std))
        surrogate = -(ratio * adv * m).sum(1) / count - self.tasks[0].loss_cfg.ent_coef * log_std.sum((-1, -2))
        kl = (log_std - old_log_std + (torch.exp(2 * old_log_std) + (old_mean - mean).pow(2))
              / (2 * torch.exp(2 * log_std)) - 0.5).sum(-1)
        return surrogate, (kl * m).sum(1) / count

    def fisher(self, model: nn.Module, params: Params, batch: StackedBatch):
        """For a diagonal Gaussian the KL's Hessian is J_mean^T diag(1/sigma^2) J_mean on the mean
        (per live step, averaged) plus 2 on each log-std: a forward-mode product J u, weighted, and
        one backward pass."""
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        obs, m = batch.data["obs"].to(p["log_std"].dtype), batch.data["mask"].to(p["log_std"].dtype)
        mean, log_std = gaussian_policy(p, obs)
        weight = (m / m.sum(1, keepdim=True))[..., None] * torch.exp(-2 * log_std.detach())
        keys = list(p)

        def product(u: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            _, (d_mean, d_log_std) = torch.func.jvp(lambda *ps: gaussian_policy(dict(zip(keys, ps)), obs),
                                                    tuple(x.detach() for x in p.values()), tuple(u))
            return torch.autograd.grad((mean, log_std), tuple(p.values()), grad_outputs=(d_mean * weight, 2 * d_log_std),
                                       retain_graph=True)
        return product


@dataclass(frozen=True)
class Nav2dFamily(TaskFamily):
    traits = TRAITS["nav2d"]
    cfg: Nav2dConfig
    loss_cfg: LossConfig

    def make_model(self) -> nn.Module:
        return GaussianPolicy(self.cfg.hidden, self.cfg.init_log_std)

    def make_task(self, name: str, seed: int) -> Task:
        return Nav2dTask(name, seed, self.cfg, self.loss_cfg)

    def make_stack(self, tasks: list[Task]) -> TaskStack:
        return Nav2dStack(tasks)

