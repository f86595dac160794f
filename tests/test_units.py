"""The skip-count experiment's statistics (`metarl.experiments.folds`): units are fold x meta-seed,
scores are unit means over the nested fine-tuning seeds, intervals are t over units, differences are
paired within a unit, the smallest detectable difference uses t quantiles at the same df, and every
game is normalised by the committed references (random policy 0, PPO from scratch 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metarl.core.stats import T80, T95, detectable, stratified, t80, t95
from metarl.experiments.folds import normalised, summarise, unit_table

REFS = {"a": {"random_final_return": 1.0, "scratch_final_return": 3.0, "random_reward_rate": 0.0,
              "scratch_final_rate": 0.1, "budget": 100},
        "b": {"random_final_return": 0.0, "scratch_final_return": 20.0, "random_reward_rate": 0.01,
              "scratch_final_rate": 0.05, "budget": 100}}


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 30):
        assert T95[df - 1] == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
        assert T80[df - 1] == pytest.approx(stats.t.ppf(0.80, df), abs=1e-3)
    assert t80(200) == pytest.approx(stats.norm.ppf(0.80), abs=1e-3)


def test_detectable_difference_uses_t_at_the_same_df():
    x = np.array([0.1, 0.3, -0.2, 0.4, 0.0])
    se = x.std(ddof=1) / math.sqrt(5)
    assert detectable(x) == pytest.approx((t95(4) + t80(4)) * se)
    assert detectable(x) > (1.96 + 0.84) * se  # the normal quantiles understated it
    assert math.isnan(detectable([1.0]))


def test_normalisation_puts_random_at_0_and_scratch_at_1():
    row = {"game": "b", "auc_return": 10.0, "final_return": 20.0, "auc_reward_rate": 0.01, "fast_rate_0": 0.05}
    n = normalised(row, REFS, ["fast_rate_0"])
    assert n == {"n_auc": pytest.approx(0.5), "n_final": pytest.approx(1.0), "n_rate": pytest.approx(0.0),
                 "n_fast_rate_0": pytest.approx(1.0)}


def _rows(effect: dict[str, float], unit_noise: dict[tuple[str, int], float], seeds: int = 2) -> list[dict]:
    """per-seed rows of two folds x three meta-seeds; a config's score in a unit = the unit's level
    + its effect, plus seed noise of +-0.3 that cancels within a unit."""
    rows = []
    for (game, ms), level in unit_noise.items():
        for config, eff in effect.items():
            for s in range(seeds):
                v = level + eff + (0.3 if s % 2 else -0.3)
                rows.append({"config": config, "game": game, "meta_seed": ms, "seed": s + 10 * ms,
                             "fast_diverged": config == "skip2" and s == 0,
                             "auc_return": v, "final_return": v, "auc_reward_rate": 0.0, "diverged": False,
                             "env_steps": 100, "env_steps_adapt": 0, "env_steps_eval": 100, "wall_s": 1.0})
    return rows


def test_intervals_are_over_units_and_differences_paired_within_them():
    levels = {("a", 0): 1.0, ("a", 1): 1.4, ("a", 2): 0.7, ("b", 0): 0.2, ("b", 1): 0.9, ("b", 2): 0.5}
    rows = _rows({"baseline": 0.0, "skip1": 0.25, "skip2": 0.5}, levels)
    units = unit_table(rows, ["auc_return"])
    assert len(units) == 3 * 6 and all(u["seeds"] == 2 for u in units)
    # the unit mean averages the seed noise away: baseline's unit means are the levels
    assert sorted(u["auc_return"] for u in units if u["config"] == "baseline") == pytest.approx(sorted(levels.values()))
    by = {r["config"]: r for r in summarise(units, ["skip1", "skip2", "baseline"], ["auc_return"])}
    assert by["baseline"]["units"] == 6 and by["baseline"]["runs"] == 12
    assert by["skip2"]["fast_diverged"] == 6 and by["skip1"]["fast_diverged"] == 0  # counted, one per unit
    lv = np.array(list(levels.values()))
    assert by["baseline"]["auc_return_ci95"] == pytest.approx(t95(5) * lv.std(ddof=1) / math.sqrt(6))
    # paired within units, the level cancels: every unit differs by exactly the effect
    assert by["skip1"]["d_auc_return_vs_fresh_mean"] == pytest.approx(0.25)
    assert by["skip1"]["d_auc_return_vs_fresh_ci95"] == pytest.approx(0.0, abs=1e-12)
    assert by["skip2"]["d_auc_return_vs_skip1_mean"] == pytest.approx(0.25)
    assert "d_auc_return_vs_skip1_mean" not in by["skip1"]
    # one fold: its three replicates, df 2
    fold_a = {r["config"]: r for r in summarise(units, ["baseline"], ["auc_return"], fold="a")}
    la = np.array([1.0, 1.4, 0.7])
    assert fold_a["baseline"]["units"] == 3
    assert fold_a["baseline"]["auc_return_ci95"] == pytest.approx(t95(2) * la.std(ddof=1) / math.sqrt(3))


def test_a_unit_level_difference_that_varies_gets_an_interval_and_a_detectable_size():
    levels = {("a", m): 1.0 for m in range(3)} | {("b", m): 2.0 for m in range(3)}
    rows = _rows({"baseline": 0.0}, levels)
    for i, r in enumerate(_rows({"skip1": 0.0}, levels)):
        unit = (r["game"], r["meta_seed"])
        r["auc_return"] += {("a", 0): 0.1, ("a", 1): 0.3, ("a", 2): -0.1, ("b", 0): 0.2, ("b", 1): 0.0,
                            ("b", 2): 0.4}[unit]
        rows.append(r)
    units = unit_table(rows, ["auc_return"])
    by = {r["config"]: r for r in summarise(units, ["skip1", "baseline"], ["auc_return"])}
    d = np.array([0.1, 0.3, -0.1, 0.2, 0.0, 0.4])
    assert by["skip1"]["d_auc_return_vs_fresh_mean"] == pytest.approx(d.mean())
    assert by["skip1"]["d_auc_return_vs_fresh_ci95"] == pytest.approx(t95(5) * d.std(ddof=1) / math.sqrt(6))
    assert by["skip1"]["d_auc_return_vs_fresh_detectable"] == pytest.approx(detectable(d))


def test_folds_fixed_take_the_error_from_within_folds_only():
    """Two folds whose effects differ (+0.1 and +0.9) with replicates that agree within each fold:
    over units the game-to-game spread is error (a wide interval); with the folds fixed it is not."""
    d = {"a": [0.08, 0.10, 0.12], "b": [0.88, 0.90, 0.92]}
    f = stratified(d)
    assert f["mean"] == pytest.approx(0.5) and f["df"] == 4 and f["n"] == 6
    pooled_var = (2 * 0.02 ** 2 + 2 * 0.02 ** 2) / 4
    se = math.sqrt(pooled_var * (1 / 3 + 1 / 3)) / 2
    assert f["ci95"] == pytest.approx(t95(4) * se)
    assert f["detectable"] == pytest.approx((t95(4) + t80(4)) * se)
    allu = np.array(d["a"] + d["b"])
    assert f["ci95"] < 0.1 * t95(5) * allu.std(ddof=1) / math.sqrt(6)
    # a fold of one value adds to the mean, not to the variance or df; no finite value: left out
    g = stratified({"a": [0.08, 0.10, 0.12], "b": [0.9], "c": [math.nan]})
    assert g["mean"] == pytest.approx(0.5) and g["df"] == 2
    assert math.isnan(stratified({"a": [1.0], "b": [2.0]})["ci95"])

    levels = {("a", m): 1.0 for m in range(3)} | {("b", m): 2.0 for m in range(3)}
    rows = _rows({"baseline": 0.0}, levels)
    for r in _rows({"skip1": 0.0}, levels):
        r["auc_return"] += d[r["game"]][r["meta_seed"]]
        rows.append(r)
    by = {r["config"]: r for r in summarise(unit_table(rows, ["auc_return"]), ["skip1", "baseline"], ["auc_return"])}
    assert by["skip1"]["d_auc_return_vs_fresh_fixed_mean"] == pytest.approx(0.5)
    assert by["skip1"]["d_auc_return_vs_fresh_fixed_ci95"] == pytest.approx(f["ci95"])
    assert by["skip1"]["d_auc_return_vs_fresh_ci95"] > 5 * by["skip1"]["d_auc_return_vs_fresh_fixed_ci95"]


def test_training_table_reads_the_normalised_rate_of_every_game():
    from metarl.experiments.folds import training_by_config, training_table
    rows = [{"config": "skip1", "game": g, "fold": "c", "meta_seed": m, "env_steps_per_game": 10.0,
             "final": math.nan if g == "b" else 2.0, "rate_last": rate, "adaptation_gain": 0.0,
             "n_rate_last": (rate - REFS[g]["random_reward_rate"])
             / (REFS[g]["scratch_final_rate"] - REFS[g]["random_reward_rate"])}
            for m in range(2) for g, rate in (("a", 0.05 + 0.01 * m), ("b", 0.03))]
    table = {r["game"]: r for r in training_table(rows)}
    assert table["b"]["final"] == "n/a"  # no episode ended: the return is missing, the rate is not
    assert table["b"]["n_rate_last_mean"] == pytest.approx(0.5)
    assert table["a"]["n_rate_last_mean"] == pytest.approx(0.55)
    (avg,) = training_by_config(list(table.values()))
    assert avg["games"] == 2 and avg["n_rate_last_mean"] == pytest.approx(0.525)


def test_units_for_a_planned_detectable_size():
    from metarl.core.stats import units_for
    n = units_for(0.3, 0.15)
    assert (t95(int(n) - 1) + t80(int(n) - 1)) * 0.3 / math.sqrt(n) <= 0.15  # n reaches it
    assert (t95(int(n) - 2) + t80(int(n) - 2)) * 0.3 / math.sqrt(n - 1) > 0.15  # n - 1 does not
    assert units_for(0.3, 0.15, strata=5) % 5 == 0 and units_for(0.3, 0.15, strata=5) >= n
    assert math.isnan(units_for(math.nan, 0.15)) and units_for(100.0, 0.15) == math.inf
