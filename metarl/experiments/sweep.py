"""`metarl sweep`: the seed's experiment. Meta-train at every skip count, then compare how fast each
theta, and a network never meta-trained, learns the held-out games.

A sweep directory holds:
  sweep.json                      the settings (config, skips, budget matching, eval), fixed at start
  skip<k>/                        one `metarl run` directory per skip count, with skip<k>/eval/
  baseline/eval/                  the un-pretrained network (theta at iteration 0), evaluated once
  summary.md, summary.csv, comparison.png
  dashboard.json                  with W&B on: the W&B view of these runs (`metarl dashboard`)

Budgets (--match, with --train-budget in its units): `iterations` gives every skip count the same number of meta-iterations;
`env_steps` gives each as many iterations as fit the env-step budget (exact: an iteration at skip k
costs ceil(N/k) S + N rollouts of T x B steps); `seconds` trains in chunks, and after each chunk the
measured seconds per iteration set the next target, until one more iteration would not fit.

Resuming (--resume): a configuration is finished when its eval/eval.json exists and was made from
its final checkpoint; finished ones are skipped, a partly trained one resumes from its latest
checkpoint. On a Ray cluster that fits all configurations at once they run side by side, each
configuration's driver a Ray task on the head node (so every file lands in one directory); on one
machine they run one after another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from metarl.core import checkpoint, config as config_mod
from metarl.experiments import dashboard, folds as fold_summary, references, training
from metarl.core.algorithms import rollouts_per_iteration
from metarl.distributed.backend import RayBackend
from metarl.cliargs import add_cluster_args, add_config_args, add_out_arg, claim_out, resolve_config, retire
from metarl.core.config import Config, ConfigError
from metarl.experiments.evaluate import (EvalSpec, add_eval_args, assemble, checkpoint_theta, default_thresholds, evaluate,
                             mean_curves, meta_compute, spec_from_args)
from metarl.experiments.fastadapt import run_fast_jobs
from metarl.experiments.finetune import FineTuneLearner
from metarl.distributed.fleet import run_cpus, run_gpus
from metarl.distributed.learner import initial_theta
from metarl.core.plots import Panel, Series, markdown_table, save_grid, steps_label, write_csv, write_json
from metarl.distributed.run import RunDirError, run
from metarl.core.stats import nan_stats, pm
from metarl.distributed.stopping import Stopped, StopRequest
from metarl.tasks import make_family
from metarl.distributed.tracking import Tracker, read_metrics

MATCHES = ("iterations", "env_steps", "seconds")
DEFAULT_SKIPS = (1, 2, 3, 4, 6)
PROBE_ITERATIONS = 2
"""Seconds matching: iterations of the first chunk, which measures the seconds per iteration."""


@dataclass(frozen=True)
class SweepSpec:
    skips: tuple[int, ...]
    baseline: bool
    match: str
    budget: float
    """Per configuration, in units of `match`."""
    eval: EvalSpec
    joint: bool = False
    """Also train joint multi-task pre-training (the same loss at theta, no inner loop: fomaml, S = 0)."""
    folds: str = ""
    """'' : tasks.train vs tasks.heldout once; 'loo': leave-one-game-out, one fold per training game."""
    replicates: int = 1
    """Independent meta-training runs per fold: meta.seed s, s + 1, ... (each its own theta0, which is
    also that replicate's fresh network; fine-tuning seeds shifted so no two units share one)."""
    match_updates: bool = False
    """Also train every configuration but skip 1 for skip 1's number of meta-iterations (outer
    updates): `<label>-updates`, beside the budget-matched one."""
    fast: tuple[int, ...] = ()
    """Fast adaptation: inner-loop updates after which the held-out reward per step is measured."""
    fast_rollouts: int = 8
    """Rollouts of T x B env steps per fast-adaptation measurement."""
    references: dict[str, dict[str, float]] | None = None
    """Per game: the random policy's and PPO-from-scratch's scores (`metarl references`), fixed at start."""

    @property
    def labels(self) -> list[str]:
        """The meta-trained configurations, in order."""
        base = [f"skip{k}" for k in self.skips] + (["joint"] if self.joint else [])
        return base + ([f"{b}{UPDATES}" for b in base if b != "skip1"] if self.match_updates else [])

    @property
    def fast_keys(self) -> list[str]:
        return [f"fast_rate_{k}" for k in (0, *self.fast)] if self.fast else []


def spec_from_json(d: dict[str, Any]) -> SweepSpec:
    e = d["eval"]
    tuples = {f.name: tuple(e[f.name]) for f in fields(EvalSpec) if isinstance(e[f.name], list)}
    return SweepSpec(tuple(d["skips"]), d["baseline"], d["match"], d["budget"], EvalSpec(**{**e, **tuples}),
                     d.get("joint", False), d.get("folds", ""), d.get("replicates", 1), d.get("match_updates", False),
                     tuple(d.get("fast", ())), d.get("fast_rollouts", SweepSpec.fast_rollouts), d.get("references"))


UPDATES = "-updates"
"""Suffix of a configuration matched to skip 1 by meta-iterations (outer updates) instead of the budget."""
UPDATES_NOTE = "; <config>-updates: trained for skip 1's meta-iterations, i.e. as many outer updates"


def label_skip(label: str) -> int:
    """The skip count a configuration trains with (joint: 1; baseline: 0, it does not train)."""
    label = label.removesuffix(UPDATES)
    return int(label[4:]) if label.startswith("skip") else (1 if label == "joint" else 0)


def label_config(cfg: Config, label: str) -> Config:
    """The config a configuration label trains: skip<k>, or joint (fomaml with no inner loop)."""
    if label.removesuffix(UPDATES) == "joint":
        cfg = config_mod.override(config_mod.override(cfg, "meta.algo", "fomaml"), "meta.inner_steps", 0)
    return config_mod.override(cfg, "meta.skip", label_skip(label))


def folds(cfg: Config, spec: SweepSpec, out: Path) -> list[tuple[str, Config, SweepSpec, Path]]:
    """(held-out game, config, spec, directory) per fold: one fold (the config's own split) or, with
    folds = loo, one per training game, trained on the others and evaluated on it alone."""
    if not spec.folds:
        return [("", cfg, spec, out)]
    out_folds = []
    for game in cfg.tasks.train:
        rest = [g for g in cfg.tasks.train if g != game]
        cfg_g = config_mod.override(config_mod.override(cfg, "tasks.train", rest), "tasks.heldout", [game])
        spec_g = replace(spec, eval=replace(spec.eval, games=(game,)), folds="")
        out_folds.append((game, config_mod.validate(cfg_g), spec_g, out / f"fold-{game}"))
    return out_folds


def units(cfg: Config, spec: SweepSpec, out: Path) -> list[tuple[str, int, Config, SweepSpec, Path]]:
    """(held-out game, meta-seed, config, spec, directory) per unit: every fold times every
    replicate, replicate by replicate (a sweep stopped early has covered the folds evenly).
    Replicate r trains with meta.seed + r (its own theta0 and fresh network) and fine-tunes with
    seeds shifted by r x the number of seeds; with one replicate a fold's directory is the unit's,
    with more each replicate has fold-<game>/seed<s>/."""
    out_units = []
    fold_list = folds(cfg, spec, out)
    for r in range(spec.replicates):
        for game, cfg_f, spec_f, dir_f in fold_list:
            seed = cfg.meta.seed + r
            n = len(spec.eval.seeds)
            spec_u = replace(spec_f, eval=replace(spec_f.eval, seeds=tuple(s + r * n for s in spec_f.eval.seeds)))
            out_units.append((game, seed, config_mod.override(cfg_f, "meta.seed", seed), spec_u,
                              dir_f / f"seed{seed}" if spec.replicates > 1 else dir_f))
    return out_units


# ------------------------------------------------------------------------------------------
# budgets


def iteration_env_steps(cfg: Config, skip: int) -> int:
    """Env steps of one meta-iteration at skip k: its rollouts (`rollouts_per_iteration`) of T x B
    steps each."""
    rollouts = rollouts_per_iteration(cfg.num_tasks, skip, cfg.meta.inner_steps, cfg.meta.algo)
    return rollouts * cfg.env.num_envs * cfg.env.rollout_len


def target_iterations(cfg: Config, skip: int, match: str, budget: float) -> int | None:
    """Meta-iterations skip k gets under the budget; None for seconds (decided while training)."""
    if match == "iterations":
        return int(budget)
    if match == "env_steps":
        return int(budget // iteration_env_steps(cfg, skip))
    return None


def skip_config(cfg: Config, label: str, iterations: int) -> Config:
    cfg = label_config(cfg, label)
    return config_mod.validate(config_mod.override(cfg, "meta.iterations", iterations))


# ------------------------------------------------------------------------------------------
# one configuration: train (start, resume or nothing), then evaluate


def trained_iteration(run_dir: Path) -> int:
    latest = checkpoint.latest(run_dir)
    return int(checkpoint.CKPT_RE.match(latest.name).group(1)) if latest else 0


def move_aside(path: Path, why: str, log: Callable[[str], None]) -> None:
    """Keep an unusable partial directory for inspection instead of deleting it."""
    n = 1
    while path.with_name(f"{path.name}.incomplete-{n}").exists():
        n += 1
    aside = path.with_name(f"{path.name}.incomplete-{n}")
    path.rename(aside)
    log(f"note: {path} {why}; moved to {aside}")


def train_to(cfg: Config, run_dir: Path, local: bool, log: Callable[[str], None], label: str = "") -> None:
    """Bring run_dir to cfg.meta.iterations: a new run, a resumed one, or nothing."""
    done = trained_iteration(run_dir)
    if done >= cfg.meta.iterations:
        return
    if done == 0 and run_dir.exists():
        move_aside(run_dir, "stopped before its first checkpoint", log)
    run(cfg, run_dir, resume=done > 0, local=local, log=log, label=label)


def train_for_seconds(cfg: Config, run_dir: Path, seconds: float, local: bool, log: Callable[[str], None],
                      max_chunks: int = 10, label: str = "") -> None:
    """Train in chunks until one more iteration, at the measured seconds per iteration, would not
    fit `seconds` of meta-iteration time (the counters' wall_s: actor start-up is not counted)."""
    target = PROBE_ITERATIONS
    for _ in range(max_chunks):
        train_to(config_mod.override(cfg, "meta.iterations", target), run_dir, local, log, label)
        state = checkpoint.load(checkpoint.latest(run_dir))
        done, wall = int(state["iteration"]), float(state["counters"]["wall_s"])
        extra = math.floor((seconds - wall) / (wall / done))
        if extra < 1:
            return
        target = done + extra


def configured_iterations(cfg: Config, spec: SweepSpec, label: str) -> int | None:
    """The meta-iterations a configuration trains: what fits the budget, or for `<label>-updates`
    what skip 1 gets (the same number of outer updates)."""
    if label.endswith(UPDATES):
        return target_iterations(label_config(cfg, "skip1"), 1, spec.match, spec.budget)
    return target_iterations(label_config(cfg, label), label_skip(label), spec.match, spec.budget)


def finished(run_dir: Path, target: int | None) -> bool:
    """eval/eval.json exists, was made from the latest checkpoint, and that one is the final one."""
    result = run_dir / "eval" / "eval.json"
    if not result.exists():
        return False
    done = trained_iteration(run_dir)
    evaluated = json.loads(result.read_text()).get("iteration")
    return evaluated == done and (target is None or done >= target)


def run_config(cfg: Config, spec: SweepSpec, label: str, sweep_dir: Path, local: bool,
               eval_workers: int = 0, log: Callable[[str], None] = print) -> None:
    """Meta-train one configuration (skip<k> or joint) under the budget, then evaluate its final
    theta on the held-out games."""
    run_dir = sweep_dir / label
    skip = label_skip(label)
    target = configured_iterations(cfg, spec, label)
    if finished(run_dir, target):
        log(f"sweep: {label} is finished; not re-run")
        return
    log(f"sweep: {sweep_dir.name}/{label}: meta-training {target or 'seconds-matched'} iterations, then fine-tuning "
        f"on {', '.join(spec.eval.games)}")
    cfg_k = skip_config(cfg, label, target or PROBE_ITERATIONS)
    if spec.match == "seconds":
        train_for_seconds(cfg_k, run_dir, spec.budget, local, log, label=label)
    else:
        train_to(cfg_k, run_dir, local, log, label)
    path = checkpoint.latest(run_dir)
    state = checkpoint.load(path)
    iteration = int(state["iteration"])
    cfg_k = config_mod.override(cfg_k, "meta.iterations", iteration)
    theta = checkpoint_theta(state, make_family(cfg_k), path)
    if (run_dir / "eval").exists():
        move_aside(run_dir / "eval", "is an unfinished or stale evaluation", log)
    fast_adaptation(cfg_k, spec, {"meta": theta}, run_dir / "eval", local, eval_workers, log)
    evaluate(cfg_k, {"meta": theta}, spec.eval, run_dir / "eval", name=f"{cfg_k.labelled_name(label)}-eval", local=local,
             workers=eval_workers, info={"config": label, "skip": skip, "iteration": iteration,
                                         "fold": "+".join(cfg.tasks.heldout), "checkpoint": str(path),
                                         "meta_seed": cfg.meta.seed, **meta_compute(state)}, log=log)


def fast_adaptation(cfg: Config, spec: SweepSpec, thetas: dict[str, Any], out: Path, local: bool,
                    workers: int, log: Callable[[str], None]) -> None:
    """With spec.fast: the held-out reward per step after each count of inner-loop updates, per
    game and seed, into out/fast.json (written before eval.json, which marks the evaluation done)."""
    if not spec.fast:
        return
    out.mkdir(parents=True, exist_ok=True)
    jobs = run_fast_jobs(make_family(cfg), cfg, thetas, spec.eval.games, spec.eval.seeds, local,
                         cfg.ray.address, workers, updates=spec.fast, eval_rollouts=spec.fast_rollouts, log=log)
    write_json(out / "fast.json", {"updates": [0, *spec.fast], "eval_rollouts": spec.fast_rollouts, "jobs": jobs})


def run_baseline(cfg: Config, spec: SweepSpec, sweep_dir: Path, local: bool, eval_workers: int = 0,
                 log: Callable[[str], None] = print) -> None:
    """The un-pretrained network: theta at meta-iteration 0 (the Learner's seeded init), once."""
    out = sweep_dir / "baseline" / "eval"
    if (out / "eval.json").exists():
        log("sweep: baseline is finished; not re-run")
        return
    if out.exists():
        move_aside(out, "is an unfinished evaluation", log)
    log(f"sweep: {sweep_dir.name}/baseline: fine-tuning the un-pretrained network on {', '.join(spec.eval.games)}")
    theta = initial_theta(make_family(cfg), cfg.meta.seed)
    fast_adaptation(cfg, spec, {"fresh": theta}, out, local, eval_workers, log)
    evaluate(cfg, {"fresh": theta}, spec.eval, out, name=f"{cfg.log.experiment}-baseline-seed{cfg.meta.seed}-eval",
             local=local, workers=eval_workers, info={"config": "baseline", "skip": 0, "iteration": 0,
                                                      "fold": "+".join(cfg.tasks.heldout), "meta_seed": cfg.meta.seed,
                                                      **meta_compute({})}, log=log)


# ------------------------------------------------------------------------------------------
# all configurations: one after another, or side by side on a cluster


def side_by_side(cfg: Config, n_configs: int, local: bool) -> tuple[bool, str]:
    """Run configurations concurrently only on a cluster that fits all of them at once (so no
    configuration waits on actors another one holds)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if local or not address or n_configs < 2:
        return False, "configurations run one after another (one machine)"
    import ray

    if not ray.is_initialized():
        ray.init(address=address)
    res = ray.cluster_resources()
    cpus, gpus = n_configs * run_cpus(cfg), n_configs * run_gpus(cfg, res.get("GPU", 0) > 0)
    if res.get("CPU", 0) < cpus or res.get("GPU", 0) < gpus:
        return False, (f"{n_configs} configurations at once need {cpus:g} CPUs and {gpus:g} GPUs, the cluster has "
                       f"{res.get('CPU', 0):g} and {res.get('GPU', 0):g}: one after another")
    return True, f"{n_configs} configurations side by side on the cluster ({cpus:g} of {res['CPU']:g} CPUs)"


def run_all(cfg: Config, spec: SweepSpec, sweep_dir: Path, local: bool, log: Callable[[str], None]) -> None:
    n = len(spec.labels) + int(spec.baseline)
    parallel, why = side_by_side(cfg, n, local)
    log(f"sweep: {why}")
    if not parallel:
        backend = None if local else RayBackend(cfg.ray.address, cfg.ray.num_cpus)  # one Ray for all runs
        try:
            for label in spec.labels:
                run_config(cfg, spec, label, sweep_dir, local, log=log)
            if spec.baseline:
                run_baseline(cfg, spec, sweep_dir, local, log=log)
        finally:
            if backend is not None:
                backend.shutdown()
        return
    import ray

    # each driver's evaluation uses no more actors than its training reserved, so all fit at once
    share = max(1, int(run_cpus(cfg)))
    head = {"node:__internal_head__": 0.001}
    config_task = ray.remote(run_config).options(num_cpus=0, max_retries=0, resources=head)
    refs = [config_task.remote(cfg, spec, label, sweep_dir, False, share, print) for label in spec.labels]
    if spec.baseline:
        refs.append(ray.remote(run_baseline).options(num_cpus=0, max_retries=0, resources=head)
                    .remote(cfg, spec, sweep_dir, False, share, print))
    ray.get(refs)


# ------------------------------------------------------------------------------------------
# the summary: one table, one comparison plot


def compute_columns(run_dir: Path) -> dict[str, Any]:
    """What meta-training cost: from the final checkpoint's counters and the metrics rows it covers."""
    state = checkpoint.load(checkpoint.latest(run_dir))
    it, c = int(state["iteration"]), state["counters"]
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("iteration", 0) <= it]
    return {"iterations": it, "env_steps": int(c["env_steps"]), "frames": int(c["frames"]),
            # runs logged before adaptations excluded stepless ones: none when the inner loop takes no step
            "adaptations": sum(r["adaptations"] for r in rows) if state["config"]["meta"]["inner_steps"] else 0,
            "evaluations": sum(r["evaluations"] for r in rows),
            "env_steps_adapt": sum(r.get("env_steps/adapt", 0) for r in rows),
            "env_steps_eval": sum(r.get("env_steps/eval", 0) for r in rows),
            "wall_s": round(float(c["wall_s"]), 1)}


def fast_scores(eval_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(game, seed) -> fast_rate_<k>, fast_return_<k> and fast_diverged from eval/fast.json (empty
    without it)."""
    path = eval_dir / "fast.json"
    if not path.exists():
        return {}
    out = {}
    for j in json.loads(path.read_text())["jobs"]:
        f = j["fast"]
        out[(j["game"], int(j["seed"]))] = {
            **{f"fast_rate_{k}": math.nan if v is None else float(v) for k, v in zip(f["updates"], f["reward_rate"])},
            **{f"fast_return_{k}": math.nan if v is None else float(v) for k, v in zip(f["updates"], f["return"])},
            "fast_diverged": bool(f["diverged"])}  # its later points are NaN: counted, not averaged
    return out


def training_rows(run: dict, label: str, fold: str, meta_seed: int, last: float = 0.2) -> list[dict[str, Any]]:
    """A meta-run (`training.read_run`) on its own games: per training game, the return of the
    episodes that ended in its rollouts and its evaluation rollouts' reward per step over the last
    `last` share of the run's env steps, and the adaptation gain."""
    per_game = run["rows"][-1]["env_steps/total"] / len(run["games"])
    return [{"config": label, "fold": fold, "meta_seed": meta_seed, "game": g, "env_steps_per_game": per_game,
             "final": training.last_share_mean(*training.episodes(run, g), per_game, last),
             "rate_last": training.last_share_rate(run, g, last),
             "adaptation_gain": training.adaptation_gain(run, g)} for g in run["games"]]


def collect(sweep_dir: Path, spec: SweepSpec, meta_seed: int = 0
            ) -> tuple[list[dict[str, Any]], dict[str, dict], list[dict[str, Any]]]:
    """Table rows (one per configuration and game), mean curves per configuration, and per-seed
    scores. Scores are recomputed from the stored traces, with every game's threshold taken from
    the baseline."""
    configs = [(label, label_skip(label), sweep_dir / label) for label in spec.labels]
    configs += [("baseline", 0, sweep_dir / "baseline")] if spec.baseline else []
    jobs = {label: json.loads((d / "eval" / "eval.json").read_text())["jobs"] for label, _, d in configs}
    thresholds = ({g: spec.eval.threshold for g in spec.eval.games} if spec.eval.threshold is not None
                  else default_thresholds(jobs["baseline"], spec.eval.window) if spec.baseline else {})
    rows, curves, per_seed = [], {}, []
    zero = {"iterations": 0, "env_steps": 0, "frames": 0, "adaptations": 0, "evaluations": 0,
            "env_steps_adapt": 0, "env_steps_eval": 0, "wall_s": 0.0}
    for label, skip, d in configs:
        cost = compute_columns(d) if label != "baseline" else zero
        result = assemble(jobs[label], spec.eval, thresholds)
        curves[label] = {game: c for (game, _), c in mean_curves(result["jobs"]).items()}
        for s in result["summary"]:
            rows.append({"config": label, "skip": skip, **cost, "game": s["game"], "seeds": s["seeds"],
                         **{k: v for k, v in s.items() if k.endswith(("_mean", "_std", "_ci95", "_median"))},
                         "threshold": s["threshold"], "reached": s["reached"], "diverged": s["diverged"]})
        fast = fast_scores(d / "eval")
        for j in result["jobs"]:
            sc = j["score"]
            per_seed.append({"config": label, "game": j["game"], "meta_seed": meta_seed, "seed": j["seed"], **cost,
                             **fast.get((j["game"], int(j["seed"])), {}),
                             "auc_return": sc["auc_return"], "final_return": sc["final_return"],
                             "auc_reward_rate": sc["auc_reward_rate"],
                             **{f"return_at_{b}": v for b, v in sc["return_at"].items()},
                             "steps_to_threshold": sc["steps_to_threshold"],
                             "diverged": bool(j["trace"].get("diverged"))})
    return rows, curves, per_seed


def write_summary(sweep_dir: Path, spec: SweepSpec, rows: list[dict], curves: dict[str, dict]) -> Path:
    write_csv(sweep_dir / "summary.csv", rows)
    shown = [{**r, "auc": pm(r["auc_return_mean"], r["auc_return_ci95"]) + f" (median {r['auc_return_median']:.2f})",
              "rate": pm(r["auc_reward_rate_mean"], r["auc_reward_rate_ci95"], ".4f"),
              "final": pm(r["final_return_mean"], r["final_return_ci95"]),
              "steps": f"{pm(r['steps_to_threshold_mean'], r['steps_to_threshold_std'], '.0f')} "
                       f"({r['reached']}/{r['seeds']})",
              "threshold": pm(r["threshold"])} for r in rows]
    columns = {"config": "config", "skip": "skip", "iterations": "meta-iterations", "env_steps": "meta env steps",
               "frames": "meta frames", "adaptations": "inner adaptations", "evaluations": "evaluations",
               "wall_s": "wall s", "game": "held-out game", "auc": "AUC return", "rate": "AUC score/step",
               "final": "final return", "threshold": "threshold", "steps": "steps to threshold (reached)",
               "diverged": "diverged"}
    e = spec.eval
    (sweep_dir / "summary.md").write_text(
        f"# Sweep: {', '.join(spec.labels)}{' + baseline' if spec.baseline else ''}\n\n"
        f"Meta-training budget matched by {spec.match} ({spec.budget:g}). Held-out fine-tuning: {e.budget:,} env "
        f"steps per game and seed, {len(e.seeds)} seeds; values are mean ± 95% interval over seeds (t-based; "
        f"AUC also median; diverged: fine-tuning runs whose loss or parameters became non-finite). AUC return: mean "
        f"running return (last {e.window} episodes) over the budget; AUC score/step: raw score per agent step; "
        f"threshold: the baseline's final return unless set; n/a: no episode finished.\n\n"
        + markdown_table(shown, columns))
    return plot_comparison(sweep_dir / "comparison.png", rows, curves)


def plot_comparison(path: Path, rows: list[dict], curves: dict[str, dict]) -> Path:
    """Per game: fine-tuning curves of every configuration, and each configuration's held-out AUC
    against the frames its meta-training cost (the efficiency view)."""
    panels = []
    for game in dict.fromkeys(r["game"] for r in rows):
        for key, label in (("return", "return"), ("reward_rate", "raw score per agent step")):
            panels.append(Panel(f"{game}: fine-tuning {label}", steps_label("fine-tuning"), label,
                                [Series(cfg, c[game]["env_steps"], c[game][key], c[game][f"{key}_std"])
                                 for cfg, c in curves.items()], empty_note="no episode finished"))
        for key, label in (("auc_return", "AUC return"), ("auc_reward_rate", "AUC score/step")):
            mine = [r for r in rows if r["game"] == game]
            panels.append(Panel(f"{game}: {label} vs meta-training cost", steps_label("meta-training"), label,
                                [Series(r["config"], [r["env_steps"]], [r[f"{key}_mean"]], [r[f"{key}_ci95"]])
                                 for r in mine], kind="points", empty_note="no episode finished"))
    return save_grid(path, panels, 4, "held-out learning speed by configuration (mean, 95% interval over seeds)")


# ------------------------------------------------------------------------------------------
# the sweep and its command


def prepare(out: Path, cfg: Config, spec: SweepSpec) -> None:
    """A new sweep directory: refuse to reuse one (resuming is explicit), record the settings."""
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"sweep directory '{out}' already exists; pass --resume to continue it "
                          f"or --out for a new one")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"config": config_mod.to_dict(cfg), "spec": asdict(spec)})


