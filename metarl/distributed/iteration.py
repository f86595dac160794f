"""One meta-iteration with task skipping, readable top to bottom (`meta_iteration`):
group -> theta by reference -> leaders adapt -> members evaluate -> gather -> reduce -> guard ->
outer step -> metrics row. Per-task and stacked execution differ only in how the workers' results
are collected (`collect_per_task`, `collect_stacked`); the fault rule, the gradient reduction, the
outer step (Adam, TRPO, learner-side gradients) and the metrics exist once.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from metarl.core import trust
from metarl.core.algorithms import ALGORITHMS, Algorithm, Group
from metarl.distributed.fleet import Fleet
from metarl.distributed.learner import Learner
from metarl.core.ppo import STAT_KEYS, mean_stats
from metarl.distributed.worker import TaskWorker

LEADER_CALL = {name: getattr(TaskWorker, a.leader_call) for name, a in ALGORITHMS.items()}
"""The worker method each algorithm's leaders run (Algorithm.leader_call), resolved at import."""


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
                 per_worker_done: bool = False) -> tuple[list[Any], int, dict[int, Failure]]:
    """Sum the parts where they lie (ray.grad_reduce): one sum per worker, then, with `node`, one
    per node (summed by one of its workers), so the learner receives one message per worker or
    node instead of one per task. Returns (refs for the learner, evaluations they count, tasks
    dropped because their sum failed, with the reason): a failed sum drops exactly its tasks."""
    if fleet.reduce == "task" or not parts:
        return [p.ref for p in parts], sum(p.count for p in parts), {}
    dropped: dict[int, Failure] = {}
    levels = (["worker"] if not per_worker_done else []) + (["node"] if fleet.reduce == "node" else [])
    for level in levels:
        key = (lambda p: p.worker) if level == "worker" else (lambda p: fleet.nodes[p.worker] if fleet.nodes else "")
        parts, failed = _sum_parts(fleet, parts, key, timeout)
        dropped.update({i: why.at(f"reduce ({level})") for i, why in failed.items()})
    return [p.ref for p in parts], sum(p.count for p in parts), dropped


