"""`metarl run`: start the actors, run meta-iterations, log, checkpoint, resume.

One function, `meta_iteration`, is the hot path, readable top to bottom:
group -> theta by reference -> leaders adapt -> members evaluate -> gather -> guard -> step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl import checkpoint, config as config_mod, trust
from metarl.backend import LocalBackend, RayBackend
from metarl.checkpoint import RunDirError
from metarl.config import Config
from metarl.learner import Learner
from metarl.meta import ALGORITHMS, Algorithm, Group, group_sizes, make_groups
from metarl.tasks import make_family
from metarl.tracking import Progress, Tracker, read_metrics
from metarl.worker import TaskWorker


def task_seed(seed: int, index: int) -> int:
    """Each task's RNG/emulator seed depends on the run seed and the task's place in the list,
    not on which worker owns it."""
    return int(seed) * 10_007 + 7919 * (index + 1)


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
    nodes: list[str] = field(default_factory=list)
    """the Ray node of each worker at start-up (ray.grad_reduce = node groups workers by it)"""


def resolve_grad_on(cfg: Config, learner_gpus: float) -> str:
    """meta.grad_on auto: on the learner when it has a GPU and the workers have none (a GPU
    backward outruns a CPU core by far more than shipping a batch costs), else where the data is
    (on CPU, `metarl bench` measured workers 1.76x faster than one learner core)."""
    if cfg.meta.grad_on != "auto":
        return cfg.meta.grad_on
    a = ALGORITHMS[cfg.meta.algo]
    shippable = a.evaluates and not a.corrects and cfg.tasks.family == "atari"  # first-order Atari batches
    return "learner" if shippable and learner_gpus > 0 and cfg.ray.gpus_per_worker == 0 else "worker"


def resolve_stacked(cfg: Config) -> bool:
    """meta.task_batching auto: stacked wherever the family has a stacked form (cheap tasks, where
    one call per task costs more than the task itself)."""
    if cfg.meta.task_batching == "auto":
        return cfg.tasks.family in config_mod.STACKED_FAMILIES
    return cfg.meta.task_batching == "stacked"


def _packs(node_cpus: list[float], learner_cpus: float, cpw: float, n_workers: int) -> bool:
    """Learner on the largest node, then as many workers per node as fit."""
    free = sorted(node_cpus, reverse=True)
    if not free or free[0] + 1e-9 < learner_cpus:
        return False
    free[0] -= learner_cpus
    return cpw <= 0 or sum(int((f + 1e-9) // cpw) for f in free) >= n_workers


def plan_resources(cfg: Config, available_cpus: float, has_gpu: bool,
                   node_cpus: list[float] | None = None) -> tuple[float, float, float, list[str]]:
    """(cpus per worker, learner cpus, learner gpus, notes): shrink fractional CPUs so all actors
    fit the CPUs Ray has, node by node, and give the learner a GPU when asked or when 'auto'
    finds one. (An autoscaling cluster that will add nodes should pass node_cpus=None.)"""
    notes = []
    W = cfg.num_workers
    cpw, learner_cpus = cfg.ray.cpus_per_worker, 1.0
    need = W * cpw + learner_cpus
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
    learner_gpus = {"0": 0.0, "1": 1.0}.get(cfg.ray.learner_gpus, 1.0 if has_gpu else 0.0)
    return cpw, learner_cpus, learner_gpus, notes


def check_fits(cfg: Config, family: Any, node_memory: list[float], node_cpus: list[float], stacked: bool) -> None:
    """Refuse, before any actor starts, a config the cluster cannot hold: a worker's rollout
    buffers (tasks it holds x env.num_envs x env.rollout_len observations) beyond the memory Ray
    reports for its largest node, or more emulator threads per task than that node has cores."""
    GB = 1024**3
    per_task = cfg.env.num_envs * cfg.env.rollout_len * family.obs_bytes
    tasks = cfg.num_tasks if stacked else math.ceil(cfg.num_tasks / max(cfg.num_workers, 1))
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
    check_fits(cfg, family, backend.node_memory(), backend.node_cpus(), resolve_stacked(cfg))
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
    stacked = resolve_stacked(cfg)
    assignment: list[dict[str, int]] = [{} for _ in range(W)]
    owner = {}
    for i, name in enumerate(cfg.tasks.train):
        for w in (range(W) if stacked else [i % W]):  # stacked: tasks are cheap, every worker holds all
            assignment[w][name] = task_seed(m.seed, i)
        owner[name] = i % W
    worker_device = "cuda" if cfg.ray.gpus_per_worker > 0 and not local else "cpu"
    workers = [
        backend.actor(worker_cls, family, seeds, m.inner_lr, m.inner_steps, ALGORITHMS[m.algo].corrects, 1, worker_device,
                      num_cpus=cpw, num_gpus=0.0 if local else cfg.ray.gpus_per_worker,
                      restarts=cfg.ray.max_worker_restarts,
                      kwargs={"resample": cfg.tasks.resample, "step_loss": m.step_loss, "outer": m.outer,
                              "fisher_fraction": m.fisher_fraction})
        for seeds in assignment
    ]
    info = backend.get(backend.call(learner, "info"))
    grad_on = resolve_grad_on(cfg, lgpu)
    notes.append(f"evaluation gradients on the {grad_on}" + (" (batches shipped to it)" if grad_on == "learner" else "s"))
    if stacked:
        notes.append(f"stacked tasks: each of the {W} workers computes whole groups in one batched call per iteration")
    if m.outer == "trpo":
        notes.append(f"outer step: trpo (mean KL <= {m.max_kl}, {m.cg_iters} CG iterations on "
                     f"{m.fisher_fraction:.0%} of the samples), searched by the driver with the workers' products")
    nodes = [w["node"] for w in backend.get([backend.call(w, "info") for w in workers])]
    if cfg.ray.grad_reduce != "task" and grad_on == "worker":
        notes.append(f"gradients summed per {cfg.ray.grad_reduce} before the learner "
                     f"({len(workers) if cfg.ray.grad_reduce == 'worker' else len(set(nodes))} messages per iteration)")
    return Fleet(backend, learner, workers, owner, info, notes, grad_on, stacked, m.outer,
                 {"max_kl": m.max_kl, "cg_iters": m.cg_iters}, cfg.ray.grad_reduce, nodes)


# ------------------------------------------------------------------------------------------
# the meta-iteration


class Failure(str):
    """Why a call gave no result: the text the metrics show (`drop_reasons`) and its kind —
    died (the actor or its node is gone), raised (the call threw), timed_out (no answer in time)."""

    kind: str

    def __new__(cls, text: str, kind: str) -> "Failure":
        out = super().__new__(cls, text)
        out.kind = kind
        return out

    def at(self, where: str) -> "Failure":
        """The same failure, its text prefixed by the step it happened in."""
        return Failure(f"{where}: {self}", self.kind)


def failure_kind(e: BaseException) -> str:
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # --local without Ray installed: every failure is the call's own
        return "raised"
    return "died" if isinstance(e, RayActorError) else "raised"


def _gather(backend: Any, named_refs: dict[Any, Any], timeout: float) -> tuple[dict[Any, Any], dict[Any, Failure]]:
    """Wait for every ref (one shared deadline); return (results, failures with their kind and reason)."""
    ready, pending = backend.wait(list(named_refs.values()), timeout)
    pending_ids = {id(r) for r in pending}
    results, failed = {}, {}
    for key, ref in named_refs.items():
        if id(ref) in pending_ids:
            failed[key] = Failure(f"no answer within {timeout:g}s", "timed_out")
            continue
        try:
            results[key] = backend.get(ref)
        except Exception as e:  # RayActorError (died), RayTaskError (raised), or a local exception
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failed[key] = Failure(f"{type(e).__name__}: {text}", failure_kind(e))
    return results, failed


@dataclass
class GradPart:
    """One gradient on its way to the learner: which worker holds it, which tasks it sums, how
    many evaluations it counts."""

    worker: int
    tasks: list[int]
    ref: Any
    count: int
    finite: bool = True
    """False when a worker's own sum (stacked mode) is not finite although its tasks were"""