def load_sweep(out: Path) -> tuple[Config, SweepSpec]:
    path = out / "sweep.json"
    if not path.is_file():
        raise RunDirError(f"--resume: '{out}' holds no sweep.json; drop --resume to start a sweep there")
    stored = json.loads(path.read_text())
    return config_mod.validate(config_mod.from_dict(stored["config"])), spec_from_json(stored["spec"])


def add_replicates(out: Path, spec: SweepSpec, replicates: int) -> SweepSpec:
    """Extend a stored sweep to `replicates` meta-training replicates per fold (`--resume
    --replicates R`): the new units (meta-seeds past the stored ones) come after the existing ones
    in unit order, so finished units and shard assignments stay as they were; the summary is
    rewritten over every unit once all are finished."""
    if replicates < spec.replicates:
        raise ConfigError(f"--replicates {replicates} with --resume can only add replicates: the sweep in {out} has "
                          f"{spec.replicates}; give more, or drop --replicates")
    if spec.replicates == 1:
        raise ConfigError(f"the sweep in {out} has one replicate, whose units are the fold directories themselves; "
                          f"replicates cannot be added to it: start a new sweep with --replicates {replicates}")
    stored = json.loads((out / "sweep.json").read_text())
    stored["spec"]["replicates"] = replicates
    write_json(out / "sweep.json", stored)
    print(f"sweep: {out} extended from {spec.replicates} to {replicates} meta-training replicates per fold "
          f"(sweep.json rewritten; other shards resume with plain --resume)")
    return replace(spec, replicates=replicates)


