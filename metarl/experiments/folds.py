"""Leave-one-game-out results over independent units (`metarl sweep --folds loo`).

A **unit** is one fold (a held-out game; the fold meta-trains on the other games) times one
meta-training replicate (`--replicates R`: meta.seed s, s + 1, ...; each replicate starts from its
own theta0, which is also that unit's fresh network). The fine-tuning seeds are nested in a unit.
What varies between the configurations being compared — meta-training — varies between units, so
every interval is over units:

- a configuration's score in a unit is the mean over that unit's fine-tuning seeds;
- intervals are 95%, t over the unit means, df = units - 1;
- differences are paired within a unit (configuration minus the reference configuration on the same
  fold, replicate and fine-tuning seeds), then t over the units' differences;
- `detectable`: the smallest difference that design detects with 80% power at the 5% level,
  (t(0.975, df) + t(0.80, df)) x the standard error of the paired differences.
- beside it, the same differences with the folds fixed (`*_fixed`: the mean over folds of each
  fold's mean over its replicates; interval and detectable size from the replicates' variation
  within folds, pooled, df = units - folds; `stats.stratified`). Units over folds ask whether the
  effect holds for games like these (the five games a sample of games); folds fixed ask whether it
  holds on these five games, where the game-to-game spread of the effect is not error.

Normalisation (`--references FILE`, `metarl references`): each game's score becomes
(score - random policy) / (single-game PPO from scratch at the fine-tuning budget - random policy),
from references measured once and stored in sweep.json before the first run; 0 = the random policy,
1 = where PPO from scratch ends. Fast adaptation (the reward per step after 1, 3, 10 inner updates)
is normalised the same way by the references' reward rates. No fold is dropped: a game whose
references do not separate PPO from random is refused when the sweep starts. Without references the
per-fold rows are written in raw game scores and nothing is pooled across games.

Outputs at the top of the sweep directory:
  summary.md / summary.csv       pooled over units (with references), per configuration
  summary_folds.csv              per fold (each held-out game its own row), over its replicates
  per_seed.csv, per_unit.csv     every fine-tuning run; every unit's means
  training.csv                   every meta-run's return on its own training games (last fifth)
  curves.png, auc_vs_compute.png
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from metarl.core.stats import ci95, detectable, pm, stratified, units_for
from metarl.core.plots import Panel, Series, markdown_table, save_grid, write_csv
from metarl.experiments.references import normalise

REF_FRESH, REF_SKIP1 = "baseline", "skip1"
PLAN = 0.15
"""The detectable difference (normalised scale) the design is planned for: summary.csv gives, per
difference, the units that would reach it at the measured spread."""
UNITS_MOST = 10_000
"""The most units `units_for` searches; beyond it the table says '> 10,000'."""


def _stats(values: list[float]) -> dict[str, float]:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not x.size:
        return {"mean": math.nan, "ci95": math.nan, "n": 0, "detectable": math.nan, "sd": math.nan}
    return {"mean": float(x.mean()), "ci95": ci95(x), "n": int(x.size), "detectable": detectable(x),
            "sd": float(x.std(ddof=1)) if x.size > 1 else math.nan}


def _pm(s: dict[str, float], fmt: str = ".3f") -> str:
    return pm(s["mean"], s["ci95"], fmt)


def _diff(s: dict[str, float], fmt: str = ".3f") -> str:
    """'Δ ± interval (detectable D)'."""
    if not s["n"]:
        return ""
    return _pm(s, fmt) + (f" (det. {s['detectable']:{fmt}})" if math.isfinite(s["detectable"]) else "")


def _units(n: float | None) -> str:
    """A `units_for` result as a table cell: blank where there is no spread to plan from."""
    if n is None or math.isnan(n):
        return ""
    return f"> {UNITS_MOST:,}" if n == math.inf else f"{n:,.0f}"


def normalised(row: dict[str, Any], refs: dict[str, dict[str, float]], fast_keys: list[str]) -> dict[str, float]:
    """A per-seed row's scores on the references' scale (see the module docstring)."""
    g = row["game"]
    out = {"n_auc": normalise(row["auc_return"], g, refs), "n_final": normalise(row["final_return"], g, refs),
           "n_rate": normalise(row["auc_reward_rate"], g, refs, key="rate")}
    for k in fast_keys:
        out[f"n_{k}"] = normalise(row.get(k, math.nan), g, refs, key="rate")
    return out


def unit_table(per_seed: list[dict[str, Any]], measures: list[str]) -> list[dict[str, Any]]:
    """One row per (configuration, fold, meta-seed): the mean of each measure over the unit's
    fine-tuning seeds (finite values), and how many seeds it rests on."""
    units: dict[tuple, list[dict]] = {}
    for r in per_seed:
        units.setdefault((r["config"], r["game"], r["meta_seed"]), []).append(r)
    out = []
    for (config, game, meta_seed), rows in units.items():
        row: dict[str, Any] = {"config": config, "fold": game, "meta_seed": meta_seed, "seeds": len(rows),
                               "diverged": sum(bool(r["diverged"]) for r in rows),
                               "fast_diverged": sum(bool(r.get("fast_diverged")) for r in rows)}
        for m in measures:
            vals = [float(r[m]) for r in rows if r.get(m) is not None and math.isfinite(float(r[m]))]
            row[m] = float(np.mean(vals)) if vals else math.nan
        for k in ("env_steps", "env_steps_adapt", "env_steps_eval", "wall_s"):
            row[k] = float(rows[0].get(k, 0.0))
        out.append(row)
    return out


def paired_units(units: list[dict], label: str, ref: str, m: str, fold: str | None = None) -> list[float]:
    """Per unit both configurations ran: label's mean minus ref's mean of measure m."""
    by = {(u["config"], u["fold"], u["meta_seed"]): u for u in units}
    return [u[m] - by[(ref, u["fold"], u["meta_seed"])][m] for u in units
            if u["config"] == label and (fold is None or u["fold"] == fold)
            and (ref, u["fold"], u["meta_seed"]) in by]


def by_fold(units: list[dict], label: str, ref: str | None, m: str) -> dict[str, list[float]]:
    """Per fold: label's unit means of m (or, with ref, its paired differences to ref)."""
    out: dict[str, list[float]] = {}
    if ref is None:
        for u in units:
            if u["config"] == label:
                out.setdefault(u["fold"], []).append(u[m])
        return out
    for fold in dict.fromkeys(u["fold"] for u in units):
        d = paired_units(units, label, ref, m, fold)
        if d:
            out[fold] = d
    return out