def reduce_grads(fleet: Fleet, parts: list[GradPart], timeout: float,
                 per_worker_done: bool = False) -> tuple[list[Any], int, dict[int, str]]:
    """Sum the parts where they lie (ray.grad_reduce): one sum per worker, then, with `node`, one
    per node (summed by one of its workers), so the learner receives one message per worker or
    node instead of one per task. Returns (refs for the learner, evaluations they count, tasks
    dropped because their sum failed, with the reason): a failed sum drops exactly its tasks."""
    if fleet.reduce == "task" or not parts:
        return [p.ref for p in parts], sum(p.count for p in parts), {}
    dropped: dict[int, str] = {}
    levels = (["worker"] if not per_worker_done else []) + (["node"] if fleet.reduce == "node" else [])
    for level in levels:
        key = (lambda p: p.worker) if level == "worker" else (lambda p: fleet.nodes[p.worker] if fleet.nodes else "")
        parts, failed = _sum_parts(fleet, parts, key, timeout)
        dropped.update({i: why.at(f"reduce ({level})") for i, why in failed.items()})
    return [p.ref for p in parts], sum(p.count for p in parts), dropped


def _sum_parts(fleet: Fleet, parts: list[GradPart], key: Any, timeout: float) -> tuple[list[GradPart], dict[int, str]]:
    """One `reduce` call per key (on the first part's worker) over the parts sharing that key;
    only the calls' small statuses come back to the driver, the sums stay in the object store."""
    b = fleet.backend
    groups: dict[Any, list[GradPart]] = {}
    for p in parts:
        groups.setdefault(key(p), []).append(p)
    out, status = [], {}
    for ps in groups.values():
        merged = GradPart(ps[0].worker, [i for p in ps for i in p.tasks], ps[0].ref, sum(p.count for p in ps),
                          all(p.finite for p in ps))
        if len(ps) > 1:
            merged.ref, status[len(out)] = b.call(fleet.workers[ps[0].worker], "reduce", *[p.ref for p in ps],
                                                  num_returns=2)
        out.append(merged)
    _, failed = _gather(b, status, timeout)
    dropped = {i: why for k, why in failed.items() for i in out[k].tasks}
    return [p for k, p in enumerate(out) if k not in failed], dropped