def unit_finished(cfg: Config, spec: SweepSpec, unit_dir: Path) -> bool:
    """Every configuration of a unit trained to its target and evaluated, and its baseline evaluated."""
    done = all(finished(unit_dir / label, configured_iterations(cfg, spec, label)) for label in spec.labels)
    return done and (not spec.baseline or (unit_dir / "baseline" / "eval" / "eval.json").exists())


def sweep(cfg: Config, spec: SweepSpec, out: Path, local: bool = False,
          log: Callable[[str], None] = print, shard: tuple[int, int] = (0, 1)) -> list[dict[str, Any]]:
    """Train and evaluate every configuration not finished yet in `out` (in every fold and
    replicate), then write the summaries: per unit, and over units for --folds loo. With
    shard = (k, n) this process runs only the units whose index is k mod n (several processes, or
    drivers on a cluster, share one sweep directory); the summaries are written by whichever
    finds every unit finished."""
    unit_list = units(cfg, spec, out)
    k, n_shards = shard
    for n, (game, meta_seed, cfg_u, spec_u, dir_u) in enumerate(unit_list, 1):
        if (n - 1) % n_shards != k:
            continue
        if game or spec.replicates > 1:
            log(f"sweep: unit {n}/{len(unit_list)}: meta-train on {', '.join(cfg_u.tasks.train)} with meta-seed "
                f"{meta_seed}{f', hold out {game}' if game else ''}")
            dir_u.mkdir(parents=True, exist_ok=True)
        run_all(cfg_u, spec_u, dir_u, local, log)
    waiting = [u for u in unit_list if not unit_finished(u[2], spec, u[4])]
    if waiting:
        log(f"sweep: {len(unit_list) - len(waiting)} of {len(unit_list)} units finished (other shards run the rest, "
            f"e.g. {waiting[0][4]}); the summary is written when all are: metarl sweep --resume --out {out}")
        return []
    rows, per_seed, pngs, trained = [], [], {}, []
    curve_sets: dict[str, dict[str, list[dict]]] = {}
    for game, meta_seed, cfg_u, spec_u, dir_u in unit_list:
        rows_u, curves_u, seeds_u = collect(dir_u, spec_u, meta_seed)
        key = "/".join(p for p in (game, f"seed{meta_seed}" if spec.replicates > 1 else "") if p)
        pngs[f"comparison/{key}" if key else "comparison"] = write_summary(dir_u, spec_u, rows_u, curves_u)
        rows += [{**r, "fold": game, "meta_seed": meta_seed} for r in rows_u]
        per_seed += seeds_u
        for label in spec.labels:
            run = training.read_run(dir_u / label)  # metrics.jsonl read once for both uses
            trained += training_rows(run, label, game, meta_seed)
            (out / "training").mkdir(exist_ok=True)
            name = "_".join(p for p in (game, f"seed{meta_seed}", label) if p)
            write_csv(out / "training" / f"{name}.csv",  # 6 decimals: rates are counts over 512-step rollouts
                      [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
                       for r in training.per_game_rows(run)])
        for label, by in curves_u.items():
            for g, c in by.items():
                curve_sets.setdefault(g, {}).setdefault(label, []).append(c)
    by_game = {g: {label: mean_of_curves(cs) for label, cs in by.items()} for g, by in curve_sets.items()}
    if spec.folds:
        e = spec.eval
        header = (f"# Leave-one-game-out: {', '.join(spec.labels)}{' + fresh network' if spec.baseline else ''}\n\n"
                  f"Every fold meta-trains on the other {len(cfg.tasks.train) - 1} games; budget matched by "
                  f"{spec.match} ({spec.budget:g} per configuration and fold"
                  f"{UPDATES_NOTE if spec.match_updates else ''}); {spec.replicates} "
                  f"meta-training replicate(s) per fold. Held-out fine-tuning: {finetune_label(cfg)}, {e.budget:,} env "
                  f"steps, {len(e.seeds)} seeds per unit and init"
                  f"{f'; fast adaptation after {list(spec.fast)} inner updates' if spec.fast else ''}. "
                  f"AUC: mean running return (last {e.window} episodes) over the budget.")
        for path in fold_summary.write(out, per_seed, by_game, spec.labels + (["baseline"] if spec.baseline else []),
                                       header, [str(b) for b in e.at], spec.references, spec.fast_keys, trained):
            pngs[path.stem] = path
    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment, name=f"{cfg.log.experiment}-sweep",
                      config={**config_mod.to_dict(cfg), "sweep": asdict(spec)}, mode=cfg.log.wandb_mode,
                      job_type="sweep", metrics_file="sweep_metrics.jsonl", step_key="skip")
    try:
        for key, png in pngs.items():
            tracker.log_image(key, png)
        tracker.summary({f"{r['fold'] + '/' if r['fold'] else ''}{r['config']}/{r['game']}/{k}": v for r in rows
                         for k, v in r.items() if k.endswith(("_mean", "_ci95", "_median"))
                         or k in ("env_steps", "frames", "wall_s", "iterations")})
    finally:
        tracker.finish()
    if tracker.mode != "disabled":
        dashboard.publish(out, tracker.mode, log)
    return rows


