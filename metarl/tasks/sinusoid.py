"""Sinusoid regression (MAML paper, section 5.1) as a task family.

A task is y = A sin(x - phi) with amplitude A and phase phi drawn uniformly from the config's
ranges; x is uniform on x_range. The task name fixes the curve: `sine-0017` draws (A, phi) from an
RNG seeded by the index 17 alone, so the same name is the same curve in every run and process;
the `seed` given to `make_task` only seeds the draws of x. One `sample()` is K fresh points (the
K-shot support set when adapting, the query set when evaluating theta'), so support and query of
one task come from the same curve and independent x; `env_steps` counts the K samples.

Data is stored in float64 and cast to the parameters' dtype in `loss`, so the same task serves
float32 training and float64 finite-difference checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metarl.core.families import TRAITS
from metarl.core.config import ConfigError, SinusoidConfig
from metarl.core.losses import mse
from metarl.core.policy import MLP, Params, forward, mlp_forward
from metarl.tasks.base import Batch, StackedBatch, Task, TaskFamily, TaskStack

NAME_RE = re.compile(r"^sine-(\d+)$")
_SALT = 0x5EED_5111  # separates these draws from any other RNG seeded by a small integer


def task_index(name: str) -> int:
    """`sine-0017` -> 17; anything else is a ConfigError naming the expected form."""
    m = NAME_RE.match(name)
    if m is None:
        raise ConfigError(f"sinusoid task name '{name}' is not of the form sine-<index>, e.g. sine-0017")
    return int(m.group(1))


def task_names(first: int, count: int) -> tuple[str, ...]:
    """`count` consecutive task names starting at index `first`."""
    return tuple(f"sine-{i:04d}" for i in range(first, first + count))


def curve(index: int, cfg: SinusoidConfig) -> tuple[float, float]:
    """(amplitude, phase) of task `index`: uniform draws from an RNG seeded by the index only."""
    rng = np.random.default_rng([_SALT, index])
    amplitude = float(rng.uniform(*cfg.amp_range))
    phase = float(rng.uniform(*cfg.phase_range))
    return amplitude, phase


def params_dtype(params: Params) -> torch.dtype:
    return next(iter(params.values())).dtype


class SinusoidTask(Task):
    fresh_data_each_step = False  # K-shot: every inner step uses the same K support points

    def __init__(self, name: str, seed: int, cfg: SinusoidConfig):
        self.name = name
        self.cfg = cfg
        self.amplitude, self.phase = curve(task_index(name), cfg)
        self.k_shot, self.x_range = cfg.k_shot, cfg.x_range
        self.gen = torch.Generator().manual_seed(int(seed))

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.sin(x - self.phase)

    def draw_x(self, n: int) -> torch.Tensor:
        """n fresh inputs uniform on x_range, N x 1, float64."""
        lo, hi = self.x_range
        return lo + (hi - lo) * torch.rand(n, 1, generator=self.gen, dtype=torch.float64)

    def draw(self, n: int) -> Batch:
        """n fresh points of this curve, N x 1 each, float64."""
        x = self.draw_x(n)
        return Batch({"x": x, "y": self.target(x)}, env_steps=n, frames=n)

    @torch.no_grad()
    def sample(self, model: nn.Module, params: Params) -> Batch:
        """K points; the 'return' reported is -MSE of `params` on them (what the progress bar shows)."""
        batch = self.draw(self.k_shot)
        pred = forward(model, params, batch.data["x"].to(params_dtype(params)))
        sq_err = float((pred.double() - batch.data["y"]).pow(2).sum())
        batch.episode_returns = [-sq_err / self.k_shot]
        batch.reward_sum = -sq_err
        return batch

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = params_dtype(params)
        pred = forward(model, params, batch.data["x"].to(dtype))
        loss = mse(pred, batch.data["y"].to(dtype))
        return loss, {"mse": float(loss.detach())}

    def reseed(self, seed: int, redraw: bool = False) -> None:
        self.gen.manual_seed(int(seed))
        if redraw:  # a fresh curve from the same stream, before any point is drawn
            u_amp, u_phase = torch.rand(2, generator=self.gen, dtype=torch.float64).tolist()
            (a0, a1), (p0, p1) = self.cfg.amp_range, self.cfg.phase_range
            self.amplitude, self.phase = a0 + (a1 - a0) * u_amp, p0 + (p1 - p0) * u_phase


class SinusoidStack(TaskStack):
    """Rows of K points each; the regressor runs once over all rows (batched matmuls). Each row's
    points come from its own task's RNG, so a row is the same data its task's sample() gives."""

    @torch.no_grad()
    def sample(self, model: nn.Module, params: Params, rows: list[int]) -> StackedBatch:
        tasks = [self.tasks[r] for r in rows]
        x = torch.stack([t.draw_x(t.k_shot) for t in tasks])
        amp = torch.tensor([t.amplitude for t in tasks], dtype=torch.float64)[:, None, None]
        phase = torch.tensor([t.phase for t in tasks], dtype=torch.float64)[:, None, None]
        y = amp * torch.sin(x - phase)
        pred = mlp_forward(params, x.to(params_dtype(params)))
        sq_err = (pred.double() - y).pow(2).sum((1, 2)).tolist()
        k = [self.tasks[r].k_shot for r in rows]
        return StackedBatch({"x": x, "y": y}, env_steps=k, episode_returns=[[-e / n] for e, n in zip(sq_err, k)],
                            reward_sum=[-e for e in sq_err])

    def losses(self, model: nn.Module, params: Params, batch: StackedBatch) -> torch.Tensor:
        dtype = params_dtype(params)
        pred = mlp_forward(params, batch.data["x"].to(dtype))
        return (pred - batch.data["y"].to(dtype)).pow(2).mean((1, 2))


@dataclass(frozen=True)
class SinusoidFamily(TaskFamily):
    traits = TRAITS["sinusoid"]
    cfg: SinusoidConfig

    def make_model(self) -> nn.Module:
        return MLP(1, 1, self.cfg.hidden)

    def make_task(self, name: str, seed: int) -> Task:
        return SinusoidTask(name, seed, self.cfg)

    def make_stack(self, tasks: list[Task]) -> TaskStack:
        return SinusoidStack(tasks)
