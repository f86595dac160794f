"""`metarl curve`: single-game learning curves against frames, from any learner, beside references.

A source is the output of `metarl learn` / `metarl eval` (its episodes.csv: every episode that
ended while fine-tuning) or a `metarl run` directory (its metrics.jsonl: the episodes that ended in
each iteration's adaptation and evaluation rollouts, at the run's cumulative frames). For each game
the command draws every episode's raw score (dots), the running mean of the last `window` episodes
(line) and published reference values (crosses), and tabulates the running mean at chosen frame
counts (mean over seeds, with a 95% t-interval when there are several).

Outputs: curve_<game>.png, curve_points.csv (running mean at each --at frame count, per source
and seed), curve_summary.md (the table), printed too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl import config as config_mod
from metarl.config import ConfigError
from metarl.evaluate import ci95
from metarl.plots import Panel, Series, markdown_table, save_grid, write_csv


@dataclass
class Episodes:
    """The episodes one learner finished on one game, in the order they ended."""

    source: str
    game: str
    seed: int
    frames: np.ndarray
    returns: np.ndarray

    def running(self, window: int) -> np.ndarray:
        """After each episode: the mean raw return of the last `window` episodes."""
        c = np.concatenate([[0.0], np.cumsum(self.returns, dtype=float)])
        i = np.arange(1, len(self.returns) + 1)
        lo = np.maximum(0, i - window)
        return (c[i] - c[lo]) / (i - lo)

    def at(self, frames: float, window: int) -> float:
        """The running mean over the last `window` episodes that ended by `frames` (NaN: none yet,
        or the learner had not reached that many frames)."""
        n = int(np.searchsorted(self.frames, frames, side="right"))
        if n == 0 or (len(self.frames) and self.frames[-1] < frames * 0.98):
            return math.nan
        return float(self.returns[max(0, n - window):n].mean())


def from_learn_dir(path: Path, label: str) -> list[Episodes]:
    """episodes.csv of `metarl learn` / `metarl eval` (one Episodes per game, init and seed)."""
    rows = list(csv.DictReader(open(path / "episodes.csv")))
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault((r["game"], r.get("init", ""), int(r["seed"])), []).append((float(r["frames"]),
                                                                                float(r["return"])))
    inits = {k[1] for k in out}
    return [Episodes(label if len(inits) == 1 else f"{label} ({init})", game, seed,
                     np.array([f for f, _ in v]), np.array([r for _, r in v]))
            for (game, init, seed), v in out.items()]


def from_run_dir(path: Path, label: str) -> list[Episodes]:
    """metrics.jsonl of `metarl run`: the episodes of θ's and θ′'s rollouts per task, each placed
    at the run's cumulative frames after the iteration it ended in."""
    per_game: dict[str, list[tuple[float, float]]] = {}
    seed = 0
    for line in open(path / "metrics.jsonl"):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "frames/total" not in rec:
            continue
        for key, values in rec.items():
            if key.startswith(("episodes_pre/", "episodes_post/")) and values:
                game = key.split("/", 1)[1]
                per_game.setdefault(game, []).extend((float(rec["frames/total"]), float(r)) for r in values)
    if (path / "config.yaml").exists():
        seed = config_mod.load(path / "config.yaml").meta.seed
    return [Episodes(label, game, seed, np.array([f for f, _ in v]), np.array([r for _, r in v]))
            for game, v in per_game.items()]


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


def summary_rows(episodes: list[Episodes], at: list[float], window: int) -> tuple[list[dict], list[dict]]:
    points = [{"source": e.source, "game": e.game, "seed": e.seed, "frames": f, "running_return": e.at(f, window),
               "episodes": int(np.searchsorted(e.frames, f, side="right"))} for e in episodes for f in at]
    table = []
    for source, game in dict.fromkeys((e.source, e.game) for e in episodes):
        row = {"game": game, "learner": source}
        for f in at:
            vals = [p["running_return"] for p in points if p["source"] == source and p["game"] == game
                    and p["frames"] == f and math.isfinite(p["running_return"])]
            seeds = sum(1 for e in episodes if e.source == source and e.game == game)
            if not vals:
                row[f"{f:g}"] = "—"
            elif seeds > 1:
                row[f"{f:g}"] = f"{np.mean(vals):.1f} ± {ci95(vals):.1f} ({len(vals)} seeds)"
            else:
                row[f"{f:g}"] = f"{vals[0]:.1f}"
        table.append(row)
    return points, table