def mean_of_curves(curves: list[dict]) -> dict[str, Any]:
    """Units' mean curves of one (game, configuration) averaged point by point (one grid)."""
    if len(curves) == 1:
        return curves[0]
    out = {k: curves[0][k] for k in ("env_steps", "frames")}
    for key in ("return", "reward_rate"):
        mean, std, _ = nan_stats([c[key] for c in curves])
        out[key], out[f"{key}_std"] = mean.tolist(), std.tolist()
    return out


def finetune_label(cfg: Config) -> str:
    return FineTuneLearner.of(cfg).label


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be integers separated by commas, e.g. 1,2,3,4,6") from None


def spec_from_sweep_args(args: argparse.Namespace, cfg: Config) -> SweepSpec:
    skips = _ints(args.skips, "--skips") if args.skips else DEFAULT_SKIPS
    if not skips or len(set(skips)) != len(skips):
        raise ConfigError(f"--skips {args.skips!r} must list each skip count once")
    eval_cfg = cfg
    if args.folds:
        if len(cfg.tasks.train) < 2:
            raise ConfigError("--folds loo needs at least two games in tasks.train (one is held out per fold)")
        if args.games:
            raise ConfigError("--folds loo holds out each training game in turn; drop --games")
        eval_cfg = config_mod.override(cfg, "tasks.heldout", list(cfg.tasks.train))
        cfg = config_mod.validate(config_mod.override(cfg, "tasks.train", list(cfg.tasks.train[1:])))
    for k in skips:
        if k > len(cfg.tasks.train):
            raise ConfigError(f"--skips: meta.skip = {k} does not fit the {len(cfg.tasks.train)} training games of a "
                              f"{'fold' if args.folds else 'run'}; choose 1..{len(cfg.tasks.train)}")
        skip_config(cfg, f"skip{k}", 1)  # a skip count that does not fit the tasks fails here, naming meta.skip
    match = args.match or "iterations"
    if args.train_budget is None and match == "seconds":
        raise ConfigError("--match seconds needs --train-budget SECONDS of meta-iteration time per configuration")
    budget = args.train_budget if args.train_budget is not None else (
        cfg.meta.iterations if match == "iterations" else cfg.meta.iterations * iteration_env_steps(cfg, 1))
    if not budget > 0 or (match == "iterations" and budget != int(budget)):
        kind = "whole number" if match == "iterations" else "number"
        raise ConfigError(f"--train-budget {budget:g} must be a positive {kind}")
    for k in skips:
        if match == "env_steps" and target_iterations(cfg, k, match, budget) < 1:
            raise ConfigError(f"--train-budget {budget:g} env steps is less than one meta-iteration at skip {k} "
                              f"({iteration_env_steps(cfg, k):,} env steps)")
    if args.match_updates and (match == "iterations" or 1 not in skips):
        raise ConfigError("--match-updates adds configurations trained for skip 1's meta-iterations: it needs skip 1 "
                          "in --skips and a --match other than iterations (there every configuration already has them)")
    if args.replicates is not None and args.replicates < 1:
        raise ConfigError(f"--replicates {args.replicates} must be at least 1")
    fast = _ints(args.fast, "--fast") if args.fast else ()
    if fast and (list(fast) != sorted(set(fast)) or fast[0] < 1):
        raise ConfigError(f"--fast {args.fast!r} must be increasing counts of inner updates, e.g. 1,3,10")
    if args.fast_rollouts is not None and args.fast_rollouts < 1:
        raise ConfigError(f"--fast-rollouts {args.fast_rollouts} must be at least 1")
    eval_spec = spec_from_args(args, eval_cfg)
    refs = None
    if args.references:
        refs = references.load(Path(args.references), eval_spec.games, budget=eval_spec.budget,
                               window=eval_spec.window)
        for g in eval_spec.games:  # a game whose references cannot scale it is refused now, not dropped later
            references.normalise(0.0, g, refs)
            references.normalise(0.0, g, refs, key="rate")
        refs = {g: refs[g] for g in eval_spec.games}
    return SweepSpec(skips, not args.no_baseline, match, float(budget), eval_spec,
                     joint=args.joint, folds=args.folds or "", replicates=args.replicates or 1,
                     match_updates=args.match_updates, fast=fast,
                     fast_rollouts=args.fast_rollouts or SweepSpec.fast_rollouts, references=refs)


