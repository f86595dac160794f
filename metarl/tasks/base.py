"""What the meta-learning core knows about a task: it samples a batch and scores a loss.

A `Task` (a) produces a batch of data with given parameters and (b) scores a differentiable loss
on that batch with any parameters. A `TaskFamily` builds the one network every task of the
family shares and the tasks themselves. The core (metarl.core.meta) never knows which kind it has.
"""

from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metarl.core.families import Traits
from metarl.core.policy import Params


@dataclass
class Batch:
    """Data collected with one parameter vector, plus the numbers the system reports about it."""

    data: dict[str, torch.Tensor]
    env_steps: int
    """Agent steps (transitions or supervised samples) that produced the batch."""
    episode_returns: list[float] = field(default_factory=list)
    """Raw (unclipped) returns of episodes that ended while collecting it."""
    reward_sum: float = 0.0
    """Raw reward summed over the batch (for a per-step rate when no episode ended)."""
    frames: int = 0
    """Emulator frames (env_steps x frameskip on Atari; env_steps elsewhere)."""

    @property
    def mean_return(self) -> float:
        return float(sum(self.episode_returns) / len(self.episode_returns)) if self.episode_returns else math.nan

    @property
    def reward_per_step(self) -> float:
        return self.reward_sum / max(self.env_steps, 1)


def batch_to_wire(batch: Batch) -> dict[str, Any]:
    """A batch as numpy arrays (zero-copy through Ray's object store) and plain numbers."""
    return {"data": {k: v.cpu().numpy() for k, v in batch.data.items()}, "env_steps": batch.env_steps,
            "frames": batch.frames}


def batch_from_wire(wire: dict[str, Any], device: str = "cpu") -> Batch:
    """The inverse of batch_to_wire, on `device`. Arrays out of the object store are read-only;
    the tensors viewing them are only read (a GPU gets its own copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = {k: torch.from_numpy(v).to(device) for k, v in wire["data"].items()}
    return Batch(data, wire["env_steps"], frames=wire.get("frames", 0))


class Task(abc.ABC):
    """One task: a game, a sine curve, a goal."""

    name: str
    fresh_data_each_step: bool = True
    """Inner steps sample anew (on-policy RL); False: all S steps reuse the first step's batch
    (supervised K-shot: K support points, S steps on them)."""

    @abc.abstractmethod
    def sample(self, model: nn.Module, params: Params) -> Batch:
        """Collect fresh data acting with `params` (no gradient is recorded)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, params: Params, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of `params` on `batch`, differentiable w.r.t. params, and scalar stats."""

    def grad(self, model: nn.Module, params: Params, batch: Batch) -> tuple[tuple[torch.Tensor, ...], float, dict[str, float]]:
        """grad_params of `loss` on `batch` (params: leaf tensors that require grad), the loss and
        its stats. Always taken at the parameters that collected `batch`; a task may use what it
        recorded while sampling and split the work to bound memory, as long as the gradient is
        the same."""
        loss, stats = self.loss(model, params, batch)
        return torch.autograd.grad(loss, tuple(params.values())), float(loss.detach()), stats

    def reseed(self, seed: int, redraw: bool = False) -> None:
        """Restart this task's data RNG from `seed` (stacked runs draw each iteration's data from
        (run seed, iteration, task), whichever worker computes it); `redraw` also draws the task
        itself anew from the family's distribution (tasks.resample). Emulator tasks do not."""
        raise NotImplementedError(f"{type(self).__name__} cannot be reseeded")

    def close(self) -> None:
        """Release emulators or other resources."""


@dataclass
class StackedBatch:
    """One batch per row of a task stack: every tensor in `data` has the rows as its first
    dimension; row r was collected by task rows[r] with parameter set r."""

    data: dict[str, torch.Tensor]
    env_steps: list[int]
    episode_returns: list[list[float]]
    reward_sum: list[float]

    def row_stats(self, r: int) -> dict[str, Any]:
        """The numbers a worker reports for one row, as for an unstacked Batch."""
        return {"env_steps": self.env_steps[r], "frames": self.env_steps[r],
                "returns": list(self.episode_returns[r]), "reward_sum": self.reward_sum[r]}

    def columns(self, index: torch.Tensor) -> "StackedBatch":
        """Row r restricted to its samples index[r] (rows x k, along the second dimension of every
        tensor): a subsample for curvature products (meta.TrustRegion)."""
        def pick(v: torch.Tensor) -> torch.Tensor:
            i = index.reshape(*index.shape, *([1] * (v.dim() - 2))).expand(*index.shape, *v.shape[2:])
            return v.gather(1, i)
        return StackedBatch({k: pick(v) for k, v in self.data.items()}, self.env_steps, self.episode_returns,
                            self.reward_sum)


