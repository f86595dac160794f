"""`metarl references`: the two fixed points that every held-out score of the skip-count experiment
is normalised by, measured once per game, committed, and reused.

  random   a uniform-random policy over the game's actions: the network with its policy head's
           weights and bias zeroed (every logit 0, whatever the observation), playing `budget` env
           steps with no learning (`finetune` with learn=False: the same rollouts and trace)
  scratch  the held-out fine-tuner (finetune.*, `FineTuneLearner.of`) from a fresh network for the
           same `budget` env steps; seed s starts from initial_theta(family, s)

Seed s plays game i with env seed task_seed(s, i), as in `metarl eval`, and both traces are scored
by `metarl.experiments.evaluate.score` with the eval window (`--window`). A score x is normalised as

  returns (AUC or final)  (x - random_final_return) / (scratch_final_return - random_final_return)
  score per agent step    (x - random_reward_rate) / (scratch_final_rate - random_reward_rate)

so 0 is the random policy and 1 is where PPO from scratch ends at the fine-tuning budget;
scratch_final_rate is the scratch learner's raw score per agent step over the last quarter of it.

Outputs: references.csv (one row per game: means over seeds), references_per_seed.csv, and
references.md (mean ± 95% t-interval over seeds); config.yaml, the resolved config.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from metarl.cliargs import (add_cluster_args, add_config_args, add_out_arg, add_seeds_arg, add_steps_arg, claim_out,
                            resolve_config)
from metarl.core import config as config_mod
from metarl.core.config import Config, ConfigError
from metarl.core.plots import markdown_table, write_csv
from metarl.core.policy import ParamSpec
from metarl.core.stats import ci95, nan_stats, pm
from metarl.distributed.learner import initial_theta
from metarl.distributed.tracking import Tracker
from metarl.experiments.evaluate import EvalSpec, call_actors, check_local_gpu, job_list, require_games, score
from metarl.experiments.finetune import FineTuneLearner, FineTuner
from metarl.tasks import make_family
from metarl.tasks.base import TaskFamily

POLICY_HEAD = ("pi.weight", "pi.bias")
"""The actor head of every game family's network (metarl.core.policy: NatureCNN, MinAtarNet)."""
SCORES = ("auc_return", "final_return", "reward_rate")
COLUMNS = ("game", "budget", "seeds", "random_auc_return", "random_final_return", "random_reward_rate",
           "scratch_auc_return", "scratch_final_return", "scratch_reward_rate", "scratch_final_rate")
"""The columns `load` needs in references.csv."""
FILE = "references.csv"


def uniform_theta(family: TaskFamily, theta: np.ndarray) -> np.ndarray:
    """`theta` with the policy head's weights and bias zeroed: all logits 0 on every observation,
    so `Task.sample` draws each of the game's actions with probability 1/n."""
    spec = ParamSpec.of(family.make_model())
    params = spec.unflatten(theta)
    if any(k not in params for k in POLICY_HEAD):
        raise ValueError(f"the network has no policy head {POLICY_HEAD}; its parameters: {', '.join(params)}")
    for k in POLICY_HEAD:
        params[k] = torch.zeros_like(params[k])
    return spec.flatten(params)


def final_rate(trace: dict[str, Any]) -> float:
    """Raw score per agent step over the last quarter of a trace's env steps (the rollouts that
    start at 3/4 of them or later; at least the last one)."""
    steps = [0, *trace["env_steps"]]
    first = min(next(i for i, s in enumerate(steps) if s >= 0.75 * steps[-1]), len(steps) - 2)
    return float(sum(trace["reward_sum"][first:]) / (steps[-1] - steps[first]))


