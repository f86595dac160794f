"""`metarl bench --suite scale`: how the cost of a meta-iteration grows with the number of tasks.

A simulated cluster — a head node (driver, learner) and several worker nodes, each a real Ray
node (raylet and object store) on its own loopback address of this machine — runs real
meta-iterations (metarl.distributed.iteration.meta_iteration: the same driver, workers, learner and transfers as a
run) over N tasks of a benchmark fixture family. The fixture has the Atari network's θ (Nature
CNN, 1.69M parameters, 6.8 MB as float32) but its rollouts only sleep `work_ms`, so that what is
left of an iteration's wall time is the system's own cost: the driver's calls, θ and θ′ moving
through the object store, every gradient travelling to the learner (or being summed on the way,
ray.grad_reduce) and the learner's step. It is a benchmark fixture, not a task family users run.

For each N it reports the wall time of an iteration, the task work on its critical path (the
most-loaded worker's sleeps), the remainder (overhead), the bytes and messages the learner
received, and the Ray calls the driver made; and, by arithmetic, the share of overhead in an
iteration whose task work is the measured Atari cost per task.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from metarl.core import config as config_mod
from metarl.distributed.backend import RayBackend
from metarl.core.config import Config
from metarl.core.meta import make_groups
from metarl.core.plots import Panel, Series, markdown_table, save_grid, write_json
from metarl.core.policy import NatureCNN, Params
from metarl.distributed.fleet import Fleet, start_fleet
from metarl.distributed.iteration import meta_iteration
from metarl.tasks.base import Batch, Task, TaskFamily


ATARI_TASK_S = 4.5
"""Measured Atari cost of one task per iteration at skip 1 on one core (2026-11-25, 16 x 128):
an adaptation and an evaluation, each a 2,048-step rollout (2,400 steps/s) and its gradient (1,450/s)."""


class SleepTask(Task):
    """A rollout that takes `work_ms` of wall time and no CPU; its gradient is a fixed tensor set
    of the network's shapes (deterministic per task, so sums can be checked)."""

    def __init__(self, name: str, seed: int, work_ms: float, env_steps: int):
        self.name, self.seed, self.work_ms, self.env_steps = name, seed, work_ms, env_steps

    def sample(self, model: nn.Module, params: Params) -> Batch:
        time.sleep(self.work_ms / 1000.0)
        return Batch({}, self.env_steps, frames=4 * self.env_steps)

    def loss(self, model: nn.Module, params: Params, batch: Batch):
        raise NotImplementedError("the scale fixture has no loss; grad is given directly")

    def grad(self, model: nn.Module, params: Params, batch: Batch):
        value = 1e-6 * (1 + self.seed % 7)
        return tuple(torch.full_like(p, value) for p in params.values()), 0.0, {}


@dataclass(frozen=True)
class ScaleFamily(TaskFamily):
    """The benchmark fixture: Atari's network, tasks that sleep."""

    work_ms: float = 0.0
    env_steps: int = 2048

    def make_model(self) -> nn.Module:
        return NatureCNN()

    def make_task(self, name: str, seed: int) -> Task:
        return SleepTask(name, seed, self.work_ms, self.env_steps)


