"""Fast adaptation: how well a theta plays a new game after a few updates of meta-training's own
inner learner, the thing MAML trains theta for (a fine-tuning curve over a long budget measures
something else: how good a start theta is for a long-running learner).

From theta (0 updates) and after each count in `updates` (cumulative: by default 1, then 2 more to
reach 3, then 7 more to reach 10), the current policy is measured without learning on
`eval_rollouts` fresh rollouts of T x B env steps:

  reward_rate     raw score per agent step over those rollouts
  return          mean raw return of the episodes that ended in them (NaN when none did)
  episodes        how many episodes ended in them
  env_steps       env steps spent on the game so far, evaluation and adaptation together
  theta_distance  |theta_k - theta|_2: how far the inner learner has moved the parameters

One update is `metarl.core.meta.adapt` with S = 1, exactly a task worker's inner step: one fresh
rollout with the current parameters, then one SGD step of alpha (meta.inner_lr), or with
meta.inner_epochs x inner_minibatches > 1 PPO's clipped steps of alpha (`InnerPPO`). The emulators
run on through evaluation and adaptation alike (an episode may span both), as in meta-training.

`FastAdapter` is the actor shell; `run_fast_jobs` measures every (game, seed, init) on actors.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from metarl.core import meta
from metarl.core.config import Config
from metarl.core.meta import InnerPPO
from metarl.core.policy import Params, ParamSpec
from metarl.core.ppo import finite
from metarl.distributed.fleet import inner_plan
from metarl.experiments.evaluate import call_actors, job_list
from metarl.tasks.base import Task, TaskFamily

MEASURED = ("reward_rate", "return", "episodes", "env_steps", "theta_distance")
"""What fast_adapt records at every measurement point."""


def check_updates(updates: tuple[int, ...]) -> None:
    if not updates or any(u < 1 for u in updates) or list(updates) != sorted(set(updates)):
        raise ValueError(f"updates {updates} must be increasing counts of at least 1, e.g. (1, 3, 10)")


def distance(params: Params, theta: Params) -> float:
    return math.sqrt(sum(float(((params[k] - theta[k]).double() ** 2).sum()) for k in theta))


def fast_adapt(task: Task, model: torch.nn.Module, theta: Params, inner_lr: float, inner: InnerPPO | None,
               updates: tuple[int, ...] = (1, 3, 10), eval_rollouts: int = 8) -> dict[str, Any]:
    """The measurements of the module docstring at 0 updates and after each count in `updates`.
    Parameters that turn non-finite (or an inner loss that does) mark the run `diverged`; every
    later point is NaN."""
    check_updates(updates)
    if eval_rollouts < 1:
        raise ValueError(f"eval_rollouts = {eval_rollouts} must be at least 1")
    t0 = time.perf_counter()
    theta = meta.detached(theta)
    params = theta
    out: dict[str, Any] = {"updates": [0, *updates], **{key: [] for key in MEASURED}, "diverged": False}
    steps = done = 0
    for target in (0, *updates):
        while done < target and not out["diverged"]:
            adaptation = meta.adapt(task, model, params, inner_lr, 1, inner)
            params, done = adaptation.theta_prime, done + 1
            steps += sum(b.env_steps for b in adaptation.batches)
            out["diverged"] = not (math.isfinite(adaptation.losses[-1]) and finite(*params.values()))
        if out["diverged"]:
            for key in MEASURED:
                out[key].append(math.nan)
            continue
        with torch.no_grad():
            batches = [task.sample(model, params) for _ in range(eval_rollouts)]
        returns = [float(r) for b in batches for r in b.episode_returns]
        steps += sum(b.env_steps for b in batches)
        out["reward_rate"].append(sum(float(b.reward_sum) for b in batches) / sum(b.env_steps for b in batches))
        out["return"].append(float(np.mean(returns)) if returns else math.nan)
        out["episodes"].append(len(returns))
        out["env_steps"].append(steps)
        out["theta_distance"].append(distance(params, theta))
    out["seconds"] = time.perf_counter() - t0
    return out


class FastAdapter:
    """Actor shell: one network on the CPU (where meta-training's task workers adapt), a fresh
    task per call, its emulators closed afterwards."""

    def __init__(self, family: TaskFamily, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.family = family
        self.model = family.make_model()
        self.spec = ParamSpec.of(self.model)

    def fast(self, game: str, env_seed: int, theta: np.ndarray, inner_lr: float, inner: InnerPPO | None,
             updates: tuple[int, ...], eval_rollouts: int) -> dict[str, Any]:
        """`fast_adapt` on game `game` with emulator and action seeds from `env_seed` (InnerPPO's
        minibatches come from the task's generator, so from env_seed too)."""
        task = self.family.make_task(game, env_seed)
        try:
            return fast_adapt(task, self.model, self.spec.unflatten(theta), inner_lr, inner, tuple(updates),
                              eval_rollouts)
        finally:
            task.close()


def run_fast_jobs(family: TaskFamily, cfg: Config, thetas: dict[str, np.ndarray], games: tuple[str, ...],
                  seeds: tuple[int, ...], local: bool, address: str = "", workers: int = 0,
                  updates: tuple[int, ...] = (1, 3, 10), eval_rollouts: int = 8,
                  log: Callable[[str], None] = print) -> list[dict]:
    """`fast_adapt` for every (game, seed, init) with the inner learner of `cfg` (meta.inner_lr, and
    `inner_plan`: the rule meta-training's workers get theirs by), on `FastAdapter` actors side by
    side or one after another in this process; `address` empty: cfg.ray.address. Seeds as in
    `metarl.experiments.evaluate.run_jobs`; pass the family of `cfg` itself (meta-training's
    rollout length), not cfg.finetuning. Each job gets "fast": the fast_adapt dict."""
    check_updates(tuple(updates))
    jobs = job_list(tuple(games), tuple(seeds), thetas)
    inner = inner_plan(cfg)

    def done(job: dict, fast: dict[str, Any]) -> None:
        job["fast"] = fast
        rates = ", ".join(f"{u}: {r:.4f}" for u, r in zip(fast["updates"], fast["reward_rate"]))
        log(f"fast adaptation: {job['game']} from {job['init']}, seed {job['seed']}: score/step after {rates} "
            f"updates{' (diverged)' if fast['diverged'] else ''}, {fast['seconds']:.1f}s")

    call_actors((FastAdapter, family), thetas, jobs, FastAdapter.fast,
                lambda _: (cfg.meta.inner_lr, inner, tuple(updates), eval_rollouts), local,
                address or cfg.ray.address, workers, what="fast adaptation on", done=done)
    return jobs