@dataclass
class Collected:
    """What the workers returned for one iteration, before the outer step. Stats are keyed by task
    index; for Reptile `evals` holds the leaders' adaptation stats (their directions are the result)."""

    adapts: dict[int, dict[str, Any]]
    evals: dict[int, dict[str, Any]]
    failed: dict[int, Failure]
    parts: list[GradPart]
    """the gradients (or sums) to reduce and step on, in a fixed order"""
    worker_of: dict[int, int]
    """task index -> the worker whose call answers for it (a timed-out one is killed)"""
    shipped: list[Any] | None = None
    """meta.grad_on = learner: alternating theta' and batch refs the learner scores itself"""
    shipped_tasks: list[int] = field(default_factory=list)
    region_workers: list[Any] = field(default_factory=list)
    """meta.outer = trpo: the workers holding this iteration's trust region"""


def s_ok(stats: dict[str, Any]) -> bool:
    return bool(stats.get("finite", True))


def collect_per_task(fleet: Fleet, tasks: tuple[str, ...], groups: list[Group], algo: Algorithm, theta_ref: Any,
                     timeout: float, iteration: int) -> Collected:
    """Task by task: one call per leader adaptation and per member evaluation (theta and theta' by
    reference; every adapt is submitted before any evaluate, so no actor waits on a theta' queued
    behind its own work), then MAML's corrections on the leaders."""
    b, t_start = fleet.backend, time.perf_counter()
    worker_of = {i: fleet.owner[name] for i, name in enumerate(tasks)}
    on_learner = fleet.grad_on == "learner" and algo.evaluates and not algo.corrects
    tp_refs, adapt_refs = {}, {}
    for g in groups:
        tp_refs[g.leader], adapt_refs[g.leader] = b.call(fleet.workers[worker_of[g.leader]], algo.leader_call,
                                                         tasks[g.leader], theta_ref, num_returns=2)
    grad_refs, eval_refs, leader_of = ({}, {}, {}) if algo.evaluates else (dict(tp_refs), {}, {})
    for g in groups if algo.evaluates else ():
        for j in g.members:
            leader_of[j] = g.leader
            grad_refs[j], eval_refs[j] = b.call(fleet.workers[worker_of[j]], "rollout" if on_learner else "evaluate",
                                                tasks[j], tp_refs[g.leader], num_returns=2)
    adapts, adapt_failed = _gather(b, adapt_refs, timeout)
    evals, eval_failed = _gather(b, eval_refs, max(timeout - (time.perf_counter() - t_start), 1.0))
    if not algo.evaluates:
        evals = dict(adapts)
    failed = {**{i: r.at("adapt") for i, r in adapt_failed.items()},
              **{i: r.at("evaluate") for i, r in eval_failed.items()}}
    ok = {g.leader: [j for j in algo.gradient_tasks(g) if g.leader in adapts and j in evals and s_ok(evals[j])]
          for g in groups}
    if algo.corrects:  # each leader pulls its group's summed gradient back through its inner steps
        corr_refs = {g.leader: b.call(fleet.workers[worker_of[g.leader]], "maml_correct", tasks[g.leader],
                                      *[grad_refs[j] for j in ok[g.leader]]) for g in groups if ok[g.leader]}
        _, corr_failed = _gather(b, corr_refs, timeout)
        for i, r in corr_failed.items():
            failed[i], ok[i] = r.at("maml_correct"), []
        parts = [GradPart(worker_of[i], ok[i], corr_refs[i], len(ok[i])) for i in corr_refs if ok[i]]
    else:
        parts = [GradPart(worker_of[j], [j], grad_refs[j], 1) for members in ok.values() for j in members]
    out = Collected(adapts, evals, failed, parts, worker_of)
    if on_learner:  # members shipped their batches; the learner computes the gradients
        out.shipped_tasks = [j for members in ok.values() for j in members]
        out.shipped = [ref for j in out.shipped_tasks for ref in (tp_refs[leader_of[j]], grad_refs[j])]
    return out