def summarise(units: list[dict], labels: list[str], measures: list[str], fold: str | None = None) -> list[dict]:
    """Per configuration: every measure's mean ± interval over units, and its paired differences
    to the fresh network and to skip 1 with the smallest detectable difference; `fold` restricts
    to one fold's replicates."""
    rows = []
    for label in labels:
        mine = [u for u in units if u["config"] == label and (fold is None or u["fold"] == fold)]
        if not mine:
            continue
        row: dict[str, Any] = {"config": label, "units": len(mine), "folds": len({u["fold"] for u in mine}),
                               "runs": sum(u["seeds"] for u in mine), "diverged": sum(u["diverged"] for u in mine),
                               "fast_diverged": sum(u["fast_diverged"] for u in mine)}
        if fold is not None:
            row["fold"] = fold
        for m in measures:
            s = _stats([u[m] for u in mine])
            row[m], row[f"{m}_mean"], row[f"{m}_ci95"] = _pm(s), s["mean"], s["ci95"]
            if fold is None:
                f = stratified(by_fold(units, label, None, m))
                row[f"{m}_fixed"], row[f"{m}_fixed_ci95"] = _pm(f), f["ci95"]
            for ref, tag in ((REF_FRESH, "fresh"), (REF_SKIP1, "skip1")):
                if label in (ref, REF_FRESH):
                    continue
                d = _stats(paired_units(units, label, ref, m, fold))
                row[f"d_{m}_vs_{tag}"] = _diff(d)
                row[f"d_{m}_vs_{tag}_mean"], row[f"d_{m}_vs_{tag}_ci95"] = d["mean"], d["ci95"]
                row[f"d_{m}_vs_{tag}_detectable"] = d["detectable"]
                if fold is None:
                    folds_d = by_fold(units, label, ref, m)
                    f = stratified(folds_d)
                    row[f"d_{m}_vs_{tag}_fixed"] = _diff(f)
                    row[f"d_{m}_vs_{tag}_fixed_mean"], row[f"d_{m}_vs_{tag}_fixed_ci95"] = f["mean"], f["ci95"]
                    row[f"d_{m}_vs_{tag}_fixed_detectable"] = f["detectable"]
                    row[f"d_{m}_vs_{tag}_units_for_{PLAN:g}"] = units_for(d["sd"], PLAN, most=UNITS_MOST)
                    row[f"d_{m}_vs_{tag}_fixed_units_for_{PLAN:g}"] = units_for(f["sd"], PLAN, max(len(folds_d), 1), most=UNITS_MOST)
        for k in ("env_steps", "env_steps_adapt", "wall_s"):
            row[f"meta_{k}"] = float(np.mean([u[k] for u in mine]))
        rows.append(row)
    return rows