def measure(cfg: Config, games: tuple[str, ...], budget: int, seeds: tuple[int, ...], local: bool, address: str = "",
            workers: int = 0, window: int = EvalSpec.window, log: Callable[[str], None] = print) -> list[dict]:
    """Both references on every (game, seed), on FineTuner actors side by side (or one after another
    in this process): one row per (game, seed) with the scores of the module docstring."""
    learner = FineTuneLearner.of(cfg)
    check_local_gpu(learner, local)
    family = make_family(cfg.finetuning)  # finetune.rollout_len, if set: the fine-tuner's rollouts
    thetas = {}
    for s in seeds:
        thetas[f"scratch-{s}"] = initial_theta(family, s)
        thetas[f"random-{s}"] = uniform_theta(family, thetas[f"scratch-{s}"])
    jobs = [{**j, "policy": j["init"], "init": f"{j['init']}-{j['seed']}"}
            for j in job_list(games, seeds, ("random", "scratch"))]

    def done(job: dict, trace: dict[str, Any]) -> None:
        job["trace"] = trace
        log(f"references: {job['game']} {job['policy']}, seed {job['seed']}: {len(trace['episodes'])} episodes in "
            f"{trace['seconds']:.1f}s{' (diverged)' if trace['diverged'] else ''}")

    call_actors((FineTuner, family, learner), thetas, jobs, FineTuner.run,
                lambda j: (budget, j["policy"] == "scratch"), local, address or cfg.ray.address, workers, learner.gpus,
                what="references:", done=done)
    rows = []
    for game in games:
        for s in seeds:
            row: dict[str, Any] = {"game": game, "seed": s, "budget": budget, "window": window}
            for j in jobs:
                if (j["game"], j["seed"]) == (game, s):
                    sc, p = score(j["trace"], window, None, ()), j["policy"]
                    row["env_seed"] = j["env_seed"]
                    row.update({f"{p}_auc_return": sc["auc_return"], f"{p}_final_return": sc["final_return"],
                                f"{p}_reward_rate": sc["auc_reward_rate"], f"{p}_episodes": sc["episodes"]})
                    if p == "scratch":
                        row.update(scratch_final_rate=final_rate(j["trace"]), scratch_diverged=j["trace"]["diverged"])
            rows.append({**row, "learner": learner.label})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One row per game: the means over seeds (finite values) of every reference."""
    out = []
    for game in dict.fromkeys(r["game"] for r in rows):
        mine = [r for r in rows if r["game"] == game]
        row = {"game": game, "budget": mine[0]["budget"], "seeds": len(mine), "window": mine[0]["window"]}
        for key in COLUMNS[3:]:
            row[key] = float(nan_stats([r[key] for r in mine])[0])
        out.append({**row, "scratch_diverged": sum(bool(r["scratch_diverged"]) for r in mine),
                    "learner": mine[0]["learner"]})
    return out


def write(out: Path, rows: list[dict]) -> list[dict]:
    """references.csv, references_per_seed.csv and references.md from measure's rows; returns the
    per-game rows."""
    out = Path(out)
    summary = summarise(rows)
    write_csv(out / "references_per_seed.csv", rows)
    write_csv(out / FILE, summary)
    table = []
    for s in summary:
        mine = [r for r in rows if r["game"] == s["game"]]
        cell = lambda key, fmt: pm(s[key], ci95([r[key] for r in mine]), fmt)  # noqa: E731
        table.append({"game": s["game"], "seeds": s["seeds"],
                      **{f"{p}_{k}": cell(f"{p}_{k}", ".4f" if "rate" in k else ".2f")
                         for p in ("random", "scratch") for k in SCORES},
                      "scratch_final_rate": cell("scratch_final_rate", ".4f"), "diverged": s["scratch_diverged"]})
    columns = {"game": "game", "seeds": "seeds", **{f"{p}_{k}": f"{p} {k.replace('_', ' ')}"
                                                    for p in ("random", "scratch") for k in SCORES},
               "scratch_final_rate": "scratch final rate", "diverged": "scratch diverged"}
    first = summary[0] if summary else {"budget": 0, "window": 0, "learner": ""}
    (out / "references.md").write_text(
        f"# Normalisation references\n\n{first['budget']:,} env steps per game and seed; returns are running means of "
        f"the last {first['window']} episodes; rates are raw score per agent step (final: the last quarter of the "
        f"budget). Random: a uniform-random policy, no learning. Scratch: {first['learner']}, from a fresh network "
        f"per seed. Mean ± 95% t-interval over seeds.\n\n{markdown_table(table, columns)}\n")
    return summary


# ------------------------------------------------------------------------------------------
# reading them back


def load(path: str | Path, games: tuple[str, ...] = (), budget: int | None = None,
         window: int | None = None) -> dict[str, dict[str, Any]]:
    """game -> its references, from references.csv (or the directory holding it). Refuses, with one
    line, a missing file or column, a game of `games` that is not in it, and references measured
    at another `budget` or `window` than the caller's."""
    path = Path(path)
    path = path / FILE if path.is_dir() else path
    how = "measure them with `metarl references --config FILE --games a,b --steps N --seeds N --out DIR`"
    if not path.is_file():
        raise ConfigError(f"no references file '{path}'; {how}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ConfigError(f"'{path}' has no column {', '.join(missing)}; {how}")
        refs = {r["game"]: {**r, **{c: float(r[c]) if r[c] != "" else math.nan for c in COLUMNS[1:]}}
                for r in reader}
    absent = [g for g in games if g not in refs]
    if absent:
        raise ConfigError(f"'{path}' has no references for {', '.join(absent)} (it has {', '.join(refs) or 'none'}); "
                          f"{how}")
    for key, want in (("budget", budget), ("window", window)):
        for g in games or refs:
            have = refs[g].get(key)
            if want is not None and (have in (None, "") or float(have) != want):
                shown = "unknown" if have in (None, "") else f"{float(have):g}"
                raise ConfigError(f"'{path}' holds references for {g} at {key} {shown}, not {want}; {how}")
    return refs


def normalise(value: float, game: str, refs: dict[str, dict[str, Any]], key: str = "return") -> float:
    """`value` on the scale random = 0, scratch final = 1: key "return" for returns (AUC or final),
    "rate" for raw score per agent step. Refuses a game whose scratch reference is not above random."""
    if key not in ("return", "rate"):
        raise ValueError(f"key {key!r} must be 'return' or 'rate'")
    if game not in refs:
        raise ConfigError(f"no references for {game} (they cover {', '.join(refs)})")
    r = refs[game]
    low, high = ((r["random_final_return"], r["scratch_final_return"]) if key == "return"
                 else (r["random_reward_rate"], r["scratch_final_rate"]))
    if not high - low > 0:  # NaN included
        what = "final return" if key == "return" else "score per agent step"
        raise ConfigError(f"{game}: the scratch learner's {what} ({high:g}) is not above the random policy's "
                          f"({low:g}), so its scores cannot be normalised; measure the references at a larger --steps "
                          f"(or with a fine-tuner that learns {game})")
    return (value - low) / (high - low)


# ------------------------------------------------------------------------------------------
# the command


def cmd_references(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    if args.seed is not None:
        raise ConfigError("--seed has no effect here: seed s of --seeds starts from the network initialised with seed s; "
                          "drop --seed")
    cfg = resolve_config(args)
    require_games(cfg.tasks.family)
    games = tuple(dict.fromkeys(cfg.tasks.train + cfg.tasks.heldout))
    if args.games:
        games = config_mod.validate(config_mod.override(cfg, "tasks.heldout", args.games)).tasks.heldout
    seeds = 3 if args.seeds is None else args.seeds
    for flag, v in (("steps", args.steps), ("seeds", seeds), ("window", args.window)):
        if v < 1:
            raise ConfigError(f"--{flag} = {v} must be at least 1")
    learner = FineTuneLearner.of(cfg)
    print(f"metarl references: {', '.join(games)}, random policy and {learner.label} from scratch, "
          f"{args.steps:,} env steps, {seeds} seed(s) -> {out}")
    rows = measure(cfg, games, args.steps, tuple(range(seeds)), args.local, workers=args.workers, window=args.window)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    summary = write(out, rows)
    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment,
                      name=f"{cfg.log.experiment}-references",
                      config={**config_mod.to_dict(cfg), "budget": args.steps, "seeds": seeds, "window": args.window},
                      mode=cfg.log.wandb_mode, job_type="references")
    try:
        tracker.summary({f"{r['game']}/{k}": r[k] for r in summary for k in COLUMNS[3:]})
    finally:
        tracker.finish()
    for r in summary:
        print(f"{r['game']:>16}: final return random {r['random_final_return']:.2f}, scratch "
              f"{r['scratch_final_return']:.2f}; score/step random {r['random_reward_rate']:.4f}, scratch final "
              f"{r['scratch_final_rate']:.4f}")
    print(f"references written to {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("references", help="the random-policy and from-scratch references held-out scores are "
                                                 "normalised by")
    add_config_args(p)
    p.add_argument("--games", help="games, comma separated (default: tasks.train and tasks.heldout of the config)")
    add_steps_arg(p, "env steps per game and seed, rounded up to whole rollouts of T x B: the fine-tuning "
                     "budget the references hold for", required=True)
    add_seeds_arg(p, "one random and one from-scratch run per game and seed (default 3)")
    p.add_argument("--window", type=int, default=EvalSpec.window,
                   help=f"finished episodes in the running-mean return, as eval's --window (default {EvalSpec.window})")
    p.add_argument("--workers", type=int, default=0,
                   help="actors the command starts (default: one per cluster CPU; --local: one)")
    add_out_arg(p, "references.csv, references_per_seed.csv and references.md")
    add_cluster_args(p, "play and fine-tune in this process, one job after another")
    p.set_defaults(func=cmd_references)