def deal_groups(groups: list[Group], n_workers: int) -> list[list[Group]]:
    """Whole groups to workers, the largest first to the least loaded (load: members + 1 for the
    leader's adaptation), so every worker gets about the same work."""
    shares: list[list[Group]] = [[] for _ in range(n_workers)]
    load = [0] * n_workers
    for g in sorted(groups, key=lambda g: -len(g.members)):
        w = load.index(min(load))
        shares[w].append(g)
        load[w] += len(g.members) + 1
    return shares


def collect_stacked(fleet: Fleet, tasks: tuple[str, ...], groups: list[Group], algo: Algorithm, theta_ref: Any,
                    timeout: float, iteration: int) -> Collected:
    """Stacked tasks: one call per worker, each computing whole groups (leaders adapt, members
    evaluate, MAML corrections) and returning their summed meta-gradient. A worker call that fails
    drops every task of its groups."""
    b = fleet.backend
    shares = deal_groups(groups, len(fleet.workers))
    calls = {w: b.call(fleet.workers[w], "groups_step", theta_ref, iteration, share, algo.name, num_returns=2)
             for w, share in enumerate(shares) if share}
    stats, failed_w = _gather(b, {w: c[1] for w, c in calls.items()}, timeout)
    adapts, evals, failed, worker_of = {}, {}, {}, {}
    for w, share in enumerate(shares):
        for g in share:
            worker_of.update({i: w for i in (g.leader, *g.members)})
            for i in algo.gradient_tasks(g) if w in failed_w else ():
                failed[i] = failed_w[w].at("groups_step")
    parts = []
    for w, st in stats.items():
        adapts.update(st["adapt"])
        mine = st["eval"] if algo.evaluates else st["adapt"]
        evals.update(mine)
        parts.append(GradPart(w, sorted(mine), calls[w][0], len(mine), finite=st["finite"]))
    return Collected(adapts, evals, failed, parts, worker_of, region_workers=[fleet.workers[w] for w in stats])


