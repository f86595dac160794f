"""TaskWorker: owns one or more tasks (their emulators and RNGs) and one policy network.

A thin shell around metarl.core.meta: parameters arrive as flat float32 numpy arrays (zero-copy out of
Ray's object store), are loaded into the single network functionally, and only gradients and
statistics go back. The driver wraps this class with `ray.remote`; `--local` uses it as is.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import torch

from metarl.core import meta
from metarl.core import outer as outer_mod
from metarl.core.policy import ParamSpec
from metarl.core.seeds import iteration_seed
from metarl.tasks.base import Batch, TaskFamily, batch_to_wire


def batch_stats(batch: Batch) -> dict[str, Any]:
    return {"env_steps": batch.env_steps, "frames": batch.frames or batch.env_steps,
            "returns": list(batch.episode_returns), "reward_sum": batch.reward_sum}


def merge_batch_stats(batches: list[Batch]) -> dict[str, Any]:
    out = {"env_steps": 0, "frames": 0, "returns": [], "reward_sum": 0.0}
    for b in batches:
        s = batch_stats(b)
        for k in ("env_steps", "frames", "reward_sum"):
            out[k] += s[k]
        out["returns"] += s["returns"]
    return out


def node_id() -> str:
    """The Ray node this process runs on ('local' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001 - no Ray runtime in this process
        return "local"


class TaskWorker:
    def __init__(self, family: TaskFamily, task_seeds: dict[str, int], inner_lr: float, inner_steps: int,
                 keep_adaptation: bool = False, torch_threads: int = 1, device: str = "cpu", resample: bool = False,
                 step_loss: str = "last", outer: str = "adam", fisher_fraction: float = 1.0,
                 plan: "outer_mod.Plan | None" = None, inner: "meta.InnerPPO | None" = None):
        torch.set_num_threads(torch_threads)
        self.device = device
        self.model = family.make_model().to(device)
        self.spec = ParamSpec.of(self.model)
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.inner = inner
        """meta.inner_epochs/minibatches/clip: PPO's update as the inner loop; None: one SGD step"""
        self.keep_adaptation = keep_adaptation
        self.family, self.seeds, self.resample, self.step_loss = family, dict(task_seeds), resample, step_loss
        self.tasks = {name: family.make_task(name, seed) for name, seed in task_seeds.items()}
        self._adaptations: dict[str, meta.Adaptation] = {}
        self._stack = None
        self.outer, self.fisher_fraction = outer, fisher_fraction
        self._region: meta.TrustRegion | None = None
        self.plan = plan
        """meta.outer_epochs/minibatches/clip: PPO's outer loop; members keep their rollouts for it"""
        self._members: dict[str, outer_mod.Member] = {}
        self._indices: dict[str, list[torch.Tensor]] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _params(self, flat: np.ndarray):
        return self.spec.unflatten(flat, device=self.device)

    def _task(self, name: str):
        if name not in self.tasks:
            raise KeyError(f"worker pid {os.getpid()} does not own task {name!r}; it owns {sorted(self.tasks)}")
        return self.tasks[name]

    # -- remote methods -----------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        """Where this worker runs (for operators: which process to look at for a task; the node
        decides which workers' gradients ray.grad_reduce = node sums together)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "node": node_id(), "tasks": sorted(self.tasks),
                "device": self.device}

    def reduce(self, *grads: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The sum of gradients this worker (or its node) produced, so the learner receives one
        message per worker (or node) instead of one per task; accumulated in float64, sent as
        float32. The small second return lets the driver see that the sum exists without reading it."""
        t0 = time.perf_counter()
        out = np.zeros(self.spec.numel, dtype=np.float64)
        for g in grads:
            out += g
        return out.astype(np.float32), {"summed": len(grads), "seconds": time.perf_counter() - t0}

    def adapt(self, task_name: str, theta: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Leader step: S inner SGD steps on fresh rollouts -> theta' (flat) and stats."""
        t0 = time.perf_counter()
        task = self._task(task_name)
        a = meta.adapt(task, self.model, self._params(theta), self.inner_lr, self.inner_steps, self.inner)
        if self.keep_adaptation:
            self._adaptations[task_name] = a
        stats = merge_batch_stats(meta.distinct_batches(a.batches))
        stats.update(task=task_name, inner_losses=a.losses, seconds=time.perf_counter() - t0,
                     seconds_sample=a.seconds_sample, seconds_grad=a.seconds_grad)
        return self.spec.flatten(a.theta_prime), stats

    def evaluate(self, task_name: str, theta_prime: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Member step: roll out theta' on this task and return g_j = grad_{theta'} L_j(theta')."""
        t0 = time.perf_counter()
        task = self._task(task_name)
        params = self._params(theta_prime)
        batch = task.sample(self.model, params)
        t1 = time.perf_counter()
        grads, loss, parts = meta.loss_grad(task, self.model, params, batch)
        flat = self.spec.flatten_grads(grads)
        finite = bool(np.isfinite(flat).all())
        stats = batch_stats(batch)
        stats.update(task=task_name, loss=loss, grad_norm=float(np.linalg.norm(flat)) if finite else float("nan"),
                     finite=finite, seconds=time.perf_counter() - t0, seconds_sample=t1 - t0, **parts)
        return flat, stats

    # -- the outer loop as PPO (meta.outer_epochs x outer_minibatches steps; metarl.core.outer) ---------
    def evaluate_rounds(self, task_name: str, theta_prime: np.ndarray, theta: np.ndarray,
                        iteration: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Member step of PPO's outer loop: roll out theta' on this task, keep the rollout for the
        later outer steps of this iteration, and return the first step's gradient (PPO's loss on
        the first minibatch) with the rollout's stats."""
        t0 = time.perf_counter()
        task = self._task(task_name)
        tp = self._params(theta_prime)
        batch = task.sample(self.model, tp)
        t1 = time.perf_counter()
        m = outer_mod.Member.of(task, batch, tp, self._params(theta))
        self._members[task_name] = m
        self._indices[task_name] = self._plan().indices(m.samples, iteration, m.adv.device)
        flat, parts = self._member_grad(task_name, 0, tp)
        stats = batch_stats(batch)
        stats.update(task=task_name, seconds=time.perf_counter() - t0, seconds_sample=t1 - t0, **parts)
        return flat, stats

    def round_grad(self, task_name: str, r: int, theta: np.ndarray,
                   theta_prime: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Outer step r of this iteration: the member's gradient at theta' on its r-th minibatch,
        theta' given (the exact rule: the leader redid its inner steps from theta) or shifted by
        theta's displacement since the rollout (the shift rule)."""
        m = self._members.get(task_name)
        if m is None:
            raise RuntimeError(f"task {task_name!r}: round_grad called before evaluate_rounds on this worker")
        tp = (self._params(theta_prime) if theta_prime is not None
              else outer_mod.shifted(m.theta_prime0, m.theta0, self._params(theta)))
        return self._member_grad(task_name, r, tp)

    def readapt(self, task_name: str, theta: np.ndarray) -> np.ndarray:
        """Leader step of the exact rule: theta' redone from `theta` on the kept adaptation batches."""
        a = self._kept_adaptation(task_name)
        return self.spec.flatten(outer_mod.readapt(self._task(task_name), self.model, self._params(theta), a.batches,
                                                   self.inner_lr))

    def adaptation_batches(self, task_name: str) -> list[dict[str, Any]]:
        """The kept adaptation batches, shipped (meta.grad_on = learner with the exact rule)."""
        return [batch_to_wire(b) for b in self._kept_adaptation(task_name).batches]

    def _kept_adaptation(self, task_name: str) -> meta.Adaptation:
        a = self._adaptations.get(task_name)
        if a is None:
            raise RuntimeError(f"task {task_name!r}: no kept adaptation on this worker (adapt first, keep_adaptation on)")
        return a

    def _plan(self) -> "outer_mod.Plan":
        if self.plan is None:
            raise RuntimeError("this worker was started without an outer-loop plan (meta.outer_epochs etc.)")
        return self.plan

    def _member_grad(self, task_name: str, r: int, theta_prime) -> tuple[np.ndarray, dict[str, Any]]:
        grads, loss, parts = outer_mod.member_grad(self.model, self._members[task_name], theta_prime,
                                                   self._indices[task_name][r], self._plan().clip)
        flat = self.spec.flatten_grads(grads)
        finite = bool(np.isfinite(flat).all()) and bool(torch.isfinite(loss))
        return flat, {"loss": float(loss), "grad_norm": float(np.linalg.norm(flat)) if finite else float("nan"),
                      "finite": finite, **{k: float(v) for k, v in parts.items()}}

    def rollout(self, task_name: str, theta_prime: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
        """Member step when gradients are computed on the learner (meta.grad_on = learner): roll
        out theta' on this task and ship the batch itself; the learner scores it."""
        t0 = time.perf_counter()
        batch = self._task(task_name).sample(self.model, self._params(theta_prime))
        stats = batch_stats(batch)
        stats.update(task=task_name, seconds=time.perf_counter() - t0, seconds_sample=time.perf_counter() - t0)
        return batch_to_wire(batch), stats

    def maml_correct(self, task_name: str, *member_grads: np.ndarray) -> np.ndarray:
        """Leader step for MAML: pull the group's summed first-order gradient back through this
        task's inner updates with chained Hessian-vector products (one backward per group)."""
        a = self._adaptations.pop(task_name, None)
        if a is None:
            raise RuntimeError(f"task {task_name!r}: maml_correct called before adapt on this worker")
        v = np.sum(np.stack(member_grads), axis=0) if len(member_grads) > 1 else member_grads[0]
        v_params = self._params(v)
        out = meta.maml_backward(self._task(task_name), self.model, a, self.inner_lr, tuple(v_params.values()))
        return self.spec.flatten_grads(out)

    def reptile(self, task_name: str, theta: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Reptile: theta - theta' after S inner steps (no evaluation rollout)."""
        theta_prime, stats = self.adapt(task_name, theta)
        direction = theta - theta_prime
        stats.update(finite=bool(np.isfinite(direction).all()), grad_norm=float(np.linalg.norm(direction)))
        return direction, stats

    def groups_step(self, theta: np.ndarray, iteration: int, groups: list[meta.Group],
                    algo: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Stacked mode (meta.task_batching): the whole of `groups` in one call, every group's
        leader and members computed together on the family's TaskStack. Task indices are places
        in this worker's task list (in stacked mode every worker holds every task); each task's
        data RNG restarts from (its seed, iteration), so the data do not depend on which worker
        computes the group. Returns the summed meta-gradient (flat) and per-task statistics."""
        t0 = time.perf_counter()
        self._region = None  # the last iteration's batches and graphs go before this one's are built
        if self._stack is None:
            self._stack = self.family.make_stack(list(self.tasks.values()))
            if self._stack is None:
                raise RuntimeError(f"{type(self.family).__name__} has no stacked form; set meta.task_batching = per_task")
        names = list(self.tasks)
        for i in {i for g in groups for i in g.members}:
            self.tasks[names[i]].reseed(iteration_seed(self.seeds[names[i]], iteration), redraw=self.resample)
        keep = [] if self.outer == "trpo" and algo != "reptile" else None
        grads, adapt_stats, eval_stats = meta.groups_step(self._stack, self.model, self._params(theta), groups, algo,
                                                         self.inner_lr, self.inner_steps, self.step_loss, keep)
        if keep is not None:  # curvature subsamples seeded by (task, iteration), like the data
            row_seed = lambda i, salt: iteration_seed(self.seeds[names[i]] + salt, iteration)  # noqa: E731
            self._region = meta.TrustRegion(
                self._stack, self.model, *keep, second_order=algo == "maml", inner_lr=self.inner_lr,
                fraction=self.fisher_fraction,
                row_seeds=([row_seed(g.leader, 1) for g in groups], [row_seed(j, 2) for g in groups for j in g.members]))
        flat = self.spec.flatten_grads(grads)
        return flat, {"adapt": adapt_stats, "eval": eval_stats, "finite": bool(np.isfinite(flat).all()),
                      "seconds": time.perf_counter() - t0}

    def region_fvp(self, v: np.ndarray) -> np.ndarray:
        """meta.outer = trpo: the KL's Hessian times v, summed over this worker's members of the
        last groups_step (flat, like a gradient)."""
        return self.spec.flatten_grads(self._kept_region().fvp(tuple(self._params(v).values())))

    def region_objective(self, theta: np.ndarray) -> tuple[float, float]:
        """meta.outer = trpo: (sum of surrogate losses, sum of mean KLs) over the last groups_step's
        members, with theta' re-derived from the candidate theta on the stored adaptation batches."""
        return self._kept_region().objective(self._params(theta))

    def _kept_region(self) -> meta.TrustRegion:
        if self._region is None:
            raise RuntimeError("no trust region kept: groups_step with meta.outer = trpo must come first")
        return self._region

    def close(self) -> None:
        for t in self.tasks.values():
            t.close()
