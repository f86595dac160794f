"""`metarl eval`: how fast a meta-trained theta learns held-out games, next to a network never
meta-trained.

For every held-out game, every initialisation — `meta` (the checkpoint's theta) and `fresh` (theta
at meta-iteration 0: the Learner's own seeded initialisation) — and every evaluation seed, the
network is fine-tuned with the inner-loop learner of meta-training: plain SGD with step alpha
(meta.inner_lr), one step per fresh rollout of T x B env steps (`metarl.core.meta.adapt` with S = 1,
repeated) until the env-step budget is spent. Both inits of one (game, seed) see the same emulator
and action-sampling seeds.

The learning curve is the raw game score of the episodes that end *while fine-tuning*, under the
protocol of training (sticky actions, full action set, game-over termination, unclipped scores),
as the running mean of the last `window` finished episodes: performance during learning, the
summary Machado et al. (2018) recommend, with no separate evaluation phase (an Atari evaluation
episode can take 27,000 agent steps, more than a small budget). The raw score per agent step of
each curve window is recorded too; it is defined before the first episode ends.

Scores per (game, init, seed), all from the per-step trace:
  auc_return          mean running return over the fine-tuning steps (area under the curve / budget)
  auc_reward_rate     raw score per agent step over the whole budget
  final_return        running return after the last step; return_at: when env steps reach each `at`
  steps_to_threshold  first env step with running return >= the game's threshold (None: never); the
                      default threshold is the fresh network's mean final return on that game
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from metarl.core import checkpoint, config as config_mod
from metarl.distributed.backend import LocalBackend, RayBackend
from metarl.cliargs import (add_at_steps_arg, add_cluster_args, add_config_args, add_finetune_args, add_out_arg,
                            add_seeds_arg, add_steps_arg, claim_out, env_steps_list, resolve_config)
from metarl.core.config import Config, ConfigError
from metarl.experiments.finetune import FineTuneLearner, FineTuner
from metarl.distributed.learner import initial_theta
from metarl.core.plots import Panel, Series, save_grid, steps_label, write_csv, write_json
from metarl.core.policy import ParamSpec
from metarl.core.seeds import task_seed
from metarl.core.stats import ci95, nan_stats
from metarl.tasks import make_family
from metarl.tasks.base import TaskFamily
from metarl.distributed.tracking import Tracker

SCORES = ("auc_return", "auc_reward_rate", "final_return")
NO_EPISODE = "no episode finished within the budget"


@dataclass(frozen=True)
class EvalSpec:
    games: tuple[str, ...]
    budget: int
    """Env steps of fine-tuning per (game, init, seed)."""
    seeds: tuple[int, ...]
    points: int = 10
    window: int = 10
    """Finished episodes in the running mean of the return curve."""
    threshold: float | None = None
    """Score for steps_to_threshold on every game; None uses the fresh network's final return."""
    at: tuple[int, ...] = ()
    """Env-step budgets at which return_at is read."""


def job_list(games: tuple[str, ...], seeds: tuple[int, ...], inits: Any) -> list[dict]:
    """Every (game, seed, init), game by game: seed s plays game i with env seed task_seed(s, i),
    so every init of one (game, seed) sees the same emulator and action-sampling seeds."""
    return [{"game": g, "init": init, "seed": s, "env_seed": task_seed(s, gi)}
            for gi, g in enumerate(games) for s in seeds for init in inits]


