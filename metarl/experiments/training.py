"""`metarl training`: how far meta-training got on its own training games, from run directories.

For every run (a `metarl run` directory: metrics.jsonl and config.yaml) and training game:
- the return of the episodes that ended in the game's training rollouts (with theta or theta')
  against env steps per game (the run's env steps / its number of games: at skip 1 every game gets
  exactly that share, at skip k the same in expectation);
- `final`: the mean return of those episodes over the last `--last` share of the run's env steps
  (default the last fifth), the same statistic for a `metarl learn` directory given with --scratch
  (the single-game learner from scratch), read over the same per-game steps;
- the adaptation gain: per iteration, the raw reward per step of the rollout with theta' minus that
  of the rollout with theta on the same game (`rate_post/<game>` - `rate_pre/<game>`: defined when
  no episode ends, and all the policy's own), averaged over the second half of the run.

Intervals are over runs (each meta-training seed is one independent unit): mean ± t(0.975, n-1) x
SE. Outputs: training_<label as a slug>_seed<s>.csv per run (iteration, env steps per game, game, returns and
rates), training_summary.csv/.md and training_<game>.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from metarl.core import config as config_mod
from metarl.cliargs import add_out_arg, claim_out
from metarl.core.config import ConfigError
from metarl.core.stats import mean_ci
from metarl.core.plots import Panel, Series, markdown_table, save_grid, write_csv

PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def read_run(path: Path) -> dict:
    """One run directory: its label-free contents (seed, games, per-iteration rows)."""
    if not (path / "metrics.jsonl").exists() or not (path / "config.yaml").exists():
        raise ConfigError(f"'{path}' is not a metarl run directory (no metrics.jsonl and config.yaml)")
    cfg = config_mod.load(path / "config.yaml")
    games = list(cfg.tasks.train)
    rows = []
    for line in open(path / "metrics.jsonl"):
        if line.strip():
            rec = json.loads(line)
            if "env_steps/total" in rec:
                rows.append(rec)
    if not rows:
        raise ConfigError(f"'{path}' has no completed iteration yet")
    return {"seed": cfg.meta.seed, "games": games, "rows": rows}


def per_game_rows(run: dict) -> list[dict]:
    n = len(run["games"])
    out = []
    for rec in run["rows"]:
        steps = rec["env_steps/total"] / n
        for g in run["games"]:
            out.append({"iteration": rec["iteration"], "env_steps_per_game": steps, "game": g,
                        "episodes_post": len(rec.get(f"episodes_post/{g}", [])),
                        "return_post": rec.get(f"return_post/{g}", math.nan),
                        "return_pre": rec.get(f"return_pre/{g}", math.nan),
                        "rate_pre": rec.get(f"rate_pre/{g}", math.nan), "rate_post": rec.get(f"rate_post/{g}", math.nan)})
    return out


def episodes(run: dict, game: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps per game at the iteration each episode ended in, its raw return), for every
    episode that ended in the game's rollouts, with theta or theta'. An episode spans many rollouts
    (a MinAtar episode hundreds of steps, a rollout 16) played alternately by theta and theta', so
    which rollout it ended in says little about which policy earned it; Freeway's fixed 2,500-step
    episodes all end in the same phase of every 32-step cycle (the leader's rollout at skip 1)."""
    n = len(run["games"])
    xs, ys = [], []
    for rec in run["rows"]:
        for r in rec.get(f"episodes_pre/{game}", []) + rec.get(f"episodes_post/{game}", []):
            xs.append(rec["env_steps/total"] / n)
            ys.append(float(r))
    return np.asarray(xs), np.asarray(ys)


def last_share_mean(steps: np.ndarray, returns: np.ndarray, total: float, last: float) -> float:
    keep = steps > total * (1.0 - last)
    return float(returns[keep].mean()) if keep.any() else math.nan


def last_share_rate(run: dict, game: str, last: float) -> float:
    """The raw reward per step of the game's evaluation rollouts (`rate_post/<game>`: with theta',
    or theta where nothing adapts) averaged over the iterations in the last `last` share of the
    run's env steps: defined every iteration, where an episode-based return is not (MinAtar
    Freeway's 2,500-step episodes end a few times in a whole meta-run)."""
    total = run["rows"][-1]["env_steps/total"]
    v = [r[f"rate_post/{game}"] for r in run["rows"]
         if r["env_steps/total"] > total * (1.0 - last) and r.get(f"rate_post/{game}") is not None]
    return float(np.mean(v)) if v else math.nan