def training_table(training: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Meta-training on its own games: per configuration and training game, over units (each a
    meta-run), mean ± interval of the last-fifth return, of the last-fifth reward per step of the
    evaluation rollouts (normalised by the references where given) and of the adaptation gain."""
    out = []
    for config in dict.fromkeys(r["config"] for r in training):
        for game in dict.fromkeys(r["game"] for r in training if r["config"] == config):
            mine = [r for r in training if r["config"] == config and r["game"] == game]
            row = {"config": config, "game": game, "runs": len(mine),
                   "env_steps_per_game": f"{np.mean([r['env_steps_per_game'] for r in mine]):,.0f}"}
            for k, fmt in (("final", ".2f"), ("rate_last", ".4f"), ("n_rate_last", ".2f"), ("adaptation_gain", ".4f")):
                s = _stats([r.get(k, math.nan) for r in mine])
                row[k], row[f"{k}_mean"], row[f"{k}_ci95"] = _pm(s, fmt), s["mean"], s["ci95"]
            out.append(row)
    return out


def training_by_config(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training table's normalised last-fifth rate averaged over each configuration's games
    (equal weight per game): how far each configuration got on its own games, in one number."""
    out = []
    for config in dict.fromkeys(r["config"] for r in table):
        v = [r["n_rate_last_mean"] for r in table if r["config"] == config and math.isfinite(r["n_rate_last_mean"])]
        m = float(np.mean(v)) if v else math.nan
        out.append({"config": config, "games": len(v), "n_rate_last_mean": m, "n_rate_last": pm(m)})
    return out


def write(out: Path, per_seed: list[dict[str, Any]], curves: dict[str, dict[str, dict]], labels: list[str],
          header: str, budget_keys: list[str], refs: dict[str, dict[str, float]] | None,
          fast_keys: list[str], training: list[dict[str, Any]]) -> list[Path]:
    """summary.md, summary.csv, summary_folds.csv, per_seed.csv, per_unit.csv, training.csv and
    the two plots."""
    raw = ["auc_return", "final_return", "auc_reward_rate", *[f"return_at_{b}" for b in budget_keys], *fast_keys]
    if refs is not None:
        per_seed = [{**r, **normalised(r, refs, fast_keys)} for r in per_seed]
    norm = ["n_auc", "n_final", "n_rate", *[f"n_{k}" for k in fast_keys]] if refs is not None else []
    units = unit_table(per_seed, raw + norm)
    fold_rows = [r for g in dict.fromkeys(u["fold"] for u in units) for r in summarise(units, labels, raw + norm, g)]
    pooled = summarise(units, labels, norm) if refs is not None else []
    write_csv(out / "per_seed.csv", per_seed)
    write_csv(out / "per_unit.csv", units)
    write_csv(out / "summary_folds.csv", fold_rows)
    write_csv(out / "summary.csv", pooled)
    if training and refs is not None:
        training = [{**r, "n_rate_last": normalise(r.get("rate_last", math.nan), r["game"], refs, key="rate")}
                    for r in training]
    if training:
        write_csv(out / "training.csv", training)
    n_units = len({(u["fold"], u["meta_seed"]) for u in units})
    text = header + "\n\n"
    if pooled:
        cols = {"config": "config", "units": "units", "runs": "fine-tuning runs", "n_auc": "AUC (normalised)",
                "d_n_auc_vs_fresh": "Δ AUC vs fresh (paired)", "d_n_auc_vs_skip1": "Δ AUC vs skip 1 (paired)",
                "n_final": "final (normalised)", "d_n_final_vs_fresh": "Δ final vs fresh", "diverged": "diverged",
                "meta_env_steps_shown": "meta env steps / unit", "meta_adapt_shown": "of which adaptation",
                "meta_wall_shown": "meta wall s / unit"}
        pooled = [{**r, "meta_env_steps_shown": f"{r['meta_env_steps']:,.0f}",
                   "meta_adapt_shown": f"{r['meta_env_steps_adapt']:,.0f}", "meta_wall_shown": f"{r['meta_wall_s']:.0f}"}
                  for r in pooled]
        text += (f"## Pooled over {n_units} units (fold × meta-seed)\n\n"
                 f"Normalised: 0 = random policy, 1 = PPO from scratch at the fine-tuning budget (final return). "
                 f"Mean ± 95% t-interval over units, df = units − 1; Δ paired within units; det. = smallest "
                 f"difference detectable with 80% power at the 5% level.\n\n" + markdown_table(pooled, cols))
        xcols = {"config": "config", "d_n_auc_vs_fresh_fixed": "Δ AUC vs fresh",
                 "d_n_auc_vs_skip1_fixed": "Δ AUC vs skip 1", "d_n_final_vs_fresh_fixed": "Δ final vs fresh",
                 **({f"d_n_{fast_keys[-1]}_vs_fresh_fixed": f"Δ after {fast_keys[-1].removeprefix('fast_rate_')} "
                     "updates vs fresh"} if fast_keys else {})}
        n_folds = len({u["fold"] for u in units})
        plan = [{"config": r["config"], **{f"{k}_{tag}": _units(r.get(f"d_n_auc_vs_{tag}{k}_units_for_{PLAN:g}"))
                                           for tag in ("fresh", "skip1") for k in ("", "_fixed")}}
                for r in pooled if r["config"] != REF_FRESH]
        text += (f"\n## The same differences with the folds fixed (these {n_folds} games)\n\n"
                 "Mean over folds of each fold's mean over its replicates; interval and det. from the "
                 f"replicates' variation within folds, pooled (df = units − folds = {n_units - n_folds}). "
                 "The table above treats the games as a sample of games (the game-to-game spread of an "
                 "effect counts as error); this one asks about these games only.\n\n" + markdown_table(pooled, xcols))
        text += (f"\nUnits that would make the Δ AUC detectable at {PLAN:g} (at the spread measured here; now "
                 f"{n_units}):\n\n" + markdown_table(plan, {"config": "config", "_fresh": "vs fresh, units over folds",
                                                            "_fixed_fresh": "vs fresh, folds fixed",
                                                            "_skip1": "vs skip 1, units over folds",
                                                            "_fixed_skip1": "vs skip 1, folds fixed"}))
        if fast_keys:
            fcols = {"config": "config", "units": "units",
                     **{f"n_{k}": f"after {k.removeprefix('fast_rate_')} updates" for k in fast_keys},
                     **{f"d_n_{k}_vs_fresh": f"Δ {k.replace('fast_rate_', '')} vs fresh" for k in fast_keys[1:]},
                     "fast_diverged": "diverged (NaN later points, not averaged)"}
            text += ("\n## Fast adaptation (reward per step after k inner updates, normalised)\n\n"
                     + markdown_table(pooled, fcols))
    else:
        text += "No references given (--references): per-fold rows in raw game scores only.\n"
    fcols = {"fold": "held-out game", "config": "config", "units": "replicates", "auc_return": "AUC return",
             "d_auc_return_vs_fresh": "Δ AUC vs fresh", "final_return": "final return",
             **({"n_auc": "AUC (normalised)", "d_n_auc_vs_fresh": "Δ norm. AUC vs fresh"} if refs is not None else {})}
    text += "\n## Per fold (over its replicates)\n\n" + markdown_table(fold_rows, fcols)
    if training:
        table = training_table(training)
        tcols = {"config": "config", "game": "training game", "runs": "meta-runs",
                 "env_steps_per_game": "env steps per game", "final": "return, last fifth",
                 "rate_last": "reward/step, last fifth",
                 **({"n_rate_last": "reward/step (normalised)"} if refs is not None else {}),
                 "adaptation_gain": "reward/step θ′ − θ"}
        text += ("\n## Meta-training on its own games (last fifth of each meta-run's steps)\n\n"
                 "Returns of the episodes that ended in the game's rollouts (n/a where none ended: Freeway's "
                 "2,500-step episodes); reward per step of its evaluation rollouts (θ′, or θ for joint), "
                 + ("normalised by the references (0 random, 1 PPO from scratch at the fine-tuning budget); " if refs
                    is not None else "") + "mean ± 95% over meta-runs.\n\n" + markdown_table(table, tcols))
        if refs is not None:
            text += ("\nAveraged over the training games (normalised reward per step, last fifth):\n\n"
                     + markdown_table(training_by_config(table), {"config": "config", "games": "games",
                                                                  "n_rate_last": "normalised reward/step"}))
    (out / "summary.md").write_text(text)
    return [plot_curves(out / "curves.png", curves), plot_compute(out / "auc_vs_compute.png", pooled or fold_rows,
                                                                  "n_auc" if pooled else "auc_return")]


def plot_curves(path: Path, curves: dict[str, dict[str, dict]]) -> Path:
    """One panel per held-out game: every initialisation's mean fine-tuning curve."""
    panels = []
    for game, by_label in curves.items():
        panels.append(Panel(f"held out: {game}", "fine-tuning env steps", "return (running mean)",
                            [Series(label, c["env_steps"], c["return"], c["return_std"]) for label, c in by_label.items()],
                            empty_note="no episode finished"))
    return save_grid(path, panels, min(3, len(panels)), "fine-tuning on the held-out game (mean, std over units)")


def plot_compute(path: Path, rows: list[dict], key: str) -> Path:
    """A configuration's AUC (± 95% over units) against what its meta-training cost."""
    panels = [Panel(f"held-out AUC vs meta-training {what}", xlabel, key,
                    [Series(r["config"] + (f" ({r['fold']})" if "fold" in r else ""), [r[f"meta_{k}"]],
                            [r[f"{key}_mean"]], [r[f"{key}_ci95"]]) for r in rows],
                    kind="points", empty_note="no finite AUC")
              for what, k, xlabel in (("env steps", "env_steps", "meta-training env steps per fold"),
                                      ("seconds", "wall_s", "meta-training wall seconds per fold"))]
    return save_grid(path, panels, 2, "leave-one-game-out, over units")