def meta_iteration(fleet: Fleet, tasks: tuple[str, ...], groups: list[Group], algo: str,
                   timeout: float, iteration: int = 0) -> dict[str, Any]:
    """One meta-iteration with task skipping:
    group -> theta by reference -> leaders adapt -> members evaluate -> gather -> reduce -> guard
    -> outer step -> metrics. Stacked or task by task, only the collection differs. Rule for faults:
    a task whose call dies, raises or hangs is dropped from this iteration (a dead leader drops its
    whole group); theta is updated from the remaining finite gradients, averaged over the
    evaluations that completed, and the metrics name every dropped task. A hung worker is killed
    so Ray restarts it."""
    b, a, t_start = fleet.backend, ALGORITHMS[algo], time.perf_counter()
    theta_ref = b.call(fleet.learner, "get_theta")  # stays in the object store; passed by reference
    collect = collect_stacked if fleet.stacked else collect_per_task
    c = collect(fleet, tasks, groups, a, theta_ref, timeout, iteration)
    nonfinite = (sorted(tasks[j] for j, s in c.evals.items() if not s_ok(s))
                 or [f"sum of worker {p.worker}" for p in c.parts if not p.finite])  # all finite, yet a sum overflowed
    t_learn = time.perf_counter()
    if c.shipped is None:  # summed where they lie (ray.grad_reduce): the learner's ingest grows with workers
        refs, n_ok, dropped = reduce_grads(fleet, c.parts, timeout, per_worker_done=fleet.stacked)
        c.failed.update(dropped)
    else:
        refs, n_ok = [], len(c.shipped_tasks)
    if n_ok == 0 or nonfinite:
        lstats = b.get(b.call(fleet.learner, "skip_step"))
    elif c.shipped is not None:
        lstats = b.get(b.call(fleet.learner, "step_on_batches", n_ok, *c.shipped), timeout=timeout)
        for j, loss, norm in zip(c.shipped_tasks, lstats["losses"], lstats["grad_norms"]):
            c.evals[j].update(loss=loss, grad_norm=norm, finite=math.isfinite(norm))
        nonfinite = sorted(tasks[c.shipped_tasks[p]] for p in lstats["nonfinite"])
    elif fleet.outer == "trpo" and a.evaluates:
        lstats = trust_step(fleet, theta_ref, c.region_workers, refs, n_ok, timeout)
    else:
        lstats = b.get(b.call(fleet.learner, "step", n_ok, *refs), timeout=timeout)
    learner_s = time.perf_counter() - t_learn
    for w in {c.worker_of[i] for i, why in c.failed.items() if why.kind == "timed_out"}:
        b.kill(fleet.workers[w])  # Ray restarts it for the next iteration
    return summarize(tasks, groups, a, c, n_ok, nonfinite, lstats, time.perf_counter() - t_start, learner_s)


class WorkerFailed(RuntimeError):
    """A worker died, raised or ran out of time while answering the trust-region search."""