def adaptation_gain(run: dict, game: str) -> float:
    """Mean over the second half of the run of rate_post - rate_pre on `game` (iterations where
    the game led a group, so both exist); nan where the run did not log per-game rates."""
    rows = run["rows"][len(run["rows"]) // 2:]
    d = [r[f"rate_post/{game}"] - r[f"rate_pre/{game}"] for r in rows  # runs logged before joint's 0.0 was
         if r.get("adaptations") and f"rate_pre/{game}" in r and f"rate_post/{game}" in r]  # dropped carry it
    return float(np.mean(d)) if d else math.nan


def adaptation_gain_all(run: dict) -> float:
    """`adaptation_gain` over all games at once (reward_per_step/post - /pre, second half of the
    run): comparable where every game both adapts and evaluates (skip 1)."""
    rows = run["rows"][len(run["rows"]) // 2:]
    d = [r["reward_per_step/post"] - r["reward_per_step/pre"] for r in rows
         if r.get("adaptations") and math.isfinite(r.get("reward_per_step/pre", math.nan))]
    return float(np.mean(d)) if d else math.nan


def scratch_finals(path: Path, budget: float, last: float) -> dict[str, list[float]]:
    """episodes.csv of `metarl learn`: per game, each seed's mean return over the last share of
    `budget` env steps (MinAtar: frames = env steps)."""
    per: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in csv.DictReader(open(path / "episodes.csv")):
        per.setdefault((r["game"], r["seed"]), []).append((float(r["env_steps"] if "env_steps" in r else r["frames"]),
                                                           float(r["return"])))
    out: dict[str, list[float]] = {}
    for (game, _), v in per.items():
        a = np.asarray(v)
        out.setdefault(game, []).append(last_share_mean(a[:, 0], a[:, 1], budget, last))
    return out


def slug(label: str) -> str:
    """A label as a file-name part: 'FOMAML skip 1' -> 'fomaml-skip-1'."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "run"


def cmd_training(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    runs: dict[str, list[dict]] = {}
    for spec in args.runs:
        label, _, p = spec.rpartition("=")
        run = read_run(Path(p))
        runs.setdefault(label or Path(p).name, []).append(run)
    games = list(dict.fromkeys(g for rs in runs.values() for r in rs for g in r["games"]))
    budget = min(r["rows"][-1]["env_steps/total"] / len(r["games"]) for rs in runs.values() for r in rs)
    scratch = scratch_finals(Path(args.scratch), budget, args.last) if args.scratch else {}
    out.mkdir(parents=True, exist_ok=True)
    for label, rs in runs.items():
        for r in rs:
            write_csv(out / f"training_{slug(label)}_seed{r['seed']}.csv", per_game_rows(r))
    rows = []
    for game in games:
        ref = scratch.get(game, [])
        for label, rs in runs.items():
            have = [r for r in rs if game in r["games"]]
            if not have:
                continue
            finals = [last_share_mean(*episodes(r, game), r["rows"][-1]["env_steps/total"] / len(r["games"]), args.last)
                      for r in have]
            ratio = [f / np.mean(ref) for f in finals if ref and np.mean(ref) > 0 and math.isfinite(f)]
            rows.append({"game": game, "learner": label, "runs": len(have),
                         "env_steps_per_game": int(np.mean([r["rows"][-1]["env_steps/total"] / len(r["games"]) for r in have])),
                         "final": mean_ci(finals), "of_scratch": f"{np.mean(ratio):.0%}" if ratio else "—",
                         "adaptation_gain_rate": mean_ci([adaptation_gain(r, game) for r in have], 4),
                         "final_per_run": " / ".join(f"{f:.2f}" for f in finals)})
        if ref:
            rows.append({"game": game, "learner": "PPO from scratch (metarl learn)", "runs": len(ref),
                         "env_steps_per_game": int(budget), "final": mean_ci(ref), "of_scratch": "100%",
                         "adaptation_gain_rate": "—", "final_per_run": " / ".join(f"{f:.2f}" for f in ref)})
    for label, rs in runs.items():
        if all(r["rows"][-1].get("skip") == 1 and math.isfinite(adaptation_gain_all(r)) for r in rs):
            rows.append({"game": "all games", "learner": label, "runs": len(rs), "env_steps_per_game": "",
                         "final": "", "of_scratch": "",
                         "adaptation_gain_rate": mean_ci([adaptation_gain_all(r) for r in rs], 4),
                         "final_per_run": " / ".join(f"{adaptation_gain_all(r):+.4f}" for r in rs)})
    write_csv(out / "training_summary.csv", rows)
    table = markdown_table(rows, {"game": "game", "learner": "learner", "runs": "runs",
                                  "env_steps_per_game": "env steps per game",
                                  "final": f"return in training, last {args.last:.0%} of steps (95% CI over runs)",
                                  "of_scratch": "of PPO from scratch",
                                  "adaptation_gain_rate": "reward/step with theta' minus with theta, 2nd half",
                                  "final_per_run": "per run"})
    (out / "training_summary.md").write_text(table)
    print(table)
    panels = []
    for game in games:
        series = []
        for n, (label, rs) in enumerate(runs.items()):
            for k, r in enumerate(rs):
                x, y = episodes(r, game)
                if len(y) >= args.window:
                    ym = np.convolve(y, np.ones(args.window) / args.window, mode="valid")
                    series.append(Series(label if k == 0 else "", x[args.window - 1:].tolist(), ym.tolist(),
                                         color=PALETTE[n % len(PALETTE)]))
        for v in scratch.get(game, [])[:1]:
            series.append(Series("PPO from scratch, last fifth", [0, budget], [float(np.mean(scratch[game]))] * 2,
                                 color="black", linestyle="--"))
        panels.append(Panel(f"{game}: return in training rollouts", "env steps per game", "return", series))
    save_grid(out / "training.png", panels, ncols=min(3, len(panels)), title="meta-training on its own games")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("training", help="how far meta-training got on its own training games (run directories)")
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (metarl run output); runs sharing a label are seeds of one configuration")
    add_out_arg(p, "training_summary.md/.csv and training.png")
    p.add_argument("--scratch", help="a metarl learn directory: the single-game PPO learner at the same per-game steps")
    p.add_argument("--last", type=float, default=0.2, help="share of the env steps whose episodes make the final return (default 0.2)")
    p.add_argument("--window", type=int, default=20, help="episodes in the plotted running mean (default 20)")
    p.set_defaults(func=cmd_training)
