"""Means and 95% intervals, and how the reports print them: the one home of Student's t quantile,
the interval of a mean, NaN-aware means over seeds, and the 'mean ± interval' text of every table
(`metarl eval`, `sweep` and its folds, `fewshot`, `probe`, `curve`, `training`).

The smallest detectable difference uses t quantiles at the same degrees of freedom as the
interval (`detectable`).

An interval is the half-width t(0.975, n - 1) x s / sqrt(n) of the mean of n values (s their
sample standard deviation): over seeds, tasks or training runs, whichever each report names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045)
"""Student's t quantile 0.975 for 1..29 degrees of freedom (1.96 beyond)."""
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
       0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854)
"""Student's t quantile 0.80 for 1..29 degrees of freedom (0.842 beyond): the power term of the
smallest detectable difference."""


def t95(df: int) -> float:
    """Student's t quantile 0.975 for `df` degrees of freedom (the normal's 1.96 past 29)."""
    return T95[df - 1] if 1 <= df <= len(T95) else 1.96


def t80(df: int) -> float:
    """Student's t quantile 0.80 for `df` degrees of freedom (the normal's 0.842 past 29)."""
    return T80[df - 1] if 1 <= df <= len(T80) else 0.842


def detectable(values: Any) -> float:
    """The smallest difference of means a two-sided 5% test on these (paired) differences detects
    with 80% power: (t(0.975, n - 1) + t(0.80, n - 1)) x s / sqrt(n), over the finite values (NaN
    for fewer than two)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan
    return float((t95(x.size - 1) + t80(x.size - 1)) * x.std(ddof=1) / math.sqrt(x.size))


def stratified(groups: dict[Any, Any]) -> dict[str, float]:
    """The mean over strata of each stratum's mean, with the strata fixed (the leave-one-game-out
    folds: these five games, not games drawn at random): its 95% interval and smallest detectable
    difference use the variation within strata only, pooled over them (equal variances assumed),
    with df = values - strata. Strata with no finite value are left out; a stratum of one value
    adds to the mean and nothing to the variance. Returns mean, ci95, detectable (NaN where
    df < 1), df and n (the values used)."""
    xs = [x[np.isfinite(x)] for x in (np.asarray(v, dtype=float) for v in groups.values())]
    xs = [x for x in xs if x.size]
    if not xs:
        return {"mean": math.nan, "ci95": math.nan, "detectable": math.nan, "df": 0, "n": 0, "sd": math.nan}
    k = len(xs)
    mean = float(np.mean([x.mean() for x in xs]))
    df, n = sum(x.size - 1 for x in xs), sum(x.size for x in xs)
    if df < 1:
        return {"mean": mean, "ci95": math.nan, "detectable": math.nan, "df": df, "n": n, "sd": math.nan}
    pooled_var = sum(((x - x.mean()) ** 2).sum() for x in xs) / df
    se = math.sqrt(pooled_var * sum(1.0 / x.size for x in xs)) / k
    return {"mean": mean, "ci95": t95(df) * se, "detectable": (t95(df) + t80(df)) * se, "df": df, "n": n,
            "sd": math.sqrt(pooled_var)}


def units_for(sd: float, target: float, strata: int = 1, most: int = 10_000) -> float:
    """The fewest units (a multiple of `strata`, df = units - strata) whose smallest detectable
    difference, (t(0.975, df) + t(0.80, df)) x sd / sqrt(units), is at most `target`, for
    differences with standard deviation `sd` between units (within strata when strata > 1, balanced);
    NaN when sd is not finite, inf past `most`. For planning how many replicates a design needs."""
    if not math.isfinite(sd):
        return math.nan
    m = strata * 2
    while m <= most:
        df = m - strata
        if (t95(df) + t80(df)) * sd / math.sqrt(m) <= target:
            return float(m)
        m += strata
    return math.inf


def half_width(values: Any) -> float:
    """Half-width of the 95% interval of the mean of `values` as given (NaN for fewer than two; a
    non-finite value makes it non-finite, as it does their mean)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return math.nan
    return float(t95(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def ci95(values: Any) -> float:
    """Half-width of the 95% interval of the mean of the finite values (NaN for fewer than two)."""
    x = np.asarray(values, dtype=float)
    return half_width(x[np.isfinite(x)])


def nan_stats(values: Any, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sample std, count) over the finite entries; NaN mean where there are none."""
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    n = ok.sum(axis)
    mean = np.where(ok, x, 0.0).sum(axis) / np.maximum(n, 1)
    dev = np.where(ok, x - np.expand_dims(mean, axis), 0.0)
    std = np.sqrt((dev ** 2).sum(axis) / np.maximum(n - 1, 1))
    return np.where(n > 0, mean, math.nan), np.where(n > 0, std, math.nan), n


def pm(mean: float | None, spread: float | None = None, fmt: str = ".2f", spread_fmt: str | None = None) -> str:
    """'mean ± spread' (an interval, or a std where a table says so); the mean alone when the
    spread is missing or not finite; 'n/a' for a missing or non-finite mean."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    shown = spread is not None and math.isfinite(spread)
    return f"{mean:{fmt}}" + (f" ± {spread:{spread_fmt or fmt}}" if shown else "")


def mean_ci(values: list[float], digits: int = 2, unit: str = "run") -> str:
    """'mean ± 95% interval (n units)' over the finite values; one value: 'value (1 unit)'; none: '—'."""
    x = [v for v in values if math.isfinite(v)]
    if not x:
        return "—"
    count = f"({len(x)} {unit}{'s' if len(x) != 1 else ''})"
    return f"{pm(float(np.mean(x)), ci95(x), f'.{digits}f')} {count}"
