"""The fleet of a run: the learner and the task workers, placed on the cluster.

`start_fleet` refuses a config the cluster cannot hold (`check_fits`), plans CPUs and GPUs node by
node (`plan_resources`), decides where evaluation gradients are computed (`resolve_grad_on`: where
`Config.grads_can_ship`, the learner's GPU decides), deals the tasks to the workers (all to every
worker where `Config.stacked`), and starts the actors on a backend (Ray, or this process with --local).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from metarl.core import config as config_mod
from metarl.core.algorithms import ALGORITHMS
from metarl.distributed.backend import LocalBackend, RayBackend
from metarl.core.config import Config
from metarl.distributed.learner import Learner
from metarl.core.meta import InnerPPO
from metarl.core.outer import Plan
from metarl.core.seeds import task_seed
from metarl.tasks import make_family
from metarl.distributed.worker import TaskWorker


# ------------------------------------------------------------------------------------------
# actors


@dataclass
class Fleet:
    backend: Any
    learner: Any
    workers: list[Any]
    owner: dict[str, int]
    """task name -> index of the worker that owns it"""
    learner_info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    grad_on: str = "worker"
    """where evaluation gradients are computed: worker, or learner from shipped batches"""
    stacked: bool = False
    """every worker holds every task and computes whole groups in one batched call"""
    outer: str = "adam"
    """the outer optimiser (meta.outer); trpo's step is searched by the driver (trust_step)"""
    trust: dict[str, Any] = field(default_factory=dict)
    """meta.outer = trpo: max_kl, cg_iters"""
    reduce: str = "task"
    """ray.grad_reduce: where gradients are summed before the learner (task: not at all)"""
    worker_info: list[dict[str, Any]] = field(default_factory=list)
    """each worker's `info()` at start-up: pid, host, Ray node, tasks (actors.json is written from it)"""
    plan: Plan | None = None
    """PPO's outer loop (meta.outer_epochs x outer_minibatches clipped steps); None: one step per iteration"""

    @property
    def nodes(self) -> list[str]:
        """The Ray node of each worker at start-up (ray.grad_reduce = node groups workers by it)."""
        return [w["node"] for w in self.worker_info]


def resolve_grad_on(cfg: Config, learner_gpus: float) -> str:
    """meta.grad_on auto: on the learner when it has a GPU and the workers have none (a GPU
    backward outruns a CPU core by far more than shipping a batch costs), else where the data is
    (on CPU, `metarl bench` measured workers 1.76x faster than one learner core)."""
    if cfg.meta.grad_on != "auto":
        return cfg.meta.grad_on
    return "learner" if cfg.grads_can_ship and learner_gpus > 0 and cfg.ray.gpus_per_worker == 0 else "worker"


def outer_plan(cfg: Config) -> Plan | None:
    """PPO's outer loop for this config, or None for one actor-critic step per iteration (with
    outer_epochs = outer_minibatches = 1 and no clip: the update is exactly that step)."""
    m = cfg.meta
    if not m.reused_outer:
        return None
    return Plan(m.outer_epochs, m.outer_minibatches, m.outer_clip, m.follow, m.inner_lr, m.seed)


def inner_plan(cfg: Config) -> InnerPPO | None:
    """PPO's update as the inner loop (meta.inner_epochs x inner_minibatches > 1), or None for
    one actor-critic SGD step per inner step."""
    m = cfg.meta
    return InnerPPO(m.inner_epochs, m.inner_minibatches, m.inner_clip) if m.inner_updates > 1 else None


