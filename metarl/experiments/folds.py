"""Leave-one-game-out results pooled over folds (`metarl sweep --folds loo`).

Each fold meta-trains on all training games but one and fine-tunes on that one; its directory is
an ordinary sweep directory (fold-<game>/). This module reads the folds' per-seed scores and writes
the experiment's answer at the top of the sweep directory:

  summary.md / summary.csv       per fold and configuration: AUC, final return, return at fixed
                                 budgets, steps to the threshold, diverged runs; and pooled over
                                 folds, each game's scores divided by the fresh network's mean final
                                 return on that game (1.0 = where the fresh network ends)
  curves.png                     fine-tuning curves per held-out game, every initialisation
  auc_vs_compute.png             pooled normalised AUC against meta-training env steps and seconds

Intervals are 95%, t-based, over seeds (per fold) or over fold x seed pairs (pooled). Differences
to the fresh network, and to skip 1 (no skipping: what the seed's question compares against), are
paired by seed (every init of a seed sees the same environment seeds);
`mde` is the smallest paired difference the seeds could detect with 80% power at the 5% level:
(1.96 + 0.84) x its standard error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from metarl.core.stats import ci95, pm
from metarl.core.plots import Panel, Series, markdown_table, save_grid, write_csv

Z_MDE = 1.96 + 0.84


def _stats(values: list[float]) -> dict[str, float]:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not x.size:
        return {"mean": math.nan, "ci95": math.nan, "median": math.nan, "n": 0, "mde": math.nan}
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return {"mean": float(x.mean()), "ci95": ci95(x), "median": float(np.median(x)), "n": int(x.size),
            "mde": Z_MDE * se}


def _pm(s: dict[str, float], fmt: str = ".2f") -> str:
    return pm(s["mean"], s["ci95"], fmt)


def paired(by: dict[tuple, dict[str, Any]], mine: list[dict[str, Any]], ref: str, key: str) -> list[float]:
    """r[key] minus the `ref` configuration's value on the same game and seed, for each r in `mine`
    that `ref` also ran."""
    return [r[key] - by[(ref, r["game"], r["seed"])][key] for r in mine if (ref, r["game"], r["seed"]) in by]


def pool(per_seed: list[dict[str, Any]], labels: list[str], budget_keys: list[str]) -> tuple[list[dict], list[dict]]:
    """Per-fold rows and pooled rows from the per-seed scores of every fold (`game` = the fold)."""
    games = list(dict.fromkeys(r["game"] for r in per_seed))
    by = {(r["config"], r["game"], r["seed"]): r for r in per_seed}
    norm = {}
    for g in games:
        finals = [r["final_return"] for r in per_seed if r["game"] == g and r["config"] == "baseline"]
        m = _stats(finals)["mean"]
        norm[g] = m if math.isfinite(m) and m > 0 else math.nan
    fold_rows, pooled_rows = [], []
    for label in labels:
        pooled: dict[str, list[float]] = {"auc": [], "final": [], "d_auc": [], "d_final": [], "d_skip1": []}
        reached = total = diverged = 0
        cost: dict[str, list[float]] = {}
        for g in games:
            mine = [r for r in per_seed if r["config"] == label and r["game"] == g]
            if not mine:
                continue
            d_auc = paired(by, mine, "baseline", "auc_return")
            auc, final = _stats([r["auc_return"] for r in mine]), _stats([r["final_return"] for r in mine])
            d = _stats(d_auc)
            hits = [r["steps_to_threshold"] for r in mine if r["steps_to_threshold"] is not None]
            row = {"fold": g, "config": label, "seeds": len(mine), "auc_return": _pm(auc),
                   "auc_median": f"{auc['median']:.2f}" if auc["n"] else "n/a", "final_return": _pm(final),
                   "d_auc_vs_fresh": _pm(d) if label != "baseline" else "", "mde_auc": f"{d['mde']:.2f}"
                   if label != "baseline" and math.isfinite(d["mde"]) else "",
                   **{f"return_at_{b}": _pm(_stats([r.get(f"return_at_{b}", math.nan) for r in mine]))
                      for b in budget_keys},
                   "steps_to_threshold": f"{np.mean(hits):,.0f} ({len(hits)}/{len(mine)})" if hits
                   else f"never (0/{len(mine)})",
                   "diverged": sum(r["diverged"] for r in mine),
                   "meta_env_steps": mine[0]["env_steps"], "adapt_env_steps": mine[0]["env_steps_adapt"],
                   "eval_env_steps": mine[0]["env_steps_eval"], "meta_wall_s": mine[0]["wall_s"]}
            fold_rows.append(row)
            for k in ("env_steps", "env_steps_adapt", "env_steps_eval", "wall_s"):
                cost.setdefault(k, []).append(float(mine[0][k]))
            reached, total = reached + len(hits), total + len(mine)
            diverged += row["diverged"]
            if math.isfinite(norm[g]):
                pooled["auc"] += [r["auc_return"] / norm[g] for r in mine]
                pooled["final"] += [r["final_return"] / norm[g] for r in mine]
                pooled["d_auc"] += [x / norm[g] for x in d_auc]
                pooled["d_final"] += [x / norm[g] for x in paired(by, mine, "baseline", "final_return")]
                pooled["d_skip1"] += [x / norm[g] for x in paired(by, mine, "skip1", "auc_return")]
        if not total:
            continue
        s = {k: _stats(v) for k, v in pooled.items()}
        pooled_rows.append({
            "config": label, "folds": len(cost.get("env_steps", [])) or len(games), "runs": total,
            "norm_auc": _pm(s["auc"], ".3f"), "norm_auc_median": f"{s['auc']['median']:.3f}" if s["auc"]["n"] else "n/a",
            "norm_auc_mean": s["auc"]["mean"], "norm_auc_ci95": s["auc"]["ci95"],
            "norm_final": _pm(s["final"], ".3f"),
            "d_norm_auc_vs_fresh": _pm(s["d_auc"], ".3f") if label != "baseline" else "",
            "mde_norm_auc": f"{s['d_auc']['mde']:.3f}" if label != "baseline" and math.isfinite(s["d_auc"]["mde"]) else "",
            "d_norm_final_vs_fresh": _pm(s["d_final"], ".3f") if label != "baseline" else "",
            "d_norm_auc_vs_skip1": _pm(s["d_skip1"], ".3f") if label not in ("baseline", "skip1") else "",
            "reached": f"{reached}/{total}", "diverged": diverged,
            "meta_env_steps_per_fold": float(np.mean(cost["env_steps"])) if cost else 0.0,
            "adapt_env_steps_per_fold": float(np.mean(cost["env_steps_adapt"])) if cost else 0.0,
            "eval_env_steps_per_fold": float(np.mean(cost["env_steps_eval"])) if cost else 0.0,
            "meta_wall_s_per_fold": float(np.mean(cost["wall_s"])) if cost else 0.0,
        })
    return fold_rows, pooled_rows


def write(out: Path, per_seed: list[dict[str, Any]], curves: dict[str, dict[str, dict]], labels: list[str],
          header: str, budget_keys: list[str]) -> list[Path]:
    """summary.md, summary.csv, summary_folds.csv, per_seed.csv, curves.png, auc_vs_compute.png."""
    fold_rows, pooled_rows = pool(per_seed, labels, budget_keys)
    write_csv(out / "summary.csv", pooled_rows)
    write_csv(out / "summary_folds.csv", fold_rows)
    write_csv(out / "per_seed.csv", per_seed)
    pooled_cols = {"config": "config", "runs": "runs (folds x seeds)", "norm_auc": "AUC / fresh final",
                   "norm_auc_median": "median", "d_norm_auc_vs_fresh": "Δ vs fresh (paired)",
                   "mde_norm_auc": "smallest detectable Δ", "norm_final": "final / fresh final",
                   "d_norm_final_vs_fresh": "Δ final vs fresh", "d_norm_auc_vs_skip1": "Δ AUC vs skip1 (paired)",
                   "reached": "reached threshold",
                   "diverged": "diverged", "meta_env_steps_per_fold": "meta env steps / fold",
                   "adapt_env_steps_per_fold": "of which adaptation", "meta_wall_s_per_fold": "meta wall s / fold"}
    fold_cols = {"fold": "held-out game", "config": "config", "auc_return": "AUC return", "auc_median": "median",
                 "d_auc_vs_fresh": "Δ AUC vs fresh", "mde_auc": "smallest detectable Δ",
                 "final_return": "final return", **{f"return_at_{b}": f"return at {int(b):,}" for b in budget_keys},
                 "steps_to_threshold": "steps to threshold (reached)", "diverged": "diverged"}
    shown = [{**r, "meta_env_steps_per_fold": f"{r['meta_env_steps_per_fold']:,.0f}",
              "adapt_env_steps_per_fold": f"{r['adapt_env_steps_per_fold']:,.0f}",
              "meta_wall_s_per_fold": f"{r['meta_wall_s_per_fold']:.0f}"} for r in pooled_rows]
    (out / "summary.md").write_text(header + "\n\n## Pooled over folds\n\n" + markdown_table(shown, pooled_cols)
                                    + "\n## Per fold\n\n" + markdown_table(fold_rows, fold_cols))
    return [plot_curves(out / "curves.png", curves), plot_compute(out / "auc_vs_compute.png", pooled_rows)]


def plot_curves(path: Path, curves: dict[str, dict[str, dict]]) -> Path:
    """One panel per held-out game: every initialisation's mean fine-tuning curve."""
    panels = []
    for game, by_label in curves.items():
        panels.append(Panel(f"held out: {game}", "fine-tuning env steps", "return (running mean)",
                            [Series(label, c["env_steps"], c["return"], c["return_std"]) for label, c in by_label.items()],
                            empty_note="no episode finished"))
    return save_grid(path, panels, min(3, len(panels)), "fine-tuning on the held-out game (mean, std over seeds)")


def plot_compute(path: Path, pooled_rows: list[dict]) -> Path:
    """Pooled normalised AUC (± 95%) against what meta-training cost, one point per configuration."""
    panels = [Panel(f"held-out AUC vs meta-training {what}", xlabel, "AUC / fresh final return",
                    [Series(r["config"], [r[key]], [r["norm_auc_mean"]], [r["norm_auc_ci95"]]) for r in pooled_rows],
                    kind="points", empty_note="no finite AUC")
              for what, key, xlabel in (("env steps", "meta_env_steps_per_fold", "meta-training env steps per fold"),
                                        ("seconds", "meta_wall_s_per_fold", "meta-training wall seconds per fold"))]
    return save_grid(path, panels, 2, "leave-one-game-out, pooled over folds and seeds")
