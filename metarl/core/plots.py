"""Report helpers for `metarl eval` and `metarl sweep`: PNG grids, CSV and Markdown tables, JSON.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global backend
state, no display needed). A panel draws lines with a shaded spread, points with error bars, or
grouped bars over named categories; NaN values leave gaps instead of failing.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KINDS = ("line", "points", "bars", "mixed")


@dataclass
class Series:
    label: str
    x: Sequence[float] | Sequence[str]
    """Numbers for line and points panels; category names for bars."""
    y: Sequence[float]
    spread: Sequence[float] | None = None
    """Half-width of the shaded band (lines) or error bar (points, bars); None draws none."""
    style: str = "line"
    """In a mixed panel: line, points, or dots (small faint markers, e.g. single episodes)."""
    color: str | None = None
    """A matplotlib colour (e.g. "C0"); None takes the next of the cycle."""
    linestyle: str = "-"


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    kind: str = "line"
    """line, points or bars for every series; mixed: each series draws as its own `style`."""
    empty_note: str = "no finite values"
    """Written across the panel when no series has a finite y value."""
    xscale: str = "linear"
    yscale: str = "linear"
    """matplotlib axis scales: linear or log."""


def _finite(values: Sequence[float] | None) -> np.ndarray | None:
    if values is None:
        return None
    return np.array([v if v is not None else math.nan for v in values], dtype=float)


def _draw_line(ax, s: Series) -> None:
    x, y, spread = np.asarray(s.x, dtype=float), _finite(s.y), _finite(s.spread)
    line, = ax.plot(x, y, label=s.label, marker="o" if len(x) <= 12 and s.linestyle == "-" else None, markersize=3,
                    color=s.color, linestyle=s.linestyle)
    if spread is not None:
        ax.fill_between(x, y - spread, y + spread, color=line.get_color(), alpha=0.2, linewidth=0)


def _draw_points(ax, s: Series) -> None:
    x, y, spread = np.asarray(s.x, dtype=float), _finite(s.y), _finite(s.spread)
    ax.errorbar(x, y, yerr=spread, fmt="o", capsize=3, label=s.label)


def _draw_dots(ax, s: Series) -> None:
    ax.scatter(np.asarray(s.x, dtype=float), _finite(s.y), s=4, alpha=0.25, label=s.label, linewidths=0)


_DRAW = {"line": _draw_line, "points": _draw_points, "dots": _draw_dots}


def _draw_bars(ax, series: list[Series]) -> None:
    categories = list(dict.fromkeys(c for s in series for c in s.x))
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        pos = {c: k for k, c in enumerate(categories)}
        x = np.array([pos[c] for c in s.x], dtype=float) - 0.4 + width * (i + 0.5)
        ax.bar(x, _finite(s.y), width, yerr=_finite(s.spread), capsize=3, label=s.label)
    ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)


def steps_label(what: str) -> str:
    """The x-axis of every curve: env steps (agent decisions), the unit every command counts in."""
    return f"{what} env steps (Atari: frames = 4 x env steps)"


def save_grid(path: Path, panels: list[Panel], ncols: int, title: str = "") -> Path:
    """Draw `panels` row by row, `ncols` per row, into one PNG at `path`."""
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("save_grid needs at least one panel")
    bad = [p.kind for p in panels if p.kind not in KINDS]
    if bad:
        raise ValueError(f"unknown panel kind {bad[0]!r}; allowed: {', '.join(KINDS)}")
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        if panel.kind == "bars":
            _draw_bars(ax, panel.series)
        else:
            for s in panel.series:
                _DRAW[s.style if panel.kind == "mixed" else panel.kind](ax, s)
        if not any(np.isfinite(_finite(s.y)).any() for s in panel.series):
            ax.text(0.5, 0.5, panel.empty_note, ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xscale(panel.xscale)
        ax.set_yscale(panel.yscale)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------------
# tables and files


def jsonable(x: Any) -> Any:
    """NaN and infinities become null, so the files are strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader (or a resumed sweep) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=1))
    tmp.replace(path)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows([{k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                      for k, v in r.items()} for r in rows])


def markdown_table(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:
    """A Markdown table of `rows` with `columns` (key -> header); values printed as given."""
    head = "| " + " | ".join(columns.values()) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"