def call_actors(actor: tuple, thetas: dict[str, np.ndarray], jobs: list[dict], method: Callable[..., Any],
                args: Callable[[dict], tuple], local: bool, address: str = "", workers: int = 0, gpus: float = 0.0,
                what: str = "fine-tuning", done: Callable[[dict, Any], None] | None = None) -> list[Any]:
    """`method(game, env_seed, thetas[init], *args(job))` for every job on actors `actor` = (class,
    *constructor args), each holding 1 CPU and `gpus` GPUs (finetune.gpus): Ray actors side by side,
    or one after another in this process. The results in job order, each handed to `done(job,
    result)` as it is read; a failing job raises with its game, init and seed."""
    backend = LocalBackend() if local else RayBackend(address)
    results = []
    try:
        n = workers or (1 if local else int(backend.resources().get("CPU", 1.0)))
        if gpus and not local:
            have = backend.resources().get("GPU", 0.0)
            fit = int(have / gpus + 1e-9)  # actors that can hold their share
            if fit < 1:
                raise ConfigError(f"finetune.gpus = {gpus:g}, but the cluster has {have:g} GPUs; "
                                  f"set finetune.gpus=0 or add a GPU node")
            n = min(n, fit)
        actors = [backend.actor(*actor, num_cpus=1.0, num_gpus=0.0 if local else gpus)
                  for _ in range(max(1, min(n, len(jobs))))]
        refs = {name: backend.put(theta) for name, theta in thetas.items()}
        calls = [backend.call(actors[i % len(actors)], method, j["game"], j["env_seed"], refs[j["init"]], *args(j))
                 for i, j in enumerate(jobs)]
        for job, call in zip(jobs, calls):
            try:
                result = backend.get(call)
            except Exception as e:
                raise RuntimeError(f"{what} {job['game']} from {job['init']} (seed {job['seed']}) failed: {e}") from e
            results.append(result)
            if done is not None:
                done(job, result)
    finally:
        backend.shutdown()
    return results


