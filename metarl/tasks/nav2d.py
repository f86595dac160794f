"""2D point navigation (MAML paper, section 5.3) as a task family.

A point starts at the origin and moves by max_action * clip(a, -1, 1) per coordinate every step
(actions in normalised units, as rllab's `normalize` wrapper gives the paper's policy, so each move
is clipped to [-0.1, 0.1]); the reward is minus the distance to the goal after the move, and an
episode ends after `horizon` steps or when both coordinates are within `goal_tolerance` of it. The agent observes only its position, so it must find the goal from
rewards. The task name fixes the goal: `goal-0017` draws it uniformly from the goal square with an
RNG seeded by the index alone; `make_task`'s seed drives the policy's action noise.

The policy is a diagonal Gaussian: a ReLU MLP gives the mean, a state-independent log-std is part
of theta. The loss is REINFORCE (metarl.losses.gaussian_pg_loss) with advantages from GAE over a
linear feature baseline fitted to the batch's own returns (as in the paper's rllab setup). The
advantages depend only on the batch, never on the parameters being scored, so the loss is a pure
function of (params, batch) and its Hessian is the surrogate's, as in MAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metarl.config import ConfigError, LossConfig, Nav2dConfig
from metarl.losses import gaussian_pg_loss
from metarl.policy import Params
from metarl.tasks.base import Batch, Task, TaskFamily

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
    ReLU layers `layers.<i>` with the last one linear; the log-std does not depend on the state."""
    n = sum(1 for k in params if k.endswith(".weight"))
    h = obs
    for i in range(n):
        h = F.linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
        if i < n - 1:
            h = torch.relu(h)
    return h, params["log_std"]


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
    """y_t = sum_{l >= t} factor^(l - t) x_l over T x B, as one triangular matrix product. Steps
    after an episode ends carry x = 0 here (frozen episodes), so no episode boundary is needed."""
    T = x.shape[0]
    powers = torch.arange(T, dtype=x.dtype)
    exponent = powers[None, :] - powers[:, None]
    weights = torch.where(exponent >= 0, factor ** exponent.clamp(min=0), torch.zeros((), dtype=x.dtype))
    return weights @ x


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

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = next(iter(params.values())).dtype
        mean, log_std = gaussian_policy(params, batch.data["obs"].to(dtype))
        pg = gaussian_pg_loss(mean, log_std, batch.data["actions"].to(dtype), batch.data["advantages"].to(dtype),
                              self.loss_cfg.norm_adv)
        entropy = log_std.sum()  # + a constant: the Gaussian's entropy per step
        loss = pg - self.loss_cfg.ent_coef * entropy
        return loss, {"pg_loss": float(pg.detach()), "std": float(log_std.detach().exp().mean())}


@dataclass(frozen=True)
class Nav2dFamily(TaskFamily):
    cfg: Nav2dConfig
    loss_cfg: LossConfig

    def make_model(self) -> nn.Module:
        return GaussianPolicy(self.cfg.hidden, self.cfg.init_log_std)

    def make_task(self, name: str, seed: int) -> Task:
        return Nav2dTask(name, seed, self.cfg, self.loss_cfg)

