"""`metarl run`: start the fleet, run meta-iterations, log, checkpoint, resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from metarl.core import checkpoint, config as config_mod
from metarl.core.algorithms import ALGORITHMS
from metarl.core.checkpoint import RunDirError
from metarl.core.config import Config
from metarl.distributed.fleet import Fleet, start_fleet
from metarl.distributed.iteration import finite_mean, meta_iteration
from metarl.distributed.learner import Learner
from metarl.core.meta import group_sizes, make_groups
from metarl.distributed.stopping import Stopped, StopRequest
from metarl.distributed.tracking import Progress, Tracker, read_metrics
from metarl.distributed.worker import TaskWorker


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


def check_resume(state: dict[str, Any], cfg: Config, out: Path) -> None:
    """A resumed run must keep the settings that define its meta-learning problem."""
    old, now = state.get("config"), config_mod.to_dict(cfg)
    for key, names in (("tasks", ("family", "train")), ("meta", ("algo", "skip", "outer"))) if old else ():
        for k in names:
            was = old.get(key, {}).get(k, "adam" if k == "outer" else None)  # runs before meta.outer: adam
            if was is not None and was != now[key][k]:
                raise RunDirError(f"--resume: {key}.{k} was {was!r} in '{out}', now {now[key][k]!r}; "
                                  f"resume with the same settings")


class Downtime:
    """How long each task has been dropped from every iteration; past the limit the run stops."""

    def __init__(self, limit_s: float):
        self.limit_s, self.since = limit_s, {}

    def update(self, tasks: tuple[str, ...], dropped: list[str], now: float) -> list[str]:
        """Record one iteration's drops; return the tasks down for longer than the limit."""
        for name in tasks:
            if name in dropped:
                self.since.setdefault(name, now)
            else:
                self.since.pop(name, None)
        return [name for name, t0 in self.since.items() if now - t0 > self.limit_s]


def with_totals(rec: dict[str, Any], iteration: int, skip: int, counters: dict[str, float]) -> dict[str, Any]:
    """The iteration's row with the run's cumulative counters (which carry on after a resume)."""
    steps = rec["env_steps/adapt"] + rec["env_steps/eval"]
    counters["env_steps"] += steps
    counters["frames"] += rec["frames/adapt"] + rec["frames/eval"]
    counters["wall_s"] += rec["time/iteration_s"]
    return {"iteration": iteration, "skip": skip, **rec, "env_steps/total": counters["env_steps"],
            "frames/total": counters["frames"], "time/wall_s": counters["wall_s"],
            "speed/env_steps_per_s": steps / rec["time/iteration_s"]}


def save_checkpoint(fleet: Fleet, out: Path, cfg: Config, rng: np.random.Generator, counters: dict[str, float],
                    iteration: int) -> Path:
    """The learner's state after exactly `iteration` iterations (also when the one after it was
    abandoned part-way), with the driver's RNG and counters as of then."""
    lstate = fleet.backend.get(fleet.backend.call(fleet.learner, Learner.state, iteration), timeout=cfg.ray.call_timeout_s)
    return checkpoint.save(out, {**lstate, "rng": rng.bit_generator.state, "counters": dict(counters),
                                 "config": config_mod.to_dict(cfg)})