def trust_step(fleet: Fleet, theta_ref: Any, workers: list[Any], grad_refs: list[Any], n_ok: int,
               timeout: float) -> dict[str, Any]:
    """meta.outer = trpo: the KL-constrained step (metarl.trust) from theta_ref, searched here with
    the curvature products and objective values of the workers that completed this iteration (each
    over its own groups, summed, averaged over the n_ok evaluations), then handed to the learner. A
    worker that fails during the search leaves theta unchanged for this iteration."""
    b, m = fleet.backend, fleet.trust
    deadline = time.perf_counter() + timeout  # one budget for the whole search

    def over_workers(method: str, x: np.ndarray) -> list[Any]:
        ref = b.put(x.astype(np.float32))
        try:
            return b.get([b.call(w, method, ref) for w in workers], timeout=max(deadline - time.perf_counter(), 1.0))
        except Exception as exc:  # noqa: BLE001 - a worker died, raised or ran out of time
            raise WorkerFailed(f"{method}: {type(exc).__name__}: {exc}"[:300]) from exc

    def fvp(v: np.ndarray) -> np.ndarray:
        return np.sum([np.asarray(p, dtype=np.float64) for p in over_workers("region_fvp", v)], 0) / n_ok

    def objective(theta: np.ndarray) -> tuple[float, float]:
        parts = over_workers("region_objective", theta)
        return sum(p[0] for p in parts) / n_ok, sum(p[1] for p in parts) / n_ok

    theta = np.asarray(b.get(theta_ref), dtype=np.float64)  # the theta this iteration's groups started from
    g = np.sum([np.asarray(x, dtype=np.float64) for x in b.get(grad_refs, timeout=timeout)], 0) / n_ok
    try:
        res = trust.trust_region_step(theta, g, fvp, objective, m["max_kl"], m["cg_iters"])
    except WorkerFailed as exc:  # theta stays; the driver's own errors are not caught here
        print(f"warning: trust-region step skipped, theta unchanged this iteration: {exc}", file=sys.stderr)
        out = b.get(b.call(fleet.learner, "skip_step"))
        return {**out, "trust/error": str(exc)}
    stats = {"kl": res.kl, "step_fraction": res.fraction, "surrogate_gain": res.surrogate_before - res.surrogate_after,
             "cg_residual": res.cg_residual, "full_step_norm": res.full_step_norm}
    return b.get(b.call(fleet.learner, "assign", res.theta, float(np.linalg.norm(g)), res.accepted, stats),
                 timeout=timeout)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarize(tasks: tuple[str, ...], groups: list[Group], a: Algorithm, c: Collected, n_ok: int,
              nonfinite: list[str], lstats: dict[str, Any], wall: float, learner_s: float) -> dict[str, Any]:
    """The metrics row of one iteration (see README: Metrics)."""
    adapt_stats, eval_stats = c.adapts, (c.evals if a.evaluates else {})
    failed, nan = c.failed, float("nan")
    rec: dict[str, Any] = {
        "algo": a.name, "groups": len(groups),
        # inner adaptations that took steps (meta.inner_steps = 0, joint pre-training, takes none)
        "adaptations": sum(1 for s in adapt_stats.values() if s["inner_losses"]),
        "evaluations": len(eval_stats),
        "evaluations_used": n_ok,
        "group_sizes": [len(g.members) for g in groups],
        "env_steps/adapt": int(sum(s["env_steps"] for s in adapt_stats.values())),
        "env_steps/eval": int(sum(s["env_steps"] for s in eval_stats.values())),
        "frames/adapt": int(sum(s["frames"] for s in adapt_stats.values())),
        "frames/eval": int(sum(s["frames"] for s in eval_stats.values())),
        "return/pre": _mean([r for s in adapt_stats.values() for r in s["returns"]]),
        "return/post": _mean([r for s in eval_stats.values() for r in s["returns"]]),
        "reward_per_step/pre": _mean([s["reward_sum"] / max(s["env_steps"], 1) for s in adapt_stats.values()]),
        "reward_per_step/post": _mean([s["reward_sum"] / max(s["env_steps"], 1) for s in eval_stats.values()]),
        "loss/inner": _mean([s["inner_losses"][0] for s in adapt_stats.values() if s["inner_losses"]]),
        "loss/outer": _mean([s.get("loss", nan) for s in eval_stats.values()]),
        "grad/norm": lstats["grad_norm"], "grad/update_norm": lstats["update_norm"],
        "outer_lr": lstats.get("outer_lr", float("nan")), "theta_norm": lstats["theta_norm"],
        "update_skipped": bool(lstats["update_skipped"]),
        # what reached the learner this iteration (ray.grad_reduce decides how many messages)
        "learner/ingest_messages": int(lstats.get("ingest_messages", 0)),
        "learner/ingest_bytes": int(lstats.get("ingest_bytes", 0)),
        **{k: v for k, v in lstats.items() if k.startswith("trust/")},
        "tasks_dropped": sorted(tasks[i] for i in failed), "drop_reasons": {tasks[i]: str(r) for i, r in failed.items()},
        "drop_kinds": {tasks[i]: r.kind for i, r in failed.items()},
        "nonfinite_tasks": nonfinite,
        "time/iteration_s": wall, "time/learner_s": learner_s,
        "time/adapt_s": float(sum(s["seconds"] for s in adapt_stats.values())),
        "time/eval_s": float(sum(s["seconds"] for s in eval_stats.values())),
    }
    # per task: the mean return of the episodes that ended in this iteration's rollouts, and the
    # episodes themselves (lists go to metrics.jsonl only; `metarl curve` draws them against frames)
    for i, s in adapt_stats.items():
        rec[f"return_pre/{tasks[i]}"] = _mean(s["returns"])
        rec[f"episodes_pre/{tasks[i]}"] = [float(r) for r in s["returns"]]
    for j, s in eval_stats.items():
        rec[f"return_post/{tasks[j]}"] = _mean(s["returns"])
        rec[f"episodes_post/{tasks[j]}"] = [float(r) for r in s["returns"]]
    return rec


# ------------------------------------------------------------------------------------------
# the run