def _sum_parts(fleet: Fleet, parts: list[GradPart], key: Any, timeout: float) -> tuple[list[GradPart], dict[int, Failure]]:
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
            merged.ref, status[len(out)] = b.call(fleet.workers[ps[0].worker], TaskWorker.reduce, *[p.ref for p in ps],
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
    shipped_groups: list[int] = field(default_factory=list)
    """PPO's outer loop on the learner: the group (place in the iteration's list) of each shipped member"""
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
    on_learner = fleet.grad_on == "learner" and algo.ships
    plan = fleet.plan  # PPO's outer loop: members keep their rollouts for the later outer steps
    tp_refs, adapt_refs, kept_refs = {}, {}, {}
    for g in groups:
        tp_refs[g.leader], adapt_refs[g.leader] = b.call(fleet.workers[worker_of[g.leader]], LEADER_CALL[algo.name],
                                                         tasks[g.leader], theta_ref, num_returns=2)
        if on_learner and plan is not None and plan.follow == "exact":  # the learner redoes the inner steps
            kept_refs[g.leader] = b.call(fleet.workers[worker_of[g.leader]], TaskWorker.adaptation_batches,
                                         tasks[g.leader])
    grad_refs, eval_refs, leader_of = ({}, {}, {}) if algo.evaluates else (dict(tp_refs), {}, {})
    for g in groups if algo.evaluates else ():
        for j in g.members:
            leader_of[j] = g.leader
            w = fleet.workers[worker_of[j]]
            if on_learner:
                grad_refs[j], eval_refs[j] = b.call(w, TaskWorker.rollout, tasks[j], tp_refs[g.leader], num_returns=2)
            elif plan is not None:
                grad_refs[j], eval_refs[j] = b.call(w, TaskWorker.evaluate_rounds, tasks[j], tp_refs[g.leader],
                                                    theta_ref, iteration, num_returns=2)
            else:
                grad_refs[j], eval_refs[j] = b.call(w, TaskWorker.evaluate, tasks[j], tp_refs[g.leader], num_returns=2)
    adapts, adapt_failed = _gather(b, adapt_refs, timeout)
    evals, eval_failed = _gather(b, eval_refs, max(timeout - (time.perf_counter() - t_start), 1.0))
    if not algo.evaluates:
        evals = dict(adapts)
    failed = {**{i: r.at("adapt") for i, r in adapt_failed.items()},
              **{i: r.at("evaluate") for i, r in eval_failed.items()}}
    ok = {g.leader: [j for j in algo.gradient_tasks(g) if g.leader in adapts and j in evals and s_ok(evals[j])]
          for g in groups}
    if algo.corrects:  # each leader pulls its group's summed gradient back through its inner steps
        corr_refs = {g.leader: b.call(fleet.workers[worker_of[g.leader]], TaskWorker.maml_correct, tasks[g.leader],
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
        if plan is None:
            out.shipped = [ref for j in out.shipped_tasks for ref in (tp_refs[leader_of[j]], grad_refs[j])]
        else:  # every group's theta', the leaders' adaptation batches (exact rule), the members' rollouts
            place = {g.leader: n for n, g in enumerate(groups)}
            out.shipped_groups = [place[leader_of[j]] for j in out.shipped_tasks]
            out.shipped = ([tp_refs[g.leader] for g in groups] + [kept_refs[g.leader] for g in groups if kept_refs]
                           + [grad_refs[j] for j in out.shipped_tasks])
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
    calls = {w: b.call(fleet.workers[w], TaskWorker.groups_step, theta_ref, iteration, share, algo.name, num_returns=2)
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
    theta_ref = b.call(fleet.learner, Learner.get_theta)  # stays in the object store; passed by reference
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
        lstats = b.get(b.call(fleet.learner, Learner.skip_step))
    elif c.shipped is not None:
        if fleet.plan is None:
            lstats = b.get(b.call(fleet.learner, Learner.step_on_batches, n_ok, *c.shipped), timeout=timeout)
        else:
            lstats = b.get(b.call(fleet.learner, Learner.step_rounds, fleet.plan, iteration, c.shipped_groups,
                                  len(groups), *c.shipped), timeout=timeout)
        for j, loss, norm in zip(c.shipped_tasks, lstats["losses"], lstats["grad_norms"]):
            c.evals[j].update(loss=loss, grad_norm=norm, finite=math.isfinite(norm))
        nonfinite = sorted(tasks[c.shipped_tasks[p]] for p in lstats["nonfinite"])
    elif fleet.outer == "trpo" and a.evaluates:
        lstats = trust_step(fleet, theta_ref, c.region_workers, refs, n_ok, timeout)
    elif fleet.plan is not None:
        lstats = worker_rounds(fleet, tasks, groups, c, refs, n_ok, timeout, iteration)
        nonfinite = lstats.pop("nonfinite_tasks", [])
    else:
        lstats = b.get(b.call(fleet.learner, Learner.step, n_ok, *refs), timeout=timeout)
    learner_s = time.perf_counter() - t_learn
    for w in {c.worker_of[i] for i, why in c.failed.items() if why.kind == "timed_out"}:
        b.kill(fleet.workers[w])  # Ray restarts it for the next iteration
    return summarize(tasks, groups, a, c, n_ok, nonfinite, lstats, time.perf_counter() - t_start, learner_s)


def worker_rounds(fleet: Fleet, tasks: tuple[str, ...], groups: list[Group], c: Collected, refs: list[Any],
                  n_ok: int, timeout: float, iteration: int) -> dict[str, Any]:
    """PPO's outer loop with gradients on the workers (metarl.core.outer): the first outer step on the
    gradients the members returned with their rollouts, then one round per further step: theta by
    reference -> (exact rule) each leader redoes its inner steps from it -> every member still in
    the iteration returns its next minibatch's gradient at theta' -> reduce -> one Adam step. The
    fault rule holds per round: a task whose call dies, raises or hangs is dropped for the rest of
    the iteration (and named); a non-finite gradient ends the iteration's steps there."""
    b, plan, learner = fleet.backend, fleet.plan, fleet.learner
    total = plan.updates
    leader_of = {j: g.leader for g in groups for j in g.members}
    alive = sorted({j for p in c.parts for j in p.tasks} - set(c.failed))
    steps = [b.get(b.call(learner, Learner.round_step, n_ok, 0, total, *refs), timeout=timeout)]
    parts = [{k: s[k] for k in STAT_KEYS if k in s} for j, s in c.evals.items() if j in alive]
    nonfinite: list[str] = []
    for r in range(1, total):
        theta_ref = b.call(learner, Learner.get_theta)
        tp = ({i: b.call(fleet.workers[c.worker_of[i]], TaskWorker.readapt, tasks[i], theta_ref)
               for i in {leader_of[j] for j in alive}} if plan.follow == "exact" else {})
        calls = {j: b.call(fleet.workers[c.worker_of[j]], TaskWorker.round_grad, tasks[j], r, theta_ref,
                           tp.get(leader_of[j]), num_returns=2) for j in alive}
        got, failed = _gather(b, {j: call[1] for j, call in calls.items()}, timeout)
        c.failed.update({j: why.at(f"outer step {r + 1}") for j, why in failed.items()})
        nonfinite = sorted(tasks[j] for j, s in got.items() if not s_ok(s))
        alive = [j for j in alive if j in got]
        if nonfinite or not alive:
            break
        parts += [{k: s[k] for k in STAT_KEYS if k in s} for s in got.values()]
        reduced, n, dropped = reduce_grads(fleet, [GradPart(c.worker_of[j], [j], calls[j][0], 1) for j in alive], timeout)
        c.failed.update(dropped)
        alive = [j for j in alive if j not in dropped]
        if not alive:
            break
        steps.append(b.get(b.call(learner, Learner.round_step, n, r, total, *reduced), timeout=timeout))
    if len(steps) < total:  # the steps stopped early: the iteration still counts once
        steps[-1] = {**steps[-1], **b.get(b.call(learner, Learner.finish_iteration))}
    out = {**steps[-1], "grad_norm": steps[0]["grad_norm"], "outer_lr": steps[0]["outer_lr"],
           "update_skipped": all(s["update_skipped"] for s in steps), "outer/steps": sum(not s["update_skipped"] for s in steps),
           "outer/grad_norm_last": steps[-1]["grad_norm"], "outer/round_trips": len(steps),
           "ingest_messages": sum(s["ingest_messages"] for s in steps), "ingest_bytes": sum(s["ingest_bytes"] for s in steps),
           "nonfinite_tasks": nonfinite}
    return {**out, **mean_stats(parts)}


class WorkerFailed(RuntimeError):
    """A worker died, raised or ran out of time while answering the trust-region search."""


def trust_step(fleet: Fleet, theta_ref: Any, workers: list[Any], grad_refs: list[Any], n_ok: int,
               timeout: float) -> dict[str, Any]:
    """meta.outer = trpo: the KL-constrained step (metarl.core.trust) from theta_ref, searched here with
    the curvature products and objective values of the workers that completed this iteration (each
    over its own groups, summed, averaged over the n_ok evaluations), then handed to the learner. A
    worker that fails during the search leaves theta unchanged for this iteration."""
    b, m = fleet.backend, fleet.trust
    deadline = time.perf_counter() + timeout  # one budget for the whole search

    def over_workers(method: Callable[..., Any], x: np.ndarray) -> list[Any]:
        ref = b.put(x.astype(np.float32))
        try:
            return b.get([b.call(w, method, ref) for w in workers], timeout=max(deadline - time.perf_counter(), 1.0))
        except Exception as exc:  # noqa: BLE001 - a worker died, raised or ran out of time
            raise WorkerFailed(f"{method.__name__}: {type(exc).__name__}: {exc}"[:300]) from exc

    def fvp(v: np.ndarray) -> np.ndarray:
        return np.sum([np.asarray(p, dtype=np.float64) for p in over_workers(TaskWorker.region_fvp, v)], 0) / n_ok

    def objective(theta: np.ndarray) -> tuple[float, float]:
        parts = over_workers(TaskWorker.region_objective, theta)
        return sum(p[0] for p in parts) / n_ok, sum(p[1] for p in parts) / n_ok

    theta = np.asarray(b.get(theta_ref), dtype=np.float64)  # the theta this iteration's groups started from
    g = np.sum([np.asarray(x, dtype=np.float64) for x in b.get(grad_refs, timeout=timeout)], 0) / n_ok
    try:
        res = trust.trust_region_step(theta, g, fvp, objective, m["max_kl"], m["cg_iters"])
    except WorkerFailed as exc:  # theta stays; the driver's own errors are not caught here
        print(f"warning: trust-region step skipped, theta unchanged this iteration: {exc}", file=sys.stderr)
        out = b.get(b.call(fleet.learner, Learner.skip_step))
        return {**out, "trust/error": str(exc)}
    stats = {"kl": res.kl, "step_fraction": res.fraction, "surrogate_gain": res.surrogate_before - res.surrogate_after,
             "cg_residual": res.cg_residual, "full_step_norm": res.full_step_norm}
    return b.get(b.call(fleet.learner, Learner.assign, res.theta, float(np.linalg.norm(g)), res.accepted, stats),
                 timeout=timeout)


def finite_mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarize(tasks: tuple[str, ...], groups: list[Group], a: Algorithm, c: Collected, n_ok: int,
              nonfinite: list[str], lstats: dict[str, Any], wall: float, learner_s: float) -> dict[str, Any]:
    """The metrics row of one iteration (see README: Metrics)."""
    adapt_stats, eval_stats = c.adapts, (c.evals if a.evaluates else {})
    # the rollouts played with theta (joint pre-training, S = 0, plays none: no "pre" figures, not zeros)
    sampled = {i: s for i, s in adapt_stats.items() if s["env_steps"] > 0}
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
        "return/pre": finite_mean([r for s in sampled.values() for r in s["returns"]]),
        "return/post": finite_mean([r for s in eval_stats.values() for r in s["returns"]]),
        "reward_per_step/pre": finite_mean([s["reward_sum"] / s["env_steps"] for s in sampled.values()]),
        "reward_per_step/post": finite_mean([s["reward_sum"] / max(s["env_steps"], 1) for s in eval_stats.values()]),
        "loss/inner": finite_mean([s["inner_losses"][0] for s in adapt_stats.values() if s["inner_losses"]]),
        "loss/outer": finite_mean([s.get("loss", nan) for s in eval_stats.values()]),
        "grad/norm": lstats["grad_norm"], "grad/update_norm": lstats["update_norm"],
        "outer_lr": lstats.get("outer_lr", float("nan")), "theta_norm": lstats["theta_norm"],
        "update_skipped": bool(lstats["update_skipped"]),
        # what reached the learner this iteration (ray.grad_reduce decides how many messages)
        "learner/ingest_messages": int(lstats.get("ingest_messages", 0)),
        "learner/ingest_bytes": int(lstats.get("ingest_bytes", 0)),
        **{k: v for k, v in lstats.items() if k.startswith(("trust/", "outer/"))},
        "tasks_dropped": sorted(tasks[i] for i in failed), "drop_reasons": {tasks[i]: str(r) for i, r in failed.items()},
        "drop_kinds": {tasks[i]: r.kind for i, r in failed.items()},
        "nonfinite_tasks": nonfinite,
        "time/iteration_s": wall, "time/learner_s": learner_s,
        "time/adapt_s": float(sum(s["seconds"] for s in adapt_stats.values())),
        "time/eval_s": float(sum(s["seconds"] for s in eval_stats.values())),
    }
    # per task: the mean return of the episodes that ended in this iteration's rollouts, and the
    # episodes themselves (lists go to metrics.jsonl only; `metarl curve` draws them against frames)
    for i, s in sampled.items():  # the raw reward per step of each rollout: defined when no episode ends,
        rec[f"rate_pre/{tasks[i]}"] = s["reward_sum"] / s["env_steps"]  # and all the policy's own
    for j, s in eval_stats.items():
        rec[f"rate_post/{tasks[j]}"] = s["reward_sum"] / max(s["env_steps"], 1)
    for i, s in sampled.items():
        rec[f"return_pre/{tasks[i]}"] = finite_mean(s["returns"])
        rec[f"episodes_pre/{tasks[i]}"] = [float(r) for r in s["returns"]]
    for j, s in eval_stats.items():
        rec[f"return_post/{tasks[j]}"] = finite_mean(s["returns"])
        rec[f"episodes_post/{tasks[j]}"] = [float(r) for r in s["returns"]]
    return rec