SETTINGS = ("config", "set", "seed", "skips", "no_baseline", "joint", "folds", "match", "train_budget",
            "games", "steps", "seeds", "points", "window", "threshold", "at_steps", "replicates", "match_updates",
            "fast", "fast_rollouts", "references")


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N): this process runs units K, K + N, ... (0-based)."""
    if not text:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"--shard {text!r} must be K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two processes")
    return k, n


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out DIR: the sweep directory to continue")
        given = [s for s in SETTINGS if s != "replicates" and getattr(args, s) not in (None, [], False)]
        if given:
            raise ConfigError(f"--resume continues the sweep as stored in {args.out}/sweep.json; "
                              f"drop --{given[0].replace('_', '-')}")
        out = Path(args.out)
        cfg, spec = load_sweep(out)
        if args.replicates is not None and args.replicates != spec.replicates:
            spec = add_replicates(out, spec, args.replicates)
        cfg = resolve_config(args, base=cfg)  # only the cluster flags are left to apply
    else:
        if args.out:
            claim_out(args.out, resumable=True)
        cfg = resolve_config(args)
        spec = spec_from_sweep_args(args, cfg)
        out = Path(args.out or f"runs/sweep-{cfg.log.experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
        prepare(out, cfg, spec)
    shard = parse_shard(args.shard)
    again = (f"metarl sweep --resume --out {shlex.quote(str(out))}" + (" --local" if args.local else "")
             + (f" --shard {args.shard}" if args.shard else ""))
    # a stop while fine-tuning abandons it at once (it is redone on resume); while meta-training,
    # the run finishes or abandons its iteration in flight and checkpoints (metarl.distributed.run)
    with StopRequest(0.0, what="the sweep's fine-tuning in flight (redone on resume)") as stop:
        try:
            with stop.iteration():
                rows = sweep(cfg, spec, out, local=args.local, shard=shard)
        except Stopped as e:
            print(f"metarl: sweep: {e}\nresume with: {again}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print(f"metarl: sweep: stopped by {stop.signal_name}\nresume with: {again}", file=sys.stderr)
            return stop.exit_code
    if not rows:
        return 0  # this shard's units are done; another shard's are not
    print((out / "summary.md").read_text())
    print(f"sweep written to {out}: summary.md, summary.csv, comparison.png ({len(rows)} rows)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="the seed's experiment: skip counts + un-pretrained baseline, compared")
    add_config_args(p)
    p.add_argument("--skips", help=f"skip counts, comma separated (default {','.join(map(str, DEFAULT_SKIPS))})")
    p.add_argument("--no-baseline", action="store_true", help="leave out the un-pretrained network")
    p.add_argument("--joint", action="store_true",
                   help="also train joint multi-task pre-training (same loss at theta, no inner loop) under the same budget")
    p.add_argument("--folds", choices=("loo",), help="loo: leave-one-game-out over tasks.train, one fold per game")
    p.add_argument("--replicates", type=int, metavar="R",
                   help="independent meta-training runs per fold, meta.seed s..s+R-1, each with its own theta0 and "
                        "fresh network (default 1); intervals are over fold x replicate units. With --resume: "
                        "extend the stored sweep to R replicates (only more)")
    p.add_argument("--match-updates", action="store_true",
                   help="also train every configuration but skip 1 for skip 1's meta-iterations (<label>-updates)")
    p.add_argument("--fast", metavar="K,K,...",
                   help="fast adaptation: held-out reward per step after these counts of inner updates, e.g. 1,3,10")
    p.add_argument("--fast-rollouts", type=int, metavar="N",
                   help=f"rollouts per fast-adaptation measurement (default {SweepSpec.fast_rollouts})")
    p.add_argument("--references", metavar="FILE",
                   help="references.csv of `metarl references` (random policy, PPO from scratch at --steps): "
                        "normalises and pools the folds; stored in sweep.json")
    p.add_argument("--match", choices=MATCHES, help="what every configuration gets the same of (default iterations)")
    p.add_argument("--train-budget", type=float, metavar="X",
                   help="meta-training per configuration, in --match units: meta-iterations, env steps or seconds "
                        "(default: meta.iterations, or what skip 1 spends in them; seconds needs it)")
    add_eval_args(p, budget_was="sweep --budget (meta-training, in --match units) is now --train-budget; "
                                "--steps is the fine-tuning env steps")
    retire(p, "--eval-budget", "now --steps N (env steps of fine-tuning, as in eval)")
    retire(p, "--eval-seeds", "now --seeds N (fine-tuning seeds, as in eval)")
    add_out_arg(p, "the sweep", default="runs/sweep-<experiment>-<time>", resumable=True)
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out with its stored settings")
    p.add_argument("--shard", metavar="K/N",
                   help="run only units K, K+N, ... (0-based) of the sweep: N processes share one --out (start the "
                        "first, then the others with --resume); the summary is written once all units are finished")
    add_cluster_args(p, "run every actor in this process, without Ray", progress=True)
    p.set_defaults(func=cmd_sweep)