def prepare_run_dir(out: Path, resume: bool) -> Path | None:
    """Refuse to reuse a directory unless resuming; return the checkpoint to resume from."""
    out = Path(out)
    if resume:
        if not out.is_dir():
            raise RunDirError(f"--resume: run directory '{out}' does not exist; drop --resume to start a new run")
        ckpt = checkpoint.latest(out)
        if ckpt is None:
            raise RunDirError(f"--resume: '{out}' has no checkpoint yet; start a new run with another --out")
        return ckpt
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"run directory '{out}' already exists; pass --resume to continue it or --out for a new one")
    return None


def run(cfg: Config, out: Path, resume: bool = False, local: bool = False, log=print) -> dict[str, Any]:
    """Meta-train as cfg says, writing everything to `out`. Returns the final summary."""
    out = Path(out)
    ckpt_path = prepare_run_dir(out, resume)
    state = checkpoint.load(ckpt_path) if ckpt_path else None
    if state is not None and "config" in state:
        old, now = state["config"], config_mod.to_dict(cfg)
        for key, names in (("tasks", ("family", "train")), ("meta", ("algo", "skip", "outer"))):
            for k in names:
                was = old.get(key, {}).get(k, "adam" if k == "outer" else None)  # runs before meta.outer: adam
                if was is not None and was != now[key][k]:
                    raise RunDirError(f"--resume: {key}.{k} was {was!r} in '{out}', now {now[key][k]!r}; "
                                      f"resume with the same settings")
    N, k = cfg.num_tasks, cfg.meta.skip
    sizes = group_sizes(N, k)
    if N % k:
        log(f"note: skip {k} does not divide {N} tasks: groups of sizes {sizes} (the last one smaller)")
    if not ALGORITHMS[cfg.meta.algo].evaluates and k > 1:
        log("note: reptile ignores evaluation; with skip > 1 only the group leaders' directions are used")

    fleet = start_fleet(cfg, local)  # refuses a config the cluster cannot hold before the run dir is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    for n in fleet.notes:
        log(f"note: {n}")
    write_actors_file(out, fleet)
    start_iter, counters = 0, {"env_steps": 0, "frames": 0, "wall_s": 0.0}
    rng = np.random.default_rng(cfg.meta.seed)
    if state is not None:
        fleet.backend.get(fleet.backend.call(fleet.learner, "load_state", state))
        start_iter = int(state["iteration"])
        rng.bit_generator.state = state["rng"]
        counters.update(state.get("counters", {}))
        _discard_rows_after(out, start_iter)
        log(f"resuming '{out}' from {ckpt_path.name} at iteration {start_iter}")
    log(f"metarl run: {N} tasks, algo {cfg.meta.algo}, skip {k} -> {len(sizes)} adaptations and "
        f"{N if ALGORITHMS[cfg.meta.algo].evaluates else 0} evaluations per iteration; {len(fleet.workers)} workers "
        f"({fleet.backend.name}), learner on {fleet.learner_info['device']}; writing to {out}")

    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment, name=cfg.run_name,
                      config={**config_mod.to_dict(cfg), "skip": k, "algo": cfg.meta.algo,
                              "fold": "+".join(cfg.tasks.heldout)}, mode=cfg.log.wandb_mode,
                      step_key="frames/total")
    progress = Progress(cfg.meta.iterations, start_iter, cfg.log.progress)
    rec: dict[str, Any] = {}
    window: list[dict[str, Any]] = []  # iterations since the last logged row (log.every)
    failing_since: dict[str, float] = {}  # task -> time of the first drop in its current streak
    try:
        for it in range(start_iter, cfg.meta.iterations):
            groups = make_groups(N, k, rng)
            rec = meta_iteration(fleet, cfg.tasks.train, groups, cfg.meta.algo, cfg.ray.call_timeout_s, it)
            now = time.time()
            for name in cfg.tasks.train:
                if name in rec["tasks_dropped"]:
                    failing_since.setdefault(name, now)
                else:
                    failing_since.pop(name, None)
            for name, why in rec["drop_reasons"].items():
                log(f"warning: iteration {it + 1}: task {name} dropped ({why})")
            counters["env_steps"] += rec["env_steps/adapt"] + rec["env_steps/eval"]
            counters["frames"] += rec["frames/adapt"] + rec["frames/eval"]
            counters["wall_s"] += rec["time/iteration_s"]
            rec = {"iteration": it + 1, "skip": k, **rec, "env_steps/total": counters["env_steps"],
                   "frames/total": counters["frames"], "time/wall_s": counters["wall_s"],
                   "speed/env_steps_per_s": (rec["env_steps/adapt"] + rec["env_steps/eval"]) / rec["time/iteration_s"]}
            window.append(rec)
            if len(window) == cfg.log.every or it + 1 == cfg.meta.iterations:
                row = merge_window(window)
                tracker.log(row)
                progress.update(row)
                window = []
            lost = [name for name, t0 in failing_since.items() if now - t0 > cfg.ray.task_downtime_s]
            if lost:
                raise RuntimeError(f"task(s) {', '.join(lost)} failed every iteration for over "
                                   f"{cfg.ray.task_downtime_s:g}s (last: {rec['drop_reasons'].get(lost[0])}); "
                                   f"stopping. Resume with --resume --out {out} once the cause is fixed")
            if len(rec["tasks_dropped"]) == N:  # nothing worked: give Ray time to restart actors
                time.sleep(min(2.0 * len(failing_since), 10.0))
            if (it + 1) % cfg.meta.checkpoint_every == 0 or it + 1 == cfg.meta.iterations:
                lstate = fleet.backend.get(fleet.backend.call(fleet.learner, "state"))
                checkpoint.save(out, {**lstate, "rng": rng.bit_generator.state, "counters": dict(counters),
                                      "config": config_mod.to_dict(cfg)})
    finally:
        progress.close()
        tracker.finish()
        for w in fleet.workers:
            try:
                fleet.backend.get(fleet.backend.call(w, "close"), timeout=30)
            except Exception:
                pass
        fleet.backend.shutdown()
    summary = {"iterations": cfg.meta.iterations, "env_steps": counters["env_steps"], "frames": counters["frames"],
               "wall_s": counters["wall_s"], "last": rec, "run_dir": str(out)}
    return summary


