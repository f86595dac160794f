"""`metarl bench`: measured ratios against the emulator limit (README: Benchmark).

Every figure is measured side by side in one run, through the real code paths:

  sampling_ratio      a TaskWorker's env steps/s through `AtariTask.sample` (policy inference)
                      / raw `AtariVectorEnv` steps/s with random actions (same game, envs, threads)
  sampling_cpu_ratio  the same in CPU-seconds per step: what sampling costs a saturated machine
  sampling_compute_bound  raw time / (raw time + the network's bare forward on the same batches):
                      the best sampling_ratio one thread running emulator and policy can reach
  gradient_ratio      samples/s through `AtariTask.loss` + `meta.loss_grad` / a bare torch
                      forward+backward of the same network on the same batch
  skip_ratio_k        seconds per meta-iteration at skip k / at skip 1, on the config scaled down
  skip_ratio_k_expected  (ceil(N/k) S + N) / (N S + N): the share of rollouts skip k keeps
                      (Reptile, which evaluates nothing: ceil(N/k) / N)
  skip_ratio_k_compute_expected  the same share weighted by what each rollout costs at the fleet's
                      measured rates: an adaptation rollout its sampling and inner epochs of gradient
                      passes, an evaluation rollout its sampling and outer epochs (PPO's outer loop
                      makes the evaluations, which skipping keeps, the larger part of an iteration)
  end_to_end_ratio    env steps/s of whole meta-iterations (`iteration.meta_iteration`) / env steps/s of
                      the same fleet only sampling the same rollouts
  end_to_end_compute_bound  the best end_to_end_ratio when gradients share the cores with sampling:
                      G / (G + S W), S and G the fleet's sampling and gradient samples/s, W the
                      gradient passes per env step (grad_passes_per_env_step: 1 for one actor-critic
                      step; PPO's outer and inner epochs raise it)
  round_trips_per_iteration  driver -> workers round trips of PPO's outer steps (0: one step)
  overhead_share      1 - iteration_compute_s / iteration_s: what a skip-1 iteration took beyond its
                      sampling and gradient compute at the fleet's measured rates
  grad_on_worker_s / grad_on_learner_s  one iteration's N gradients, computed where the data is
                      (flat gradients shipped to the learner) or on the learner (batches shipped,
                      batch_ship_s of it the transfer), each ending in the learner's Adam step
  memory_*            peak resident memory (VmHWM) of the workers and the learner, their sum (an
                      upper bound), and the largest total proportional set size seen while they run

Ratios are what regressions are judged by; absolute rates vary from machine to machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from metarl.core import config as config_mod, meta
from metarl.tools import learner_bench, scale
from metarl.core.algorithms import rollouts_per_iteration
from metarl.distributed.backend import LocalBackend, RayBackend
from metarl.cliargs import add_cluster_args, add_config_args, add_out_arg, claim_out, resolve_config, retire
from metarl.core.config import GAME_FAMILIES, Config, ConfigError
from metarl.distributed.learner import Learner
from metarl.distributed.fleet import Fleet, start_fleet
from metarl.distributed.iteration import meta_iteration
from metarl.core.seeds import task_seed
from metarl.tasks import make_family
from metarl.tasks.base import batch_to_wire
from metarl.distributed.tracking import Tracker
from metarl.distributed.worker import TaskWorker

SKIPS = (2, 3, 4, 6)
MB = 1024 * 1024


def _proc_kb(pid: int | str, file: str, key: str) -> int:
    """One `key: <n> kB` line of /proc/<pid>/<file> (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    return _proc_kb("self", "status", "VmHWM") * 1024


class PssSampler:
    """The largest sum of proportional set sizes (shared pages split between the processes that
    map them: what the machine really holds) seen over `pids` while the block runs. A measuring
    thread, bench-only, polling once a second (~30 ms of CPU for 13 processes); actors on other
    hosts are not visible and count as zero."""

    def __init__(self, pids: list[int], every_s: float = 1.0):
        self.pids, self.every_s, self.peak_kb = sorted(set(pids)), every_s, 0  # --local: one process
        self._stop = threading.Event()

    def sample(self) -> None:
        self.peak_kb = max(self.peak_kb, sum(_proc_kb(p, "smaps_rollup", "Pss") for p in self.pids))

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "PssSampler":
        self.sample()  # a block shorter than one poll interval is measured too (it used to read 0)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ------------------------------------------------------------------------------------------
# actors with the calls only the benchmark makes


class BenchWorker(TaskWorker):
    """A TaskWorker that can also sample without gradients, hold a batch, and report memory."""

    def sample_only(self, task_name: str, theta: np.ndarray, rollouts: int) -> int:
        task, params = self.tasks[task_name], self.spec.unflatten(theta, device=self.device)
        return sum(task.sample(self.model, params).env_steps for _ in range(rollouts))

    def hold_batch(self, task_name: str, theta: np.ndarray) -> int:
        batch = self.tasks[task_name].sample(self.model, self.spec.unflatten(theta, device=self.device))
        self.held = {**getattr(self, "held", {}), task_name: batch}
        return sum(v.numel() * v.element_size() for v in batch.data.values())

    def held_grad(self, task_name: str, theta: np.ndarray) -> np.ndarray:
        """grad_on worker: the first-order gradient of the held batch, flat, for the learner."""
        params = self.spec.unflatten(theta, device=self.device)
        grads, _, _ = meta.loss_grad(self.tasks[task_name], self.model, params, self.held[task_name])
        return self.spec.flatten_grads(grads)

    def held_arrays(self, task_name: str) -> dict[str, Any]:
        """grad_on learner: the held batch in the wire format `TaskWorker.rollout` ships."""
        return batch_to_wire(self.held[task_name])

    def memory(self) -> dict[str, int]:
        return {"pid": os.getpid(), "peak_rss": peak_rss_bytes()}


class BenchLearner(Learner):
    """A Learner that can also report its memory and take delivery of batches without using them."""

    def receive(self, *shipped: dict[str, Any]) -> int:
        """Only take delivery of shipped batches (their transfer time), returning their bytes."""
        return sum(v.nbytes for s in shipped for v in s["data"].values())

    def memory(self) -> dict[str, int]:
        return {"pid": os.getpid(), "peak_rss": peak_rss_bytes()}


def fleet_memory(fleet: Fleet) -> list[dict[str, int]]:
    """The memory reports of a bench fleet: the learner's, then each worker's."""
    b = fleet.backend
    return b.get([b.call(fleet.learner, BenchLearner.memory), *[b.call(w, BenchWorker.memory) for w in fleet.workers]])


def start_bench_fleet(cfg: Config, backend: Any) -> Fleet:
    """The actors `fleet.start_fleet` starts (same resources, seeds and task assignment), as the
    bench classes above, on the running backend (Ray, or this process: --local)."""
    return start_fleet(cfg, isinstance(backend, LocalBackend), backend, BenchWorker, BenchLearner)


# ------------------------------------------------------------------------------------------
# one worker, in this process: emulator vs sampling, loss path vs bare torch


def alternate(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> np.ndarray:
    """Wall and CPU seconds (this process, all threads) of a and b, called in turn after one
    warm-up call each, so that load drifting on a shared machine hits both alike: rounds x 2 x 2."""
    a(), b()
    out = np.zeros((rounds, 2, 2))
    for r in range(rounds):
        for i, fn in enumerate((a, b)):
            w, c = time.perf_counter(), time.process_time()
            fn()
            out[r, i] = time.perf_counter() - w, time.process_time() - c
    return out


def measure_sampling(cfg: Config, rollouts: int, rounds: int) -> dict[str, float]:
    """A TaskWorker's task.sample vs the bare emulator (the family's raw stepper: same game, envs,
    threads, random actions), in turns of `rollouts` rollouts."""
    game, seed = cfg.tasks.train[0], task_seed(cfg.meta.seed, 0)
    family = make_family(cfg)
    worker = TaskWorker(family, {game: seed}, cfg.meta.inner_lr, cfg.meta.inner_steps)
    task, theta = worker.tasks[game], worker.spec.unflatten(worker.spec.flatten(dict(worker.model.named_parameters())))
    step_raw, close_raw = family.raw_stepper(game, seed)
    B, T = cfg.env.num_envs, cfg.env.rollout_len

    def raw():
        step_raw(rollouts * T)

    def sample():
        for _ in range(rollouts):
            task.sample(worker.model, theta)

    obs = task.sample(worker.model, theta).data["obs"]

    @torch.no_grad()
    def policy():  # the network's bare forward on the same observations, as often as sampling calls it
        for i in range(rollouts * T):
            worker.model(obs[i % T])

    t = alternate(raw, sample, rounds)
    t_policy = alternate(policy, policy, rounds)
    close_raw()
    steps, fs = rounds * rollouts * T * B, family.frames_per_step
    (raw_w, raw_c), (smp_w, smp_c) = t.sum(0)
    fwd_w = t_policy[:, :, 0].sum() / 2
    out = {"sampling_ratio": float(np.median(t[:, 0, 0] / t[:, 1, 0])),
           # the best sampling_ratio when one thread both steps the emulator and runs the policy
           "sampling_compute_bound": float(raw_w / (raw_w + fwd_w)),
           "sampling_cpu_ratio": float(np.median(t[:, 0, 1] / t[:, 1, 1])),
           "raw_env_steps_per_s": steps / raw_w, "raw_frames_per_s": steps * fs / raw_w,
           "sampling_env_steps_per_s": steps / smp_w, "sampling_frames_per_s": steps * fs / smp_w}
    return {**out, **measure_gradient(worker, game, theta, max(rounds, 2))}


def bare_forward_backward(model: torch.nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> None:
    """The plain-torch baseline: the network's own forward on the batch, a cross-entropy plus
    value loss, backward into the module's parameters."""
    model.zero_grad(set_to_none=True)
    logits, values = model(obs)
    n = actions.numel()
    (F.cross_entropy(logits[:n], actions) + values.pow(2).mean()).backward()


def measure_gradient(worker: TaskWorker, game: str, theta: dict, reps: int) -> dict[str, float]:
    task = worker.tasks[game]
    batch = task.sample(worker.model, theta)
    bare_model = copy.deepcopy(worker.model)
    obs, actions = batch.data["obs"].flatten(0, 1), batch.data["actions"].flatten()
    t = alternate(lambda: meta.loss_grad(task, worker.model, theta, batch),
                  lambda: bare_forward_backward(bare_model, obs, actions), reps)
    n = reps * batch.env_steps
    (metarl_w, _), (bare_w, _) = t.sum(0)
    return {"gradient_ratio": float(np.median(t[:, 1, 0] / t[:, 0, 0])), "grad_samples_per_s": n / metarl_w,
            "bare_grad_samples_per_s": n / bare_w}


# ------------------------------------------------------------------------------------------
# a fleet of Ray actors: skip ratios, end to end, gradient placement, memory


def _iteration(fleet: Fleet, cfg: Config, skip: int, rng: np.random.Generator) -> dict[str, Any]:
    groups = meta.make_groups(cfg.num_tasks, skip, rng)
    rec = meta_iteration(fleet, cfg.tasks.train, groups, cfg.meta.algo, cfg.ray.call_timeout_s)
    if rec["tasks_dropped"]:
        raise RuntimeError(f"bench: tasks dropped during an iteration: {rec['drop_reasons']}")
    return rec


def expected_skip_ratio(n: int, k: int, s: int, algo: str) -> float:
    """Rollouts per iteration at skip k over those at skip 1 (`rollouts_per_iteration`: S per
    adaptation, one per evaluation, none for Reptile's)."""
    return rollouts_per_iteration(n, k, s, algo) / rollouts_per_iteration(n, 1, s, algo)


def measure_skip(fleet: Fleet, cfg: Config, reps: int) -> dict[str, float]:
    """Median seconds per meta-iteration at each skip, the skips interleaved against load drift."""
    rng = np.random.default_rng(cfg.meta.seed)
    skips = (1, *[k for k in SKIPS if k <= cfg.num_tasks])
    _iteration(fleet, cfg, 1, rng)  # warm-up
    secs: dict[int, list[float]] = {k: [] for k in skips}
    for _ in range(reps):
        for k in skips:
            secs[k].append(_iteration(fleet, cfg, k, rng)["time/iteration_s"])
    base = float(np.median(secs[1]))
    out = {"iteration_s_skip_1": base}
    for k in skips[1:]:
        out[f"skip_ratio_{k}"] = float(np.median(secs[k])) / base
        out[f"skip_ratio_{k}_expected"] = expected_skip_ratio(cfg.num_tasks, k, cfg.meta.inner_steps, cfg.meta.algo)
    return out


def _sampling_only(fleet: Fleet, cfg: Config, theta: Any) -> tuple[int, float]:
    """Every task samples the rollouts it takes in one skip-1 iteration (S + 1; Reptile: S), all at once."""
    b, t0 = fleet.backend, time.perf_counter()
    per_task = rollouts_per_iteration(1, 1, cfg.meta.inner_steps, cfg.meta.algo)
    refs = [b.call(fleet.workers[fleet.owner[name]], BenchWorker.sample_only, name, theta, per_task)
            for name in cfg.tasks.train]
    steps = sum(b.get(r) for r in refs)
    return steps, time.perf_counter() - t0


def measure_end_to_end(fleet: Fleet, cfg: Config, reps: int) -> dict[str, float]:
    """Skip-1 meta-iterations vs sampling only, alternating; and the fleet's memory meanwhile."""
    b, rng = fleet.backend, np.random.default_rng(cfg.meta.seed)
    _iteration(fleet, cfg, 1, rng)  # warm-up
    tot = np.zeros(4)  # sampling-only steps, seconds; iteration steps, seconds
    passes = trips = 0.0  # gradient passes over the iteration's samples; round trips to the workers
    with PssSampler([m["pid"] for m in fleet_memory(fleet)]) as pss:
        for _ in range(reps):
            theta = b.put(b.get(b.call(fleet.learner, BenchLearner.get_theta)))
            rec = _iteration(fleet, cfg, 1, rng)
            tot += [*_sampling_only(fleet, cfg, theta), rec["env_steps/adapt"] + rec["env_steps/eval"],
                    rec["time/iteration_s"]]
            passes += grad_passes(cfg.meta, rec["env_steps/adapt"], rec["env_steps/eval"])
            trips += rec.get("outer/round_trips", 0)
    peaks = [m["peak_rss"] / MB for m in fleet_memory(fleet)]
    fs = make_family(cfg).frames_per_step
    return {"end_to_end_ratio": (tot[2] / tot[3]) / (tot[0] / tot[1]),
            "grad_passes_per_env_step": passes / tot[2], "round_trips_per_iteration": trips / reps,
            "iteration_s": tot[3] / reps, "iteration_env_steps": tot[2] / reps,
            "end_to_end_env_steps_per_s": tot[2] / tot[3], "end_to_end_frames_per_s": tot[2] * fs / tot[3],
            "fleet_sampling_env_steps_per_s": tot[0] / tot[1],
            "memory_worker_peak_mb": max(peaks[1:]), "memory_learner_peak_mb": peaks[0],
            "memory_total_peak_rss_mb": sum(peaks), "memory_total_pss_mb": pss.peak_kb / 1024}


def grad_passes(m: Any, adapt_steps: float, eval_steps: float) -> float:
    """Gradient passes over one iteration's samples: each adaptation sample once per inner epoch
    (its minibatches partition it), each evaluation sample once per outer epoch (PPO's outer loop)
    or once (one actor-critic step)."""
    inner = m.inner_epochs if m.inner_updates > 1 else 1
    outer = m.outer_epochs if m.reused_outer else 1
    return adapt_steps * inner + eval_steps * outer


def skip_compute_expected(f: dict[str, float], cfg: Config) -> dict[str, float]:
    """skip_ratio_k_compute_expected for every measured k: the iteration's compute at skip k over
    skip 1's, each adaptation rollout costing 1/S_rate + I/G_rate per sample and each evaluation
    rollout 1/S_rate + O/G_rate (I, O: inner and outer gradient passes, `grad_passes`)."""
    m, n = cfg.meta, cfg.num_tasks
    s, g = f["fleet_sampling_env_steps_per_s"], f["fleet_grad_samples_per_s"]
    adapt_cost, eval_cost = 1.0 / s + grad_passes(m, 1, 0) / g, 1.0 / s + grad_passes(m, 0, 1) / g
    evaluations = rollouts_per_iteration(n, 1, 0, m.algo)

    def cost(k: int) -> float:  # the adaptation rollouts are the rest of `rollouts_per_iteration`'s count
        return (rollouts_per_iteration(n, k, m.inner_steps, m.algo) - evaluations) * adapt_cost + evaluations * eval_cost

    return {f"skip_ratio_{k}_compute_expected": cost(k) / cost(1)
            for k in SKIPS if f"skip_ratio_{k}" in f}


def compute_bound(f: dict[str, float]) -> dict[str, float]:
    """When gradients share the cores with sampling, an env step costs the fleet its sampling time
    plus its share of gradient passes (outer and inner epochs included): the best end_to_end_ratio
    such a fleet can reach, and what one iteration took beyond that compute (Ray round trips,
    the learner's steps, waiting on the slowest task), as a share of the iteration."""
    s, g, w = f["fleet_sampling_env_steps_per_s"], f["fleet_grad_samples_per_s"], f["grad_passes_per_env_step"]
    compute_s = f["iteration_env_steps"] * (1.0 / s + w / g)
    return {"end_to_end_compute_bound": g / (g + s * w), "iteration_compute_s": compute_s,
            "overhead_share": max(0.0, 1.0 - compute_s / f["iteration_s"])}


def measure_placement(fleet: Fleet, cfg: Config) -> dict[str, float]:
    """One iteration's N gradients at theta on held batches: computed on the workers (flat
    gradients to the learner) vs on the learner (batches to the learner); both end in one step."""
    b, tasks = fleet.backend, cfg.tasks.train
    worker = lambda name: fleet.workers[fleet.owner[name]]  # noqa: E731
    theta = b.put(b.get(b.call(fleet.learner, BenchLearner.get_theta)))
    sizes = [b.get(b.call(worker(n), BenchWorker.hold_batch, n, theta)) for n in tasks]
    t0 = time.perf_counter()
    grads = [b.call(worker(n), BenchWorker.held_grad, n, theta) for n in tasks]
    b.get(b.call(fleet.learner, BenchLearner.step, len(tasks), *grads))
    t1 = time.perf_counter()
    batches = [b.call(worker(n), BenchWorker.held_arrays, n) for n in tasks]
    b.get(b.call(fleet.learner, BenchLearner.receive, *batches))
    t_ship = time.perf_counter()
    b.get(b.call(fleet.learner, BenchLearner.step_on_batches, len(tasks), *[x for ref in batches for x in (theta, ref)]))
    t2 = time.perf_counter()
    samples = len(tasks) * cfg.env.num_envs * cfg.env.rollout_len
    return {"grad_on_worker_s": t1 - t0, "grad_on_learner_s": t2 - t1, "batch_ship_s": t_ship - t1,
            "grad_on_learner_speedup": (t1 - t0) / (t2 - t1), "batch_mb": float(np.mean(sizes)) / MB,
            "fleet_grad_samples_per_s": samples / (t1 - t0)}


# ------------------------------------------------------------------------------------------
# the benchmark


def scaled_down(cfg: Config, tasks: int, num_envs: int, rollout_len: int, workers: int | None = None) -> Config:
    """The same experiment with fewer tasks and small rollouts (skip ratios, --quick)."""
    ray_cfg = cfg.ray if workers is None else replace(cfg.ray, workers=workers)
    return replace(cfg, tasks=replace(cfg.tasks, train=cfg.tasks.train[:tasks]), ray=ray_cfg,
                   env=replace(cfg.env, num_envs=num_envs, rollout_len=rollout_len))


def run_bench(cfg: Config, quick: bool, log: Callable[[str], None] = print,
              local: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Every figure, and the context they were measured in."""
    if cfg.tasks.family not in GAME_FAMILIES:
        raise ConfigError(f"metarl bench measures games against their emulator ({', '.join(GAME_FAMILIES)}); "
                          f"tasks.family is {cfg.tasks.family!r} (use `metarl fewshot cost`)")
    if cfg.num_tasks < 2:
        raise ConfigError(f"metarl bench needs at least 2 training tasks for the skip ratios; tasks.train has {cfg.num_tasks}")
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    small = scaled_down(cfg, min(max(SKIPS), cfg.num_tasks) if quick else cfg.num_tasks, 4, 16 if quick else 32,
                        2 if quick else None)
    full = small if quick else cfg
    figures: dict[str, float] = {}
    log(f"# sampling and gradients: one worker in this process, {full.tasks.train[0]}")
    figures.update(measure_sampling(full, rollouts=1 if quick else 2, rounds=2 if quick else 3))
    backend = LocalBackend() if local else RayBackend(cfg.ray.address, cfg.ray.num_cpus)
    try:
        log(f"# skip ratios: {small.num_tasks} tasks x {small.env.num_envs} envs x {small.env.rollout_len} steps, "
            f"{small.num_workers} workers")
        fleet = start_bench_fleet(small, backend)
        figures.update(measure_skip(fleet, small, reps=1 if quick else 5))
        if not quick:
            del fleet
            log(f"# end to end, gradient placement, memory: {full.num_tasks} tasks x {full.env.num_envs} envs x "
                f"{full.env.rollout_len} steps, {full.num_workers} workers")
            fleet = start_bench_fleet(full, backend)
        figures.update(measure_end_to_end(fleet, full, reps=1))
        figures.update(measure_placement(fleet, full))
        # when gradients share the cores with sampling, each env step costs the fleet its sampling
        # time plus one gradient sample's: the best end_to_end_ratio such a fleet can reach
        figures.update(compute_bound(figures))
        figures.update(skip_compute_expected(figures, small))
        learner_device = fleet.learner_info["device"]
    finally:
        backend.shutdown()
    context = {"quick": quick, "local": local, "game": full.tasks.train[0], "num_envs": full.env.num_envs,
               "rollout_len": full.env.rollout_len, "env_threads": full.env.env_threads,
               "tasks": full.num_tasks, "workers": full.num_workers, "learner_device": learner_device,
               "cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
               "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
               "seconds": time.perf_counter() - t_start}
    return figures, context


SUITES = ("fleet", "scale", "learner")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).suffix == ".json":
        raise ConfigError(f"bench --out is a directory now (bench.json is written inside); pass --out DIR, "
                          f"not {args.out}")
    if args.suite != "fleet" and (args.local or args.address):
        raise ConfigError(f"--suite {args.suite} " + ("starts its own simulated cluster" if args.suite == "scale"
                                                       else "starts no Ray") + "; drop --local and --address")
    out = claim_out(args.out or f"runs/bench-{args.suite}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.config is None and os.path.exists("configs/atari12.yaml"):
        args.config = "configs/atari12.yaml"
    cfg = resolve_config(args)
    if args.suite == "scale":
        figures = scale.cmd_scale(args, out)
    elif args.suite == "learner":
        figures = learner_bench.main_args(args, out / "learner.json")
    else:
        figures, context = run_bench(cfg, args.quick, local=args.local)
        for k, v in context.items():
            print(f"# {k}: {v}")
        for k, v in figures.items():
            print(f"{k}: {v:.4g}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"figures": figures, "context": context}, indent=1))
        figures = {**figures, **{k: v for k, v in context.items() if isinstance(v, (int, float))}}
    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment, name=f"{cfg.log.experiment}-bench",
                      config={**config_mod.to_dict(cfg), "suite": args.suite}, mode=cfg.log.wandb_mode,
                      job_type="bench", metrics_file="bench_metrics.jsonl")
    try:
        tracker.summary(figures)
    finally:
        tracker.finish()
    print(f"bench written to {out}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measured ratios against the emulator limit (sampling, gradients, skip, "
                                     "end to end, memory); --suite scale or learner for the other benchmarks")
    add_config_args(p)
    p.add_argument("--suite", choices=SUITES, default="fleet",
                   help="fleet: the ratios against the emulator (default); scale: overhead and ingest against N "
                        "(metarl.tools.scale); learner: the learner's work on each device (metarl.tools.learner_bench)")
    p.add_argument("--quick", action="store_true", help="small and fast (about a minute): 6 games, tiny rollouts")
    add_out_arg(p, "bench.json (fleet), scale.json/.md/.png (scale) or learner.json (learner)",
                default="runs/bench-<suite>-<time>")
    add_cluster_args(p, "fleet: every actor in this process, without Ray (the fleet's figures are then sequential)")
    retire(p, "--scale", "now --suite scale", switch=True)
    retire(p, "--learner", "now --suite learner (--learner names a fine-tuner, as in eval)", switch=True)
    retire(p, "--out-dir", "now --out DIR")
    s = p.add_argument_group("scale benchmark (--suite scale): simulated nodes on loopback, sleeping fixture tasks")
    s.add_argument("--scale-sizes", default="12,48,192,768", help="task counts N (default 12,48,192,768)")
    s.add_argument("--scale-workers", type=int, default=8, help="task workers, spread over the nodes (default 8)")
    s.add_argument("--scale-nodes", type=int, default=4, help="simulated worker nodes (default 4)")
    s.add_argument("--scale-reduce", default="task,worker,node", help="ray.grad_reduce modes to compare")
    s.add_argument("--scale-iterations", type=int, default=2, help="measured iterations per size, after one warm-up")
    s.add_argument("--work-ms", type=float, default=0.0, help="sleep per fixture rollout (default 0: overhead only)")
    g = p.add_argument_group("learner benchmark (--suite learner): the learner's work on each device, CPU beside GPU")
    learner_bench.add_args(g, json_flag=False)
    p.set_defaults(func=cmd_bench)
