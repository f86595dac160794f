"""`metarl curve`: single-game learning curves against env steps (frames beside them), from any
learner, beside references.

A source is the output of `metarl learn` / `metarl eval` (its episodes.csv: every episode that
ended while fine-tuning) or a `metarl run` directory (its metrics.jsonl: the episodes that ended in
each iteration's adaptation and evaluation rollouts, at the run's cumulative env steps). For each
game the command draws every episode's raw score (dots), the running mean of the last `window`
episodes (line) and published reference values (crosses; published against frames, placed at
frames / frames per env step), and tabulates the running mean at chosen env steps, --at-steps
(mean over seeds, with a 95% t-interval when there are several), with the frames beside them.

Outputs: curve_<game>.png, curve_points.csv (running mean at each --at-steps count, per source
and seed, env steps and frames), curve_summary.md (the table), printed too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl.core import config as config_mod
from metarl.cliargs import add_at_steps_arg, add_out_arg, claim_out, env_steps_list
from metarl.core.config import ConfigError
from metarl.core.stats import mean_ci
from metarl.core.plots import Panel, Series, markdown_table, save_grid, write_csv


@dataclass
class Episodes:
    """The episodes one learner finished on one game, in the order they ended."""

    source: str
    game: str
    seed: int
    env_steps: np.ndarray
    frames: np.ndarray
    returns: np.ndarray

    @property
    def frames_per_step(self) -> float:
        return float(self.frames[-1] / self.env_steps[-1]) if len(self.env_steps) and self.env_steps[-1] else 1.0

    def running(self, window: int) -> np.ndarray:
        """After each episode: the mean raw return of the last `window` episodes."""
        c = np.concatenate([[0.0], np.cumsum(self.returns, dtype=float)])
        i = np.arange(1, len(self.returns) + 1)
        lo = np.maximum(0, i - window)
        return (c[i] - c[lo]) / (i - lo)

    def at(self, steps: float, window: int) -> float:
        """The running mean over the last `window` episodes that ended by `steps` env steps (NaN:
        none yet, or the learner had not reached that many steps)."""
        n = int(np.searchsorted(self.env_steps, steps, side="right"))
        if n == 0 or (len(self.env_steps) and self.env_steps[-1] < steps * 0.98):
            return math.nan
        return float(self.returns[max(0, n - window):n].mean())


def from_learn_dir(path: Path, label: str) -> list[Episodes]:
    """episodes.csv of `metarl learn` / `metarl eval` (one Episodes per game, init and seed)."""
    rows = list(csv.DictReader(open(path / "episodes.csv")))
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault((r["game"], r.get("init", ""), int(r["seed"])), []).append(
            (float(r["env_steps"]), float(r["frames"]), float(r["return"])))
    inits = {k[1] for k in out}
    return [Episodes(label if len(inits) == 1 else f"{label} ({init})", game, seed, *map(np.array, zip(*v)))
            for (game, init, seed), v in out.items()]


def from_run_dir(path: Path, label: str) -> list[Episodes]:
    """metrics.jsonl of `metarl run`: the episodes of θ's and θ′'s rollouts per task, each placed
    at the run's cumulative env steps (and frames) after the iteration it ended in."""
    per_game: dict[str, list[tuple[float, float, float]]] = {}
    seed = 0
    for line in open(path / "metrics.jsonl"):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "env_steps/total" not in rec:
            continue
        at = (float(rec["env_steps/total"]), float(rec.get("frames/total", rec["env_steps/total"])))
        for key, values in rec.items():
            if key.startswith(("episodes_pre/", "episodes_post/")) and values:
                game = key.split("/", 1)[1]
                per_game.setdefault(game, []).extend((*at, float(r)) for r in values)
    if (path / "config.yaml").exists():
        seed = config_mod.load(path / "config.yaml").meta.seed
    return [Episodes(label, game, seed, *map(np.array, zip(*v))) for game, v in per_game.items()]


def load_source(spec: str) -> list[Episodes]:
    label, _, path_s = spec.rpartition("=")
    path = Path(path_s)
    label = label or path.name
    if (path / "episodes.csv").exists():
        eps = from_learn_dir(path, label)
    elif (path / "metrics.jsonl").exists():
        eps = from_run_dir(path, label)
    else:
        raise ConfigError(f"'{path}' holds neither episodes.csv (metarl learn/eval) nor metrics.jsonl "
                          f"(metarl run); pass one of those directories, optionally as LABEL=DIR")
    if not eps:
        raise ConfigError(f"'{path}' has no finished episodes yet (a run directory from before "
                          f"episodes were logged, or one that has just started)")
    return eps


