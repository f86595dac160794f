"""The held-out fine-tuner: the learner that `metarl eval`, `learn`, `sweep` and `probe` train a
held-out game with from a given theta, one update (or one PPO pass, `metarl.core.ppo`) per fresh
rollout of T x B env steps, until an env-step budget is spent. `FineTuner` is its actor shell.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from metarl.core import meta, ppo
from metarl.core.config import Config
from metarl.distributed.learner import lr_factor
from metarl.core.policy import Params, ParamSpec, params_device
from metarl.core.ppo import finite
from metarl.tasks.base import Task, TaskFamily



@dataclass(frozen=True)
class FineTuneLearner:
    """How held-out tasks are fine-tuned, each update on a fresh rollout of T x B env steps:
    one gradient step per rollout (epochs = minibatches = 1), or PPO's clipped updates, `epochs`
    passes of `minibatches` steps each. sgd with alpha, one step per rollout, is the inner loop of
    meta-training (meta.adapt with S = 1, repeated): what a MAML theta is trained for; adam with
    PPO's epochs is the standard learner of the field (CleanRL's PPO)."""

    optimizer: str = "sgd"
    lr: float = 0.01
    max_grad_norm: float = 0.0
    """0: no clipping."""
    epochs: int = 1
    minibatches: int = 1
    clip: float = 0.1
    lr_decay: str = "constant"
    bf16: bool = False
    gpus: float = 0.0
    """GPU share of each fine-tuning job; > 0: its network acts and learns on cuda."""

    @staticmethod
    def of(cfg: Config) -> "FineTuneLearner":
        f = cfg.finetune
        return FineTuneLearner(f.optimizer, cfg.finetune_lr, f.max_grad_norm, f.epochs, f.minibatches, f.clip,
                               f.lr_decay, f.bf16, f.gpus)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    @property
    def ppo(self) -> bool:
        return self.epochs * self.minibatches > 1

    @property
    def label(self) -> str:
        ppo = f"PPO {self.epochs} epochs x {self.minibatches} minibatches, clip {self.clip:g}, " if self.ppo else ""
        decay = f" ({self.lr_decay})" if self.lr_decay != "constant" else ""
        clip = f", grad clip {self.max_grad_norm:g}" if self.max_grad_norm else ""
        return (f"{ppo}{self.optimizer} lr {self.lr:g}{decay}{clip}{', bf16' if self.bf16 else ''}"
                f"{', on cuda' if self.gpus else ''}")


@torch.no_grad()
def update(params: Params, grads: tuple[torch.Tensor, ...], learner: FineTuneLearner,
           opt: torch.optim.Optimizer | None, lr: float | None = None) -> None:
    """One fine-tuning update of `params` in place: clip to learner.max_grad_norm (if set), then an
    SGD step of `lr` (default learner.lr), or `opt`'s step (Adam over the same tensors, its own lr)."""
    for p, g in zip(params.values(), grads):
        p.grad = g
    if learner.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), learner.max_grad_norm)
    if opt is None:
        step = learner.lr if lr is None else lr
        for p in params.values():
            p -= step * p.grad
    else:
        opt.step()


def make_optimizer(params: Params, learner: FineTuneLearner) -> torch.optim.Optimizer | None:
    return torch.optim.Adam(list(params.values()), lr=learner.lr) if learner.optimizer == "adam" else None


def ppo_updates(task: Task, model: torch.nn.Module, params: Params, batch: Any, learner: FineTuneLearner,
                opt: torch.optim.Optimizer | None, lr: float, gen: torch.Generator) -> tuple[float, dict[str, float]]:
    """learner.epochs passes over one rollout, each in learner.minibatches random minibatches, one
    update per minibatch (`metarl.core.ppo`). Returns the mean loss and stats (nan loss: a non-finite loss
    or gradient stopped it, params untouched by that minibatch). One host sync per minibatch."""
    adv, ret = task.advantages(batch)
    indices = ppo.index_sets(adv.numel(), learner.epochs, learner.minibatches, gen, adv.device)
    return ppo.run_updates(indices, lambda idx: task.ppo_grad(model, params, batch, adv, ret, idx, learner.clip),
                           lambda grads: update(params, grads, learner, opt, lr))