def log_window(tracker: Tracker, progress: Progress, window: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log the iterations in `window` as one row (log.every); returns the emptied window."""
    if window:
        row = merge_window(window)
        tracker.log(row)
        progress.update(row)
    return []


def close_fleet(fleet: Fleet, wait: bool = True) -> None:
    """Close every worker's environments, then end the backend. A stopping run does not wait for
    workers still busy with an abandoned iteration: ending the backend ends them."""
    for w in fleet.workers if wait else ():
        try:
            fleet.backend.get(fleet.backend.call(w, TaskWorker.close), timeout=30)
        except Exception:  # noqa: BLE001 - a dead worker has nothing left to close
            pass
    fleet.backend.shutdown()


def run(cfg: Config, out: Path, resume: bool = False, local: bool = False, log=print, label: str = "") -> dict[str, Any]:
    """Meta-train as cfg says, writing everything to `out`. Returns the final summary. `label` names
    the configuration in W&B (`config`, the view's grouping; default cfg.label: joint or skip<k>),
    for a sweep's configurations that share a skip count (skip2 and skip2-updates)."""
    out = Path(out)
    ckpt_path = prepare_run_dir(out, resume)
    state = checkpoint.load(ckpt_path) if ckpt_path else None
    if state is not None:
        check_resume(state, cfg, out)
    N, k, algo = cfg.num_tasks, cfg.meta.skip, ALGORITHMS[cfg.meta.algo]
    sizes = group_sizes(N, k)
    if N % k:
        log(f"note: skip {k} does not divide {N} tasks: groups of sizes {sizes} (the last one smaller)")
    if not algo.evaluates and k > 1:
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
        fleet.backend.get(fleet.backend.call(fleet.learner, Learner.load_state, state))
        start_iter = int(state["iteration"])
        rng.bit_generator.state = state["rng"]
        counters.update(state.get("counters", {}))
        _discard_rows_after(out, start_iter)
        log(f"resuming '{out}' from {ckpt_path.name} at iteration {start_iter}")
    log(f"metarl run: {N} tasks, algo {algo.name}, skip {k} -> {len(sizes)} adaptations and "
        f"{N if algo.evaluates else 0} evaluations per iteration; {len(fleet.workers)} workers "
        f"({fleet.backend.name}), learner on {fleet.learner_info['device']}; writing to {out}")

    label = label or cfg.label
    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment,
                      name=cfg.labelled_name(label),
                      config={**config_mod.to_dict(cfg), "skip": k, "algo": algo.name, "config": label,
                              "fold": "+".join(cfg.tasks.heldout)}, mode=cfg.log.wandb_mode,
                      step_key="frames/total")
    progress = Progress(cfg.meta.iterations, start_iter, cfg.log.progress)
    rec: dict[str, Any] = {}
    window: list[dict[str, Any]] = []  # iterations since the last logged row (log.every)
    downtime = Downtime(cfg.ray.task_downtime_s)
    done = start_iter  # iterations finished, logged and counted
    stop = StopRequest(cfg.ray.stop_grace_s, log=log)
    try:
        with stop:
            for it in range(start_iter, cfg.meta.iterations):
                rng_before = rng.bit_generator.state
                try:
                    with stop.iteration():
                        rec = meta_iteration(fleet, cfg.tasks.train, make_groups(N, k, rng), algo.name,
                                             cfg.ray.call_timeout_s, it)
                except KeyboardInterrupt:
                    rng.bit_generator.state = rng_before  # the abandoned iteration is redone on resume
                    break
                lost = downtime.update(cfg.tasks.train, rec["tasks_dropped"], time.time())
                for name, why in rec["drop_reasons"].items():
                    log(f"warning: iteration {it + 1}: task {name} dropped ({why})")
                rec = with_totals(rec, it + 1, k, counters)
                done = it + 1
                window.append(rec)
                last = it + 1 == cfg.meta.iterations
                checkpoint_due = done % cfg.meta.checkpoint_every == 0 or last or stop.requested
                if len(window) == cfg.log.every or checkpoint_due:  # a checkpoint never leaves rows unlogged
                    window = log_window(tracker, progress, window)
                if lost:
                    raise RuntimeError(f"task(s) {', '.join(lost)} failed every iteration for over "
                                       f"{cfg.ray.task_downtime_s:g}s (last: {rec['drop_reasons'].get(lost[0])}); "
                                       f"stopping. Resume with --resume --out {out} once the cause is fixed")
                if len(rec["tasks_dropped"]) == N and not stop.requested:  # nothing worked: give Ray time to restart actors
                    time.sleep(min(2.0 * len(downtime.since), 10.0))
                if stop.requested:
                    break
                if checkpoint_due:
                    save_checkpoint(fleet, out, cfg, rng, counters, done)
            if stop.requested:
                stop.disarm()
                window = log_window(tracker, progress, window)
                path = save_checkpoint(fleet, out, cfg, rng, counters, done)
                how = "abandoned the iteration in flight" if stop.abandoned else "finished the iteration in flight"
                raise Stopped(f"stopped by {stop.signal_name} after iteration {done} of {cfg.meta.iterations} "
                              f"({how}); checkpoint {path}", stop.exit_code)
    finally:
        progress.close()
        tracker.finish()
        close_fleet(fleet, wait=not stop.requested)
    return {"iterations": cfg.meta.iterations, "env_steps": counters["env_steps"], "frames": counters["frames"],
            "wall_s": counters["wall_s"], "last": rec, "run_dir": str(out)}


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
            out[key] = v if all(x == v for x in values) else finite_mean(values)
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
    (out / "actors.json").write_text(json.dumps({"backend": fleet.backend.name, "learner": fleet.learner_info,
                                                 "workers": fleet.worker_info}, indent=1))


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