def _packs(node_cpus: list[float], learner_cpus: float, cpw: float, n_workers: int) -> bool:
    """Learner on the largest node, then as many workers per node as fit."""
    free = sorted(node_cpus, reverse=True)
    if not free or free[0] + 1e-9 < learner_cpus:
        return False
    free[0] -= learner_cpus
    return cpw <= 0 or sum(int((f + 1e-9) // cpw) for f in free) >= n_workers


LEARNER_CPUS = 1.0
"""CPUs the learner asks for (plan_resources shrinks them with the workers' to fit the cluster)."""


def learner_gpus(cfg: Config, has_gpu: bool) -> float:
    """The learner's GPU: ray.learner_gpus 0 or 1, or (auto) one when the cluster has any."""
    return {"0": 0.0, "1": 1.0}.get(cfg.ray.learner_gpus, 1.0 if has_gpu else 0.0)


def run_cpus(cfg: Config) -> float:
    """The CPUs a run's actors ask for as configured: every worker's share and the learner's."""
    return cfg.num_workers * cfg.ray.cpus_per_worker + LEARNER_CPUS


def run_gpus(cfg: Config, has_gpu: bool) -> float:
    """The GPUs a run's actors ask for: every worker's share and the learner's."""
    return cfg.num_workers * cfg.ray.gpus_per_worker + learner_gpus(cfg, has_gpu)


def plan_resources(cfg: Config, available_cpus: float, has_gpu: bool,
                   node_cpus: list[float] | None = None) -> tuple[float, float, float, list[str]]:
    """(cpus per worker, learner cpus, learner gpus, notes): shrink fractional CPUs so all actors
    fit the CPUs Ray has, node by node, and give the learner a GPU when asked or when 'auto'
    finds one. (An autoscaling cluster that will add nodes should pass node_cpus=None.)"""
    notes = []
    W = cfg.num_workers
    cpw, learner_cpus = cfg.ray.cpus_per_worker, LEARNER_CPUS
    need = run_cpus(cfg)
    if need > available_cpus > 0:
        scale = available_cpus / need
        cpw, learner_cpus = cpw * scale, learner_cpus * scale
        notes.append(f"{W} workers x {cfg.ray.cpus_per_worker} CPUs + learner need {need:g} CPUs, Ray has "
                     f"{available_cpus:g}: using {cpw:.3f} CPUs per worker and {learner_cpus:.3f} for the learner")
    if node_cpus:
        before = (cpw, learner_cpus)
        while not _packs(node_cpus, learner_cpus, cpw, W) and learner_cpus > 1e-3:
            cpw, learner_cpus = cpw * 0.9, learner_cpus * 0.9
        if (cpw, learner_cpus) != before:
            notes.append(f"nodes have {node_cpus} CPUs: using {cpw:.3f} CPUs per worker and "
                         f"{learner_cpus:.3f} for the learner so that every actor fits on a node")
    return cpw, learner_cpus, learner_gpus(cfg, has_gpu), notes


def check_fits(cfg: Config, family: Any, node_memory: list[float], node_cpus: list[float]) -> None:
    """Refuse, before any actor starts, a config the cluster cannot hold: a worker's rollout
    buffers (tasks it holds x env.num_envs x env.rollout_len observations) beyond the memory Ray
    reports for its largest node, or more emulator threads per task than that node has cores."""
    GB = 1024**3
    per_task = cfg.env.num_envs * cfg.env.rollout_len * family.obs_bytes
    tasks = cfg.num_tasks if cfg.stacked else math.ceil(cfg.num_tasks / max(cfg.num_workers, 1))
    memory, cpus = max(node_memory, default=0.0), max(node_cpus, default=0.0)
    if memory and tasks * per_task > memory:
        raise config_mod.ConfigError(
            f"env.num_envs x env.rollout_len = {cfg.env.num_envs:,} x {cfg.env.rollout_len:,} observations of "
            f"{family.obs_bytes:,} bytes is {per_task / GB:,.1f} GB of rollout buffer per task, "
            f"{tasks * per_task / GB:,.1f} GB for a worker's {tasks} task(s); the largest Ray node has "
            f"{memory / GB:,.1f} GB: lower env.num_envs or env.rollout_len, or add ray.workers")
    if cfg.tasks.family == "atari" and cpus and cfg.env.env_threads > cpus:
        raise config_mod.ConfigError(f"env.env_threads = {cfg.env.env_threads} emulator threads per task, but the "
                                     f"largest Ray node has {cpus:g} CPUs: use at most {int(cpus)}")


def start_fleet(cfg: Config, local: bool, backend: Any = None, worker_cls: type = TaskWorker,
                learner_cls: type = Learner, learner_extra: tuple = (), family: Any = None) -> Fleet:
    """The learner and the task workers of a run. `backend` reuses a running one; worker_cls and
    learner_cls are subclasses with extra calls (metarl bench), learner_extra their extra args;
    `family` replaces the config's task family (the scale benchmark's fixture)."""
    family = family or make_family(cfg)
    m = cfg.meta
    if backend is None:
        backend = LocalBackend() if local else RayBackend(cfg.ray.address, cfg.ray.num_cpus)
    check_fits(cfg, family, backend.node_memory(), backend.node_cpus())
    if local:
        cpw, lcpu, lgpu, notes = 0.0, 0.0, 0.0, []
    else:
        res = backend.resources()
        cpw, lcpu, lgpu, notes = plan_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0) > 0,
                                                node_cpus=backend.node_cpus())
        if lgpu and res.get("GPU", 0.0) < 1:
            raise config_mod.ConfigError("ray.learner_gpus = 1 but the Ray cluster has no GPU; use auto or 0")
    learner_device = "cuda" if lgpu else "cpu"
    learner = backend.actor(learner_cls, family, m.seed, m.outer_lr, m.max_grad_norm, learner_device,
                            *learner_extra, num_cpus=lcpu, num_gpus=lgpu, restarts=0,
                            kwargs={"lr_decay": m.outer_lr_decay, "total_iterations": m.iterations})
    W = cfg.num_workers
    assignment: list[dict[str, int]] = [{} for _ in range(W)]
    owner = {}
    for i, name in enumerate(cfg.tasks.train):
        for w in (range(W) if cfg.stacked else [i % W]):  # stacked: tasks are cheap, every worker holds all
            assignment[w][name] = task_seed(m.seed, i)
        owner[name] = i % W
    worker_device = "cuda" if cfg.ray.gpus_per_worker > 0 and not local else "cpu"
    plan = outer_plan(cfg)
    keep = ALGORITHMS[m.algo].corrects or (plan is not None and plan.follow == "exact")
    workers = [
        backend.actor(worker_cls, family, seeds, m.inner_lr, m.inner_steps, keep, 1, worker_device,
                      num_cpus=cpw, num_gpus=0.0 if local else cfg.ray.gpus_per_worker,
                      restarts=cfg.ray.max_worker_restarts,
                      kwargs={"resample": cfg.tasks.resample, "step_loss": m.step_loss, "outer": m.outer,
                              "fisher_fraction": m.fisher_fraction, "plan": plan, "inner": inner_plan(cfg)})
        for seeds in assignment
    ]
    info = backend.get(backend.call(learner, Learner.info))
    grad_on = resolve_grad_on(cfg, lgpu)
    notes.append(f"evaluation gradients on the {grad_on}" + (" (batches shipped to it)" if grad_on == "learner" else "s"))
    if cfg.stacked:
        notes.append(f"stacked tasks: each of the {W} workers computes whole groups in one batched call per iteration")
    if plan is not None:
        where = "on the learner, no round trip" if grad_on == "learner" else f"{plan.updates} round trips to the workers"
        notes.append(f"outer loop: PPO, {plan.epochs} epochs x {plan.minibatches} minibatches = {plan.updates} Adam steps "
                     f"per iteration, clip {plan.clip:g}, theta' follows theta by the {plan.follow} rule ({where})")
    if m.outer == "trpo":
        notes.append(f"outer step: trpo (mean KL <= {m.max_kl}, {m.cg_iters} CG iterations on "
                     f"{m.fisher_fraction:.0%} of the samples), searched by the driver with the workers' products")
    worker_info = backend.get([backend.call(w, TaskWorker.info) for w in workers])
    if cfg.ray.grad_reduce != "task" and grad_on == "worker":
        nodes = len({w["node"] for w in worker_info})
        notes.append(f"gradients summed per {cfg.ray.grad_reduce} before the learner "
                     f"({len(workers) if cfg.ray.grad_reduce == 'worker' else nodes} messages per iteration)")
    return Fleet(backend, learner, workers, owner, info, notes, grad_on, cfg.stacked, m.outer,
                 {"max_kl": m.max_kl, "cg_iters": m.cg_iters}, cfg.ray.grad_reduce, worker_info, plan)