def draw(out: Path, episodes: list[Episodes], refs: list[dict], window: int) -> list[Path]:
    paths = []
    for game in dict.fromkeys(e.game for e in episodes):
        series = []
        for e in (e for e in episodes if e.game == game):
            tag = e.source if sum(1 for x in episodes if x.game == game and x.source == e.source) == 1 \
                else f"{e.source} seed {e.seed}"
            series.append(Series(f"{tag}: episodes", e.frames, e.returns, style="dots"))
            series.append(Series(f"{tag}: last {window} episodes", e.frames, e.running(window)))
        for source in dict.fromkeys(r["source"] for r in refs if r["game"] == game):
            mine = [r for r in refs if r["game"] == game and r["source"] == source]
            series.append(Series(f"reference: {source}", [r["frames"] for r in mine], [r["value"] for r in mine],
                                 style="points"))
        panel = Panel(f"{game}: raw score while learning", "frames", "episode return", series, kind="mixed")
        paths.append(save_grid(out / f"curve_{game}.png", [panel], 1))
    return paths


def cmd_curve(args: argparse.Namespace) -> int:
    if args.window < 1:
        raise ConfigError(f"--window = {args.window} must be at least 1")
    try:
        at = [float(x) for x in args.at.split(",")]
    except ValueError:
        raise ConfigError(f"--at {args.at!r} must be frame counts separated by commas, e.g. 2.5e6,5e6,1e7") from None
    episodes = [e for spec in args.sources for e in load_source(spec)]
    if args.games:
        wanted = args.games.split(",")
        episodes = [e for e in episodes if e.game in wanted]
        if not episodes:
            raise ConfigError(f"--games {args.games}: none of these games is in the sources")
    refs = load_references(Path(args.references) if args.references else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points, table = summary_rows(episodes, at, args.window)
    write_csv(out / "curve_points.csv", points)
    for game, source in dict.fromkeys((r["game"], r["source"]) for r in refs):
        if any(e.game == game for e in episodes):  # one row per published learner, its values where frames match
            mine = [r for r in refs if r["game"] == game and r["source"] == source]
            table.append({"game": game, "learner": f"reference: {source}",
                          **{f"{f:g}": next((f"{r['value']:g}" for r in mine if math.isclose(r["frames"], f)), "")
                             for f in at}})
    table = [r for r in table if any(v for k, v in r.items() if k not in ("game", "learner"))]
    table.sort(key=lambda r: r["game"])
    md = markdown_table(table, {"game": "game", "learner": "learner",
                                **{f"{f:g}": f"running mean at {f / 1e6:g}M frames" for f in at}})
    (out / "curve_summary.md").write_text(md)
    draw(out, episodes, refs, args.window)
    print(md, end="")
    print(f"curves written to {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("curve", help="single-game learning curves (frames) of learn/eval/run outputs, "
                                            "beside published references")
    p.add_argument("sources", nargs="+", help="LABEL=DIR or DIR: a metarl learn/eval output or a metarl run directory")
    p.add_argument("--out", required=True, help="output directory for the PNGs, CSV and table")
    p.add_argument("--window", type=int, default=10, help="episodes in the running mean (default 10)")
    p.add_argument("--at", default="2.5e6,5e6,1e7", help="frame counts for the table (default 2.5e6,5e6,1e7)")
    p.add_argument("--games", help="only these games, comma-separated")
    p.add_argument("--references", help="CSV of published values: game,source,frames,value[,protocol,note]")
    p.set_defaults(func=cmd_curve)