def load_references(path: Path | None) -> list[dict]:
    """A CSV with columns game, source, frames, value (and free-text protocol, note)."""
    if path is None:
        return []
    try:
        rows = list(csv.DictReader(open(path)))
        for r in rows:
            r["frames"], r["value"] = float(r["frames"]), float(r["value"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"--references {path}: {e}; expected a CSV with columns game,source,frames,value")
    return rows


def frames_per_step(episodes: list[Episodes], game: str | None = None) -> float | None:
    """Frames per env step of the sources (of one game); None when they disagree."""
    ratios = {round(e.frames_per_step, 6) for e in episodes if game is None or e.game == game}
    return ratios.pop() if len(ratios) == 1 else None


def column(steps: int, fps: float | None) -> str:
    """A table column: env steps, with frames beside them when all sources share frames per step."""
    return f"{steps:,} env steps" + (f" ({steps * fps / 1e6:g}M frames)" if fps and fps != 1 else "")


def summary_rows(episodes: list[Episodes], at: tuple[int, ...], window: int) -> tuple[list[dict], list[dict]]:
    points = [{"source": e.source, "game": e.game, "seed": e.seed, "env_steps": s,
               "frames": int(round(s * e.frames_per_step)), "running_return": e.at(s, window),
               "episodes": int(np.searchsorted(e.env_steps, s, side="right"))} for e in episodes for s in at]
    table = []
    for source, game in dict.fromkeys((e.source, e.game) for e in episodes):
        row = {"game": game, "learner": source}
        for s in at:
            row[str(s)] = mean_ci([p["running_return"] for p in points if p["source"] == source
                                   and p["game"] == game and p["env_steps"] == s], 1, "seed")
        table.append(row)
    return points, table


def reference_rows(episodes: list[Episodes], refs: list[dict], at: tuple[int, ...]) -> list[dict]:
    """One row per published learner of a game the sources hold: its values where its frames are
    an --at-steps count times the game's frames per env step."""
    rows = []
    for game, source in dict.fromkeys((r["game"], r["source"]) for r in refs):
        fps = frames_per_step(episodes, game)
        if fps is None:
            continue
        mine = [r for r in refs if r["game"] == game and r["source"] == source]
        rows.append({"game": game, "learner": f"reference: {source}",
                     **{str(s): next((f"{r['value']:g}" for r in mine if math.isclose(r["frames"], s * fps)), "")
                        for s in at}})
    return rows


def draw(out: Path, episodes: list[Episodes], refs: list[dict], window: int) -> list[Path]:
    paths = []
    for game in dict.fromkeys(e.game for e in episodes):
        series = []
        for e in (e for e in episodes if e.game == game):
            tag = e.source if sum(1 for x in episodes if x.game == game and x.source == e.source) == 1 \
                else f"{e.source} seed {e.seed}"
            series.append(Series(f"{tag}: episodes", e.env_steps, e.returns, style="dots"))
            series.append(Series(f"{tag}: last {window} episodes", e.env_steps, e.running(window)))
        fps = frames_per_step(episodes, game)
        for source in dict.fromkeys(r["source"] for r in refs if r["game"] == game and fps):
            mine = [r for r in refs if r["game"] == game and r["source"] == source]
            series.append(Series(f"reference: {source}", [r["frames"] / fps for r in mine], [r["value"] for r in mine],
                                 style="points"))
        xlabel = "env steps" + (f" (frames = {fps:g} x env steps)" if fps and fps != 1 else "")
        panel = Panel(f"{game}: raw score while learning", xlabel, "episode return", series, kind="mixed")
        paths.append(save_grid(out / f"curve_{game}.png", [panel], 1))
    return paths


def cmd_curve(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    if args.window < 1:
        raise ConfigError(f"--window = {args.window} must be at least 1")
    at = env_steps_list(args.at_steps) if args.at_steps else None
    episodes = [e for spec in args.sources for e in load_source(spec)]
    if args.games:
        wanted = args.games.split(",")
        episodes = [e for e in episodes if e.game in wanted]
        if not episodes:
            raise ConfigError(f"--games {args.games}: none of these games is in the sources")
    if at is None:  # as eval reads its curves: 1/4, 1/2 and all of the longest source
        last = int(max(e.env_steps[-1] for e in episodes))
        at = tuple(sorted({max(1, last // 4), max(1, last // 2), last}))
    refs = load_references(Path(args.references) if args.references else None)
    out.mkdir(parents=True, exist_ok=True)
    points, table = summary_rows(episodes, at, args.window)
    write_csv(out / "curve_points.csv", points)
    table += reference_rows(episodes, refs, at)
    table = [r for r in table if any(v for k, v in r.items() if k not in ("game", "learner"))]
    table.sort(key=lambda r: r["game"])
    fps = frames_per_step(episodes)
    md = markdown_table(table, {"game": "game", "learner": "learner",
                                **{str(s): f"running mean at {column(s, fps)}" for s in at}})
    (out / "curve_summary.md").write_text(md)
    draw(out, episodes, refs, args.window)
    print(md, end="")
    print(f"curves written to {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("curve", help="single-game learning curves (env steps, frames beside) of learn/eval/run "
                                            "outputs, beside published references")
    p.add_argument("sources", nargs="+", help="LABEL=DIR or DIR: a metarl learn/eval output or a metarl run directory")
    add_out_arg(p, "the PNGs, CSV and table")
    p.add_argument("--window", type=int, default=10, help="episodes in the running mean (default 10)")
    add_at_steps_arg(p, "env steps for the table, comma separated (default: 1/4, 1/2 and all of the longest source)",
                     at_was="counted frames; now --at-steps A,B,... in env steps (frames / 4 on Atari, "
                            "e.g. --at 1e7 is --at-steps 2.5e6)")
    p.add_argument("--games", help="only these games, comma-separated")
    p.add_argument("--references", help="CSV of published values: game,source,frames,value[,protocol,note]")
    p.set_defaults(func=cmd_curve)