def run_jobs(family: TaskFamily, learner: FineTuneLearner, thetas: dict[str, np.ndarray], spec: EvalSpec,
             local: bool, address: str = "", workers: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """Fine-tune every (game, init, seed); Ray actors side by side, or one after another locally."""
    jobs = job_list(spec.games, spec.seeds, thetas)

    def done(job: dict, trace: dict[str, Any]) -> None:
        job["trace"] = trace
        log(f"eval: {job['game']} from {job['init']}, seed {job['seed']}: {len(trace['episodes'])} "
            f"episodes in {trace['seconds']:.1f}s")

    call_actors((FineTuner, family, learner), thetas, jobs, FineTuner.run, lambda _: (spec.budget,), local, address,
                workers, learner.gpus, done=done)
    return jobs


# ------------------------------------------------------------------------------------------
# curves and scores: pure functions of a trace


def running_return(trace: dict[str, Any], window: int) -> np.ndarray:
    """After each fine-tuning step: mean raw return of the last `window` finished episodes (NaN
    until one has finished)."""
    out = np.full(len(trace["env_steps"]), math.nan)
    ends = [int(i) for i, _ in trace["episodes"]]
    returns = [float(r) for _, r in trace["episodes"]]
    seen = 0
    for i in range(len(out)):
        while seen < len(ends) and ends[seen] <= i:
            seen += 1
        if seen:
            out[i] = float(np.mean(returns[max(0, seen - window):seen]))
    return out


def curve_steps(n_steps: int, points: int) -> list[int]:
    """Indices of the fine-tuning steps the curve is read at: min(points, n) evenly spaced, the
    last one at the end of the budget."""
    p = max(1, min(points, n_steps))
    return [math.ceil((k + 1) * n_steps / p) - 1 for k in range(p)]


def curve(trace: dict[str, Any], points: int, window: int) -> dict[str, list]:
    idx = curve_steps(len(trace["env_steps"]), points)
    running = running_return(trace, window)
    steps, rewards = np.asarray(trace["env_steps"]), np.asarray(trace["reward_sum"])
    rates, prev = [], -1
    for i in idx:
        done_before = steps[prev] if prev >= 0 else 0
        rates.append(float(rewards[prev + 1:i + 1].sum() / (steps[i] - done_before)))
        prev = i
    ends = np.array([e for e, _ in trace["episodes"]], dtype=int)
    return {"env_steps": [int(steps[i]) for i in idx], "frames": [int(trace["frames"][i]) for i in idx],
            "return": [float(running[i]) for i in idx], "reward_rate": rates,
            "episodes": [int((ends <= i).sum()) for i in idx]}


def score(trace: dict[str, Any], window: int, threshold: float | None, at: tuple[int, ...]) -> dict[str, Any]:
    """The scores of one fine-tuning run (see the module docstring)."""
    running = running_return(trace, window)
    steps = np.asarray(trace["env_steps"])
    finite = running[np.isfinite(running)]
    reached = np.flatnonzero(running >= threshold) if threshold is not None and math.isfinite(threshold) else []
    first_at = [min(int(np.searchsorted(steps, b)), len(steps) - 1) for b in at]
    return {
        "auc_return": float(finite.mean()) if finite.size else math.nan,
        "auc_reward_rate": float(np.sum(trace["reward_sum"]) / steps[-1]),
        "final_return": float(running[-1]),
        "return_at": {str(b): float(running[i]) for b, i in zip(at, first_at)},
        "threshold": threshold,
        "steps_to_threshold": int(steps[reached[0]]) if len(reached) else None,
        "frames_to_threshold": int(trace["frames"][reached[0]]) if len(reached) else None,
        "episodes": len(trace["episodes"]),
    }


def default_thresholds(jobs: list[dict], window: int, init: str = "fresh") -> dict[str, float]:
    """Per game: the mean final return of `init` (the fresh network) over seeds."""
    out = {}
    for game in dict.fromkeys(j["game"] for j in jobs):
        finals = [running_return(j["trace"], window)[-1] for j in jobs if j["game"] == game and j["init"] == init]
        out[game] = float(nan_stats(finals)[0]) if finals else math.nan
    return out


def aggregate(scored: list[dict]) -> list[dict]:
    """Per (game, init): mean and std over seeds of every score; steps to threshold over the seeds
    that reached it, and how many did."""
    rows = []
    for game, init in dict.fromkeys((j["game"], j["init"]) for j in scored):
        mine = [j["score"] for j in scored if j["game"] == game and j["init"] == init]
        row: dict[str, Any] = {"game": game, "init": init, "seeds": len(mine), "threshold": mine[0]["threshold"]}
        row["diverged"] = sum(bool(j["trace"].get("diverged")) for j in scored if j["game"] == game and j["init"] == init)
        for key in SCORES:
            vals = [s[key] for s in mine]
            mean, std, _ = nan_stats(vals)
            row[f"{key}_mean"], row[f"{key}_std"] = float(mean), float(std)
            row[f"{key}_ci95"] = ci95(vals)
            finite = [v for v in vals if math.isfinite(v)]
            row[f"{key}_median"] = float(np.median(finite)) if finite else math.nan
        for b in mine[0]["return_at"]:
            row[f"return_at_{b}_mean"] = float(nan_stats([s["return_at"][b] for s in mine])[0])
        hits = [s["steps_to_threshold"] for s in mine if s["steps_to_threshold"] is not None]
        mean, std, _ = nan_stats(hits if hits else [math.nan])
        row.update(steps_to_threshold_mean=float(mean), steps_to_threshold_std=float(std), reached=len(hits))
        rows.append(row)
    return rows


def assemble(jobs: list[dict], spec: EvalSpec, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Curves, scores and the per-(game, init) summary of finished jobs (traces stay included)."""
    if thresholds is None:
        thresholds = ({g: spec.threshold for g in spec.games} if spec.threshold is not None
                      else default_thresholds(jobs, spec.window))
    scored = [{**j, "curve": curve(j["trace"], spec.points, spec.window),
               "score": score(j["trace"], spec.window, thresholds.get(j["game"]), spec.at)} for j in jobs]
    return {"spec": asdict(spec), "jobs": scored, "summary": aggregate(scored)}


def mean_curves(scored: list[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (game, init): the seeds' curves averaged point by point (all share one grid)."""
    out = {}
    for game, init in dict.fromkeys((j["game"], j["init"]) for j in scored):
        curves = [j["curve"] for j in scored if j["game"] == game and j["init"] == init]
        row: dict[str, Any] = {"env_steps": curves[0]["env_steps"], "frames": curves[0]["frames"]}
        for key in ("return", "reward_rate"):
            mean, std, _ = nan_stats([c[key] for c in curves])
            row[key], row[f"{key}_std"] = mean.tolist(), std.tolist()
        out[(game, init)] = row
    return out


# ------------------------------------------------------------------------------------------
# outputs: JSON, CSV, PNG, W&B


def write_outputs(out: Path, result: dict[str, Any]) -> dict[str, Path]:
    """eval_curves.csv (per seed), eval_summary.csv, curves_<game>.png and summary.png."""
    scored, means = result["jobs"], mean_curves(result["jobs"])
    write_csv(out / "eval_curves.csv", [
        {"game": j["game"], "init": j["init"], "seed": j["seed"], "point": p,
         **{k: j["curve"][k][p] for k in ("env_steps", "frames", "return", "reward_rate", "episodes")}}
        for j in scored for p in range(len(j["curve"]["env_steps"]))])
    write_csv(out / "eval_summary.csv", result["summary"])
    write_csv(out / "episodes.csv", [
        {"game": j["game"], "init": j["init"], "seed": j["seed"], "env_steps": j["trace"]["env_steps"][i],
         "frames": j["trace"]["frames"][i], "return": r} for j in scored for i, r in j["trace"]["episodes"]])
    pngs = {}
    for game in dict.fromkeys(j["game"] for j in scored):
        mine = {init: c for (g, init), c in means.items() if g == game}
        panels = [Panel(f"{game}: {label}", steps_label("fine-tuning"), label,
                        [Series(init, c["env_steps"], c[key], c[f"{key}_std"]) for init, c in mine.items()],
                        empty_note=NO_EPISODE)
                  for key, label in (("return", f"return (last {result['spec']['window']} episodes)"),
                                     ("reward_rate", "raw score per agent step"))]
        pngs[f"curves/{game}"] = save_grid(out / f"curves_{game}.png", panels, 2)
    by_init: dict[str, list[dict]] = {}
    for r in result["summary"]:
        by_init.setdefault(r["init"], []).append(r)
    panels = [Panel(key, "held-out game", key, [
        Series(init, [r["game"] for r in rows], [r[f"{key}_mean"] for r in rows], [r[f"{key}_std"] for r in rows])
        for init, rows in by_init.items()], kind="bars", empty_note=NO_EPISODE) for key in SCORES]
    pngs["summary"] = save_grid(out / "summary.png", panels, 3, "held-out learning speed (mean, std over seeds)")
    return pngs


def log_to_tracker(tracker: Tracker, result: dict[str, Any], pngs: dict[str, Path]) -> None:
    """One record per curve point (x: fine-tuning frames), the images, and the summary scores."""
    means = mean_curves(result["jobs"])
    first = next(iter(means.values()))
    for p, (steps, frames) in enumerate(zip(first["env_steps"], first["frames"])):
        rec: dict[str, Any] = {"frames": frames, "env_steps": steps, "point": p + 1}
        for (game, init), c in means.items():
            rec[f"eval/{game}/{init}/return"] = c["return"][p]
            rec[f"eval/{game}/{init}/reward_rate"] = c["reward_rate"][p]
        tracker.log(rec)
    for key, path in pngs.items():
        tracker.log_image(key, path)
    tracker.summary({f"{r['game']}/{r['init']}/{k}": v for r in result["summary"] for k, v in r.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})


def check_local_gpu(learner: Any, local: bool) -> None:
    """A learner that asks for a GPU share (finetune.gpus) in this process needs CUDA here."""
    if getattr(learner, "gpus", 0) and local and not torch.cuda.is_available():
        raise ConfigError(f"finetune.gpus = {learner.gpus:g} asks for a GPU, but torch sees no CUDA device here; "
                          f"set finetune.gpus=0")


def evaluate(cfg: Config, thetas: dict[str, np.ndarray], spec: EvalSpec, out: Path, *, name: str,
             local: bool, workers: int = 0, info: dict[str, Any] | None = None,
             log: Callable[[str], None] = print, learner: Any = None,
             run: Callable[..., list[dict]] = run_jobs) -> dict[str, Any]:
    """Fine-tune each theta on every held-out game and seed; write files and W&B (job type eval,
    the training run's group). eval.json is written last: its presence marks a finished eval.
    `learner` and `run` replace the fine-tuner (default: FineTuneLearner.of(cfg), run_jobs), e.g.
    with RLlib's PPO (metarl.interop.rllib_module)."""
    out = Path(out)
    learner = learner or FineTuneLearner.of(cfg)
    check_local_gpu(learner, local)
    out.mkdir(parents=True, exist_ok=True)
    family = make_family(cfg.finetuning)  # finetune.rollout_len, if set
    jobs = run(family, learner, thetas, spec, local, cfg.ray.address, workers, log)
    result = {**(info or {}), "inner_lr": cfg.meta.inner_lr, "finetune": asdict(learner),
              "learner": learner.label, **assemble(jobs, spec)}
    pngs = write_outputs(out, result)
    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment, name=name,
                      config={**config_mod.to_dict(cfg), **(info or {}), "eval": asdict(spec)},
                      mode=cfg.log.wandb_mode, job_type="eval", metrics_file="eval_metrics.jsonl",
                      step_key="frames")
    try:
        log_to_tracker(tracker, result, pngs)
    finally:
        tracker.finish()
    write_json(out / "eval.json", result)
    return result


# ------------------------------------------------------------------------------------------
# the command


def add_eval_args(p: argparse.ArgumentParser, budget_was: str = "") -> None:
    """Flags that make an EvalSpec (eval, learn, sweep): games, env steps, seeds, curve reading."""
    p.add_argument("--games", help="held-out games, comma separated (default: tasks.heldout of the config)")
    add_steps_arg(p, "env steps of fine-tuning per game, init and seed, rounded up to whole rollouts of T x B "
                     "(default: 50 rollouts)", budget_was)
    add_seeds_arg(p, "one fine-tuning run per game, init and seed (default 3)")
    p.add_argument("--points", type=int, help="points per learning curve (default 10)")
    p.add_argument("--window", type=int, help="finished episodes in the running-mean return (default 10)")
    p.add_argument("--threshold", type=float, help="return for steps-to-threshold (default: fresh final return)")
    add_at_steps_arg(p, "env steps to read the return at, comma separated (default: 1/4, 1/2 and all of --steps)")


def require_games(family: str) -> None:
    if family not in config_mod.GAME_FAMILIES:
        raise ConfigError(f"tasks.family is '{family}': `metarl eval` and `metarl sweep` fine-tune games "
                          f"({', '.join(config_mod.GAME_FAMILIES)}); use `metarl fewshot` for {family} tasks")


def spec_from_args(args: argparse.Namespace, cfg: Config) -> EvalSpec:
    require_games(cfg.tasks.family)
    games = tuple(cfg.tasks.heldout)
    if args.games:
        games = config_mod.validate(config_mod.override(cfg, "tasks.heldout", args.games)).tasks.heldout
    if not games:
        raise ConfigError("no held-out games: set tasks.heldout in the config or pass --games a,b")
    given = lambda value, default: default if value is None else value  # noqa: E731
    budget = given(args.steps, 50 * cfg.env.num_envs * cfg.env.rollout_len)
    seeds, points, window = given(args.seeds, 3), given(args.points, 10), given(args.window, 10)
    for flag, v in (("steps", budget), ("seeds", seeds), ("points", points), ("window", window)):
        if v < 1:
            raise ConfigError(f"--{flag} = {v} must be at least 1")
    at = (env_steps_list(args.at_steps) if args.at_steps
          else tuple(sorted({max(1, budget // 4), max(1, budget // 2), budget})))
    if any(b > budget for b in at):
        raise ConfigError(f"--at-steps {args.at_steps} must lie in 1..{budget} (--steps, the fine-tuning env steps)")
    return EvalSpec(games, budget, tuple(range(seeds)), points, window, args.threshold, at)


def load_checkpoint(path: Path) -> tuple[Path, dict[str, Any], Config]:
    """`checkpoint.load_configured`, for a game family."""
    path, state, cfg = checkpoint.load_configured(path)
    require_games(cfg.tasks.family)
    return path, state, cfg


def checkpoint_theta(state: dict[str, Any], family: TaskFamily, path: Path) -> np.ndarray:
    """`checkpoint.flat_theta` for the family's network."""
    return checkpoint.flat_theta(state, path, ParamSpec.of(family.make_model()).numel)


def meta_compute(state: dict[str, Any]) -> dict[str, Any]:
    """What meta-training spent on a checkpoint's theta (its counters): each eval run's W&B config
    carries it, the x-axis of the dashboard's held-out AUC against compute."""
    c = state.get("counters", {})
    return {"meta_frames": int(c.get("frames", 0)), "meta_env_steps": int(c.get("env_steps", 0)),
            "meta_wall_s": round(float(c.get("wall_s", 0.0)), 1)}


def cmd_eval(args: argparse.Namespace) -> int:
    if args.out:
        claim_out(args.out)
    path, state, cfg = load_checkpoint(Path(args.checkpoint))
    cfg = resolve_config(args, base=cfg)
    spec = spec_from_args(args, cfg)
    iteration = int(state["iteration"])
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = claim_out(args.out or run_dir / f"eval-{iteration:06d}")
    learner, run = None, run_jobs
    if args.learner == "rllib-ppo":
        from metarl.interop.rllib_module import PPOLearner, ppo_jobs

        learner = PPOLearner.of(cfg, env_runners=0 if args.local else 1)
        run = ppo_jobs(cfg, learner)
    family = make_family(cfg)
    thetas = {"meta": checkpoint_theta(state, family, path), "fresh": initial_theta(family, cfg.meta.seed)}
    info = {"checkpoint": str(path), "iteration": iteration, "skip": cfg.meta.skip, "algo": cfg.meta.algo, "config": cfg.label,
            **meta_compute(state)}
    result = evaluate(cfg, thetas, spec, out, name=f"{cfg.run_name}-eval", local=args.local,
                      workers=args.workers, info=info, learner=learner, run=run)
    for r in result["summary"]:
        print(f"{r['game']:>16} {r['init']:>5}: AUC return {r['auc_return_mean']:.2f} ± {r['auc_return_std']:.2f}, "
              f"score/step {r['auc_reward_rate_mean']:.4f}, reached threshold {r['reached']}/{r['seeds']}")
    print(f"eval written to {out}")
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    """From-scratch learning check: the fine-tuning learner on a fresh network, game by game."""
    out = claim_out(args.out)
    cfg = resolve_config(args)
    if not args.games:
        cfg = config_mod.override(cfg, "tasks.heldout", list(dict.fromkeys(cfg.tasks.train + cfg.tasks.heldout)))
    spec = spec_from_args(args, cfg)
    family = make_family(cfg)
    learner = FineTuneLearner.of(cfg)
    print(f"metarl learn: {', '.join(spec.games)} from a fresh network, {learner.label}, {spec.budget:,} env steps, "
          f"{len(spec.seeds)} seed(s) -> {out}")
    result = evaluate(cfg, {"fresh": initial_theta(family, cfg.meta.seed)}, spec, out,
                      name=f"{cfg.log.experiment}-learn", local=args.local, workers=args.workers)
    fps = family.frames_per_step
    for r in result["summary"]:
        at = "  ".join(f"{int(b):,}{f' ({int(b) * fps:,} frames)' if fps != 1 else ''}: {r[f'return_at_{b}_mean']:.2f}"
                       for b in spec.at)
        print(f"{r['game']:>16}: running return at {at}  (diverged {r['diverged']}/{r['seeds']})")
    print(f"learning curves written to {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    q = subparsers.add_parser("learn", help="from-scratch learning check: eval's fine-tuning learner on a fresh network")
    add_config_args(q)
    add_eval_args(q)
    add_finetune_args(q)
    add_out_arg(q, "curves, tables and episodes.csv")
    add_cluster_args(q, "fine-tune in this process, one job after another")
    q.set_defaults(func=cmd_learn)

    p = subparsers.add_parser("eval", help="held-out learning speed of a checkpoint vs an un-pretrained network")
    add_config_args(p, source="checkpoint")
    add_eval_args(p)
    add_finetune_args(p)
    p.add_argument("--learner", choices=("metarl", "rllib-ppo"), default="metarl",
                   help="the fine-tuner: metarl's, or RLlib's PPO from the exported module; both take finetune.* (README)")
    add_out_arg(p, "the evaluation", default="<run>/eval-<iteration>")
    add_cluster_args(p, "fine-tune in this process, one job after another (rllib-ppo: its env runner too)")
    p.set_defaults(func=cmd_eval)