class CountingBackend(RayBackend):
    """RayBackend that counts the driver's actor calls."""

    calls = 0

    def call(self, actor: Any, method: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        self.calls += 1
        return super().call(actor, method, *args, num_returns=num_returns)


def scale_config(n_tasks: int, workers: int, reduce: str, skip: int) -> Config:
    """A run config for N fixture tasks (built directly: the fixture's task names are no games)."""
    base = Config()
    return replace(base,
                   tasks=replace(base.tasks, family="atari", train=tuple(f"task-{i:04d}" for i in range(n_tasks))),
                   meta=replace(base.meta, algo="fomaml", skip=skip, inner_steps=1, outer_lr=1e-4, seed=0),
                   ray=replace(base.ray, workers=workers, cpus_per_worker=1.0, learner_gpus="0", grad_reduce=reduce,
                               call_timeout_s=900.0))


def measure(fleet: Fleet, backend: CountingBackend, n_tasks: int, skip: int, work_ms: float,
            iterations: int) -> dict[str, float]:
    """Iterations of meta_iteration; the figures of the last ones (the first warms up)."""
    rng = np.random.default_rng(0)
    tasks = tuple(f"task-{i:04d}" for i in range(n_tasks))
    rows, per_worker = [], []
    for it in range(iterations + 1):
        groups = make_groups(n_tasks, skip, rng)
        per_worker = [0] * len(fleet.workers)
        for g in groups:  # the sleeps of the critical path: the most-loaded worker's rollouts
            per_worker[fleet.owner[tasks[g.leader]]] += 1
            for j in g.members:
                per_worker[fleet.owner[tasks[j]]] += 1
        calls0, t0 = backend.calls, time.perf_counter()
        rec = meta_iteration(fleet, tasks, groups, "fomaml", timeout=900.0)
        wall = time.perf_counter() - t0
        if rec["tasks_dropped"]:
            raise RuntimeError(f"scale benchmark: tasks dropped: {rec['drop_reasons']}")
        if it == 0:
            continue
        work = max(per_worker) * work_ms / 1000.0
        rows.append({"wall_s": wall, "task_work_s": work, "overhead_s": wall - work,
                     "learner_bytes": rec["learner/ingest_bytes"], "learner_messages": rec["learner/ingest_messages"],
                     "driver_calls": backend.calls - calls0, "learner_s": rec["time/learner_s"]})
    out = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    out["rollouts_per_worker"] = float(max(per_worker))
    return out


def run_scale(sizes: list[int], workers: int, nodes: int, reduces: list[str], work_ms: float, iterations: int,
              skip: int = 1, atari_task_s: float = ATARI_TASK_S, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The benchmark on a fresh simulated cluster: `nodes` worker nodes (127.0.0.3, .4, ...), each
    with workers/nodes CPUs, and a head node (127.0.0.2; Ray takes 127.0.0.1 for the host address) for the driver and the learner."""
    import ray
    from ray.cluster_utils import Cluster

    if workers % nodes:
        raise config_mod.ConfigError(f"--scale-workers {workers} must be a multiple of --scale-nodes {nodes}")
    if ray.is_initialized():
        ray.shutdown()
    store = 2 * 1024**3
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.2", "object_store_memory": store, "resources": {"head": 1}})
    results = []
    try:
        for k in range(nodes):
            cluster.add_node(num_cpus=workers // nodes, node_ip_address=f"127.0.0.{k + 3}", object_store_memory=store)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        backend = CountingBackend(cluster.address)
        family = ScaleFamily(work_ms=work_ms)
        for reduce in reduces:
            for n in sizes:
                cfg = scale_config(n, workers, reduce, skip)
                fleet = start_fleet(cfg, local=False, backend=backend, family=family)
                try:
                    row = measure(fleet, backend, n, skip, work_ms, iterations)
                finally:
                    for a in [fleet.learner, *fleet.workers]:
                        ray.kill(a)
                # the same iteration with Atari's task work: rollouts on the critical path x measured cost
                atari_work = row["rollouts_per_worker"] / 2 * atari_task_s
                row.update(reduce=reduce, tasks=n, workers=workers, nodes=len({*fleet.nodes}),
                           overhead_share_at_atari_cost=row["overhead_s"] / (row["overhead_s"] + atari_work))
                results.append(row)
                log(f"reduce {reduce:>6}  N={n:>4}: iteration {row['wall_s']:.2f}s (task work {row['task_work_s']:.2f}s, "
                    f"overhead {row['overhead_s']:.2f}s), learner received {row['learner_bytes'] / 1e6:.0f} MB in "
                    f"{row['learner_messages']:.0f} messages, driver made {row['driver_calls']:.0f} calls; "
                    f"overhead share at Atari's task cost {row['overhead_share_at_atari_cost']:.1%}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return results


def theta_bytes() -> int:
    return 4 * sum(p.numel() for p in NatureCNN().parameters())


def cluster_arithmetic(tasks: int = 1000, nodes: int = 32, workers_per_node: int = 16, link_gbit: float = 10.0,
                       atari_task_s: float = ATARI_TASK_S) -> dict[str, float]:
    """Seconds per iteration the learner's node spends receiving gradients on one link, per task
    (ray.grad_reduce = task), per worker and per node, beside one iteration's compute at that size
    (skip 1: every worker runs tasks / workers adaptations and evaluations)."""
    b = theta_bytes()
    link = link_gbit * 1e9 / 8
    workers = nodes * workers_per_node
    return {"tasks": tasks, "nodes": nodes, "workers": workers, "theta_MB": b / 1e6,
            "ingest_s_task": tasks * b / link, "ingest_s_worker": min(tasks, workers) * b / link,
            "ingest_s_node": nodes * b / link, "compute_s": math.ceil(tasks / workers) * atari_task_s}


COLUMNS = {"reduce": "ray.grad_reduce", "tasks": "N tasks", "wall_s": "iteration (s)", "task_work_s": "task work (s)",
           "overhead_s": "overhead (s)", "learner_MB": "learner ingest (MB)", "learner_messages": "messages to learner",
           "driver_calls": "driver calls", "atari_share": "overhead at Atari task cost"}


def report(results: list[dict[str, Any]], out: Any = None) -> str:
    """The table (Markdown), and with `out` a directory: scale.json and scale.png."""
    from pathlib import Path

    rows = [{**{k: r[k] for k in ("reduce", "tasks")}, "wall_s": f"{r['wall_s']:.2f}",
             "task_work_s": f"{r['task_work_s']:.2f}", "overhead_s": f"{r['overhead_s']:.2f}",
             "learner_MB": f"{r['learner_bytes'] / 1e6:,.0f}", "learner_messages": f"{r['learner_messages']:.0f}",
             "driver_calls": f"{r['driver_calls']:.0f}", "atari_share": f"{r['overhead_share_at_atari_cost']:.1%}"}
            for r in results]
    table = markdown_table(rows, COLUMNS)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scale.json", {"results": results, "arithmetic": cluster_arithmetic()})
        (out / "scale.md").write_text(table)
        panels = []
        for key, label in (("overhead_s", "non-task overhead per iteration (s)"),
                           ("learner_bytes", "learner ingest per iteration (MB)")):
            series = [Series(reduce, [r["tasks"] for r in results if r["reduce"] == reduce],
                             [r[key] / (1e6 if key == "learner_bytes" else 1) for r in results if r["reduce"] == reduce])
                      for reduce in dict.fromkeys(r["reduce"] for r in results)]
            panels.append(Panel(label, "tasks N", label, series, kind="points"))
        save_grid(out / "scale.png", panels, 2, "scale benchmark (simulated nodes on loopback)")
    return table


def cmd_scale(args: Any, out: Any) -> dict[str, float]:
    """`metarl bench --suite scale`: the table printed, scale.json/.md/.png written to `out`; the
    figures by mode and size for the W&B summary."""
    try:
        sizes = [int(x) for x in args.scale_sizes.split(",")]
    except ValueError:
        raise config_mod.ConfigError(f"--scale-sizes {args.scale_sizes!r} must be task counts separated by commas") from None
    reduces = args.scale_reduce.split(",")
    bad = [r for r in reduces if r not in config_mod.GRAD_REDUCE]
    if bad or any(n < 1 for n in sizes) or args.scale_workers < 1 or args.scale_nodes < 1:
        raise config_mod.ConfigError(f"--scale-reduce takes {', '.join(config_mod.GRAD_REDUCE)}; sizes, workers and "
                                     f"nodes must be at least 1 (got {args.scale_reduce}, {sizes}, "
                                     f"{args.scale_workers}, {args.scale_nodes})")
    results = run_scale(sizes, args.scale_workers, args.scale_nodes, reduces, args.work_ms, args.scale_iterations)
    print(report(results, out), end="")
    a = cluster_arithmetic()
    print(f"# arithmetic, {a['tasks']} tasks on {a['nodes']} nodes x {a['workers'] // a['nodes']} workers, 10 GbE into "
          f"the learner: gradients {a['ingest_s_task']:.2f}s per iteration sent per task, {a['ingest_s_worker']:.2f}s per "
          f"worker, {a['ingest_s_node']:.2f}s per node; compute {a['compute_s']:.1f}s")
    return {f"{r['reduce']}/N{r['tasks']}/{k}": r[k] for r in results
            for k in ("wall_s", "overhead_s", "learner_bytes", "learner_messages", "overhead_share_at_atari_cost")}