_SUMMED = ("tasks_dropped", "nonfinite_tasks")


def merge_window(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One logged row for the iterations in `rows` (log.every): the last row's counters and
    identity, every other number averaged, drops and non-finite tasks listed over the window,
    `updates_skipped` counted. A window of one is the row itself."""
    if len(rows) == 1:
        return rows[0]
    last = rows[-1]
    out = {k: v for r in rows for k, v in r.items()}  # keys some rows lack (trust/*) come from the others
    out.update(last)
    for key, v in out.items():
        if key in ("iteration", "skip") or key.endswith("/total") or key == "time/wall_s":
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            out[key] = v if all(x == v for x in values) else _mean(values)
    for key in _SUMMED:
        out[key] = sorted({t for r in rows for t in r.get(key, [])})
    out["drop_reasons"] = {t: why for r in rows for t, why in r.get("drop_reasons", {}).items()}
    out["drop_kinds"] = {t: kind for r in rows for t, kind in r.get("drop_kinds", {}).items()}
    out["update_skipped"] = any(r["update_skipped"] for r in rows)
    out["updates_skipped"] = sum(bool(r["update_skipped"]) for r in rows)
    out["iterations_in_row"] = len(rows)
    return out


def write_actors_file(out: Path, fleet: Fleet) -> None:
    """actors.json: pid and host of the learner and of every worker with its tasks (operators use
    it to find the process behind a task; the fault-injection tests kill workers by these pids)."""
    infos = [fleet.backend.get(fleet.backend.call(w, "info")) for w in fleet.workers]
    (out / "actors.json").write_text(json.dumps({"backend": fleet.backend.name, "learner": fleet.learner_info,
                                                 "workers": infos}, indent=1))


def _discard_rows_after(out: Path, iteration: int) -> None:
    """Rows logged after the checkpoint we resume from are redone; move them aside, never delete."""
    path = out / "metrics.jsonl"
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("iteration", 0) <= iteration]
    drop = [r for r in rows if r.get("iteration", 0) > iteration]
    if not drop:
        return
    with open(out / "metrics.discarded.jsonl", "a") as f:
        for r in drop:
            f.write(json.dumps(r) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