def finetune(task: Task, model: torch.nn.Module, theta: Params, learner: FineTuneLearner,
             budget: int, progress: Callable[[str], None] | None = None,
             progress_every_s: float = 60.0, learn: bool = True) -> tuple[dict[str, Any], Params]:
    """Updates with `learner`, each on a fresh rollout, until `budget` env steps are spent.
    Returns the per-step trace (episodes as [step index, raw return]) and the final parameters.
    learn=False: the same rollouts and trace with no update (a fixed policy's curve, such as the
    uniform-random reference of `metarl references`); its losses are NaN.
    A run whose loss or parameters become non-finite stops there and is marked `diverged` (its
    curve ends at the last finite point; evaluations count such runs instead of averaging them).
    `progress`, if given, gets a line every `progress_every_s` seconds: steps done and the mean
    return of the last 10 finished episodes."""
    params = meta.detached(theta, requires_grad=True)
    opt = make_optimizer(params, learner) if learn else None
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    trace: dict[str, Any] = {"env_steps": [], "frames": [], "reward_sum": [], "loss": [], "episodes": [],
                             "diverged": False}
    steps = frames = 0
    shown = t0
    stats: dict[str, float] = {}
    while steps < budget:
        if progress is not None and time.perf_counter() - shown >= progress_every_s:
            shown = time.perf_counter()
            last = [r for _, r in trace["episodes"][-10:]]
            mean = f"{sum(last) / len(last):.2f}" if last else "n/a"
            kl = f", approx KL {stats['approx_kl']:.4f}, clipped {stats['clipfrac']:.2f}" if "approx_kl" in stats else ""
            progress(f"{steps:,}/{budget:,} env steps ({steps / (shown - t0):.0f}/s), "
                     f"mean return of the last {len(last)} episodes {mean}{kl}")
        lr = learner.lr * lr_factor(learner.lr_decay, steps, budget)
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        # no weight cache: autocast would otherwise reuse the bf16 copies it made before the first
        # of PPO's updates for every later one (stale weights, ratio stuck at 1)
        with torch.autocast(params_device(params).type, dtype=torch.bfloat16, enabled=learner.bf16,
                            cache_enabled=False):
            with torch.no_grad():
                batch = task.sample(model, params)
            steps, frames = steps + batch.env_steps, frames + (batch.frames or batch.env_steps)
            trace["episodes"] += [[len(trace["env_steps"]), float(r)] for r in batch.episode_returns]
            trace["env_steps"].append(steps)
            trace["frames"].append(frames)
            trace["reward_sum"].append(float(batch.reward_sum))
            if not learn:
                trace["loss"].append(math.nan)
            elif learner.ppo:
                loss, stats = ppo_updates(task, model, params, batch, learner, opt, lr, gen)
                trace["loss"].append(loss)
                if not math.isfinite(loss):
                    trace["diverged"] = True
                    break
            else:
                grads, loss, _ = task.grad(model, params, batch)
                trace["loss"].append(loss)
                if not math.isfinite(loss) or not finite(*grads):
                    trace["diverged"] = True
                    break
                update(params, grads, learner, opt, lr)
        if not finite(*params.values()):
            trace["diverged"] = True
            break
    trace["seconds"] = time.perf_counter() - t0
    return trace, meta.detached(params)


class FineTuner:
    """Actor shell: one network, fine-tunes a fresh task per call and closes its emulators."""

    def __init__(self, family: TaskFamily, learner: FineTuneLearner, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.family, self.learner = family, learner
        self.model = family.make_model().to(learner.device)
        self.spec = ParamSpec.of(self.model)

    def run(self, game: str, env_seed: int, theta: np.ndarray, budget: int, learn: bool = True) -> dict[str, Any]:
        task = self.family.make_task(game, env_seed)
        try:
            params = self.spec.unflatten(theta, device=self.learner.device)
            what = "fine-tune" if learn else "play (no learning)"
            trace, _ = finetune(task, self.model, params, self.learner, budget, learn=learn,
                                progress=lambda line: print(f"{what} {game} (env seed {env_seed}): {line}", flush=True))
        finally:
            task.close()
        return trace