class TaskStack(abc.ABC):
    """Many tasks of one family computed together: sampling and losses for n (task, parameter
    set) rows at once, parameters stacked along a first dimension of size n (see
    metarl.core.policy.linear). Row r's loss depends on row r's parameters and data alone, so the
    gradient of the summed losses is every row's own gradient, and a Hessian-vector product of it
    is every row's own HVP: the meta-math of metarl.core.meta, done for all groups in one pass."""

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks

    @abc.abstractmethod
    def sample(self, model: nn.Module, params: Params, rows: list[int]) -> StackedBatch:
        """Fresh data for tasks[rows[r]] acting with parameter set r (no gradient recorded)."""

    @abc.abstractmethod
    def losses(self, model: nn.Module, params: Params, batch: StackedBatch) -> torch.Tensor:
        """The n per-row losses (each the unstacked Task.loss of that row), differentiable."""

    # A policy family also gives what the KL-constrained outer step (meta.outer = trpo) needs.
    # The policy's distribution is summarised by a tuple of tensors (a Gaussian: mean, log-std).

    def distribution(self, model: nn.Module, params: Params, batch: StackedBatch) -> tuple[torch.Tensor, ...]:
        """Row r's action distribution under parameter set r at the batch's observations."""
        raise NotImplementedError(f"{type(self).__name__} has no policy distribution (meta.outer = trpo needs one)")

    def surrogate_kl(self, model: nn.Module, params: Params, batch: StackedBatch,
                     old: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the likelihood-ratio surrogate loss -mean(pi/pi_old * A) over the batch (its
        gradient where pi = pi_old is that of `losses`; its value there is -mean(A)) and the mean
        KL(pi_old || pi)."""
        raise NotImplementedError(f"{type(self).__name__} has no policy distribution (meta.outer = trpo needs one)")

    def fisher(self, model: nn.Module, params: Params, batch: StackedBatch):
        """A function u -> F u, row by row: F_r the Hessian of row r's mean KL(pi_params || pi) at
        pi = pi_params (the Fisher information of the policy on row r's observations). u and the
        result have params' shapes (rows first); the forward pass is shared by every call."""
        raise NotImplementedError(f"{type(self).__name__} has no policy distribution (meta.outer = trpo needs one)")


class TaskFamily(abc.ABC):
    """Builds the shared network and the tasks; picklable so Ray can ship it to actors."""

    @abc.abstractmethod
    def make_model(self) -> nn.Module:
        """The network every task of the family uses (freshly initialised)."""

    @abc.abstractmethod
    def make_task(self, name: str, seed: int) -> Task:
        """The task called `name`, with its own RNG seeded by `seed`."""

    def make_stack(self, tasks: list[Task]) -> TaskStack | None:
        """A TaskStack over `tasks`, or None when the family only computes task by task (Atari:
        each game's emulators are its own)."""
        return None

    traits: Traits
    """What the family can do (metarl.core.families.TRAITS): stacked, policy, games, task names."""

    frames_per_step: int = 1
    """Emulator frames per agent step (Atari: the frameskip)."""

    obs_bytes: int = 4
    """Bytes of one stored observation (Atari: 4 x 84 x 84 uint8): with env.num_envs x env.rollout_len
    it sizes a task's rollout buffer, which a run checks against the memory of its Ray nodes."""

    def raw_stepper(self, name: str, seed: int):
        """The emulator limit `metarl bench` compares against: (step, close), where step(n) steps
        the task's B environments n times with uniformly random actions, no policy and no buffers."""
        raise NotImplementedError(f"{type(self).__name__} has no emulator to benchmark")

    def make_scorer(self) -> Task:
        """A task that only scores shipped batches (loss, grad): what a learner computing
        gradients itself needs. Families whose batches are not shipped do not provide one."""
        raise NotImplementedError(f"{type(self).__name__} does not score shipped batches")
