"""The MAML paper's few-shot numbers (sinusoids, 2D navigation): adaptation curves, step-size
tuning and the report. The `metarl fewshot` commands are in metarl.experiments.fewshot_cli; the joint
pre-training baseline in metarl.experiments.pretrain, the cost per meta-iteration in metarl.distributed.profiling.

  metarl fewshot pretrain --config configs/sinusoid.yaml --out DIR    joint training on all tasks
  metarl fewshot eval --checkpoint maml=RUN --checkpoint fomaml=RUN ... --pretrained DIR --out DIR
  metarl fewshot cost --config configs/sinusoid.yaml                  seconds and memory per iteration

`eval` adapts every initialisation with plain SGD on held-out tasks no run trained on (sine-100000...,
goal-100000...): sinusoids with one K-shot support set reused for every step, the MSE measured on
`--query` fresh points; navigation with a fresh rollout per step, the return being that rollout's mean
episode return (as in the paper's Figure 4). Meta-trained checkpoints adapt with the inner_lr they
were trained with for the meta.inner_steps they were trained to take, and after those with
`--later-lr`: the same inner_lr (default), a given step size, or step sizes tuned one step at a
time on validation tasks (the reference code's navigation test halves the step after the first); the pre-trained and random
baselines get one step size for all steps, tuned on separate validation tasks (the paper's
"automatically tuned step size"). Every initialisation sees the same support and query sets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.core import checkpoint, meta
from metarl.core.config import Config, ConfigError
from metarl.distributed.learner import initial_theta
from metarl.core.policy import ParamSpec
from metarl.core.stats import half_width
from metarl.tasks import make_family

PAPER = {  # Finn et al. 2017: Table 2 (sinusoid, K = 5, after 1/5/10 steps) and Figure 4 (2D navigation)
    "sinusoid": {"MAML (paper)": {1: 0.67, 5: 0.38, 10: 0.35}, "pre-trained (paper)": {1: 2.41, 5: 2.23, 10: 2.19}},
    "nav2d": {"MAML (paper)": {0: -40.41, 1: -11.68, 2: -3.33, 3: -3.23}},
}
HELDOUT_FIRST, VALIDATION_FIRST = 100_000, 200_000
LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)


@dataclass(frozen=True)
class Init:
    """One initialisation to adapt from: its label, flat theta, config and inner step size."""

    label: str
    theta: np.ndarray
    cfg: Config
    inner_lr: float | None
    """None: tune it on validation tasks."""


def load_init(label: str, path: str) -> Init:
    """A run directory (its latest checkpoint) or a checkpoint file -> Init."""
    ckpt, state, cfg = checkpoint.load_configured(path)
    theta = checkpoint.flat_theta(state, ckpt, ParamSpec.of(make_family(cfg).make_model()).numel)
    tuned = state.get("kind") == "pretrained"
    return Init(label, theta, cfg, None if tuned else cfg.meta.inner_lr)


def random_init(cfg: Config) -> Init:
    """theta as the Learner initialises it at iteration 0 (seeded by meta.seed)."""
    return Init("random init", initial_theta(make_family(cfg), cfg.meta.seed), cfg, None)


def heldout_names(cfg: Config, first: int, count: int) -> tuple[str, ...]:
    prefix = {"sinusoid": "sine", "nav2d": "goal"}.get(cfg.tasks.family)
    if prefix is None:
        raise ConfigError(f"fewshot covers the sinusoid and nav2d families, not '{cfg.tasks.family}'")
    names = tuple(f"{prefix}-{i}" for i in range(first, first + count))
    clash = set(names) & set(cfg.tasks.train)
    if clash:
        raise ConfigError(f"held-out task {sorted(clash)[0]} is also a training task; train on indices below {first}")
    return names


# ---- adaptation curves ---------------------------------------------------------------------------


def sine_curves(init: Init, names: tuple[str, ...], shots: int, lrs: tuple[float, ...], query: int,
                seed: int) -> np.ndarray:
    """tasks x (steps + 1) query MSE while taking SGD steps (sizes lrs) on one K-shot support set per task."""
    steps = len(lrs)
    family = make_family(init.cfg)
    model = family.make_model()
    theta = ParamSpec.of(model).unflatten(init.theta)
    out = np.zeros((len(names), steps + 1))
    for n, name in enumerate(names):
        task = family.make_task(name, seed + n)
        support, query_set = task.draw(shots), task.draw(query)
        params = theta
        for s in range(steps + 1):
            with torch.no_grad():
                out[n, s] = float(task.loss(model, params, query_set)[0])
            if s < steps:
                grads, _, _ = meta.loss_grad(task, model, params, support)
                params = meta.detached(meta.sgd_step(params, grads, lrs[s]))
    return out


def nav_curves(init: Init, names: tuple[str, ...], lrs: tuple[float, ...], seed: int) -> np.ndarray:
    """tasks x (steps + 1) mean episode return of a fresh rollout before each SGD step (sizes lrs)."""
    steps = len(lrs)
    family = make_family(init.cfg)
    model = family.make_model()
    theta = ParamSpec.of(model).unflatten(init.theta)
    out = np.zeros((len(names), steps + 1))
    for n, name in enumerate(names):
        task = family.make_task(name, seed + n)
        params = theta
        for s in range(steps + 1):
            batch = task.sample(model, params)
            out[n, s] = batch.mean_return
            if s < steps:
                grads, _, _ = meta.loss_grad(task, model, params, batch)
                params = meta.detached(meta.sgd_step(params, grads, lrs[s]))
    return out


def curves(init: Init, names, shots: int, lrs: tuple[float, ...], query: int, seed: int) -> np.ndarray:
    if init.cfg.tasks.family == "sinusoid":
        return sine_curves(init, names, shots, lrs, query, seed)
    return nav_curves(init, names, lrs, seed)


def schedule(first: float, later: tuple[float, ...], trained_steps: int, steps: int) -> tuple[float, ...]:
    """Step sizes for `steps` SGD steps: `first` for the steps the init was meta-trained to take,
    then later[0], later[1], ... (the last one repeated)."""
    return tuple(first if s < trained_steps else later[min(s - trained_steps, len(later) - 1)] for s in range(steps))


def best_on_validation(init: Init, candidates: dict[float, tuple[float, ...]], shots: int, query: int,
                       n_tasks: int) -> float:
    """The candidate whose step-size schedule gives the best mean score after its last step on
    validation tasks (goal-200000..., sine-200000...: neither training nor held-out)."""
    names = heldout_names(init.cfg, VALIDATION_FIRST, n_tasks)
    sign = 1.0 if init.cfg.tasks.family == "sinusoid" else -1.0  # minimise MSE, maximise return
    scores = {key: sign * float(np.mean(curves(init, names, shots, lrs, query, seed=7)[:, -1]))
              for key, lrs in candidates.items()}
    scores = {key: v for key, v in scores.items() if np.isfinite(v)}
    return min(scores, key=scores.get)


def tune_inner_lr(init: Init, shots: int, steps: int, query: int, n_tasks: int) -> float:
    """The grid step size (the same for every step) best after `steps` steps on validation tasks."""
    return best_on_validation(init, {lr: (lr,) * steps for lr in LR_GRID}, shots, query, n_tasks)


def tune_later_lr(init: Init, alpha: float, trained: int, shots: int, steps: int, query: int,
                  n_tasks: int) -> tuple[float, ...]:
    """The step sizes after the first `trained` steps (those take alpha), chosen one step at a time
    on validation tasks from alpha, alpha/2, ..., alpha/128 (the reference code's navigation test
    halves alpha after the first step)."""
    grid = [alpha / 2 ** k for k in range(8)]
    later: tuple[float, ...] = ()
    for s in range(trained, steps):
        later += (best_on_validation(init, {lr: schedule(alpha, later + (lr,), trained, s + 1) for lr in grid},
                                     shots, query, n_tasks),)
    return later or (alpha,)


def evaluate(inits: list[Init], n_tasks: int, shots: tuple[int, ...], steps: tuple[int, ...], query: int,
             log=print, later_lr: str = "same") -> dict[str, Any]:
    """Mean and 95% interval of the score after each of `steps` for every init and K. later_lr:
    a meta-trained init's step sizes after the steps it was trained for: same (its inner_lr), tune
    (on validation tasks, one step at a time) or a number. Baselines get one tuned size for all steps."""
    family = inits[0].cfg.tasks.family
    if any(i.cfg.tasks.family != family for i in inits):
        raise ConfigError("every --checkpoint must come from the same task family")
    names = heldout_names(inits[0].cfg, HELDOUT_FIRST, n_tasks)
    shots = shots if family == "sinusoid" else (0,)
    rows = []
    for init in inits:
        for k in shots:
            t0 = time.perf_counter()
            if init.inner_lr is None:  # a baseline: one step size, tuned for all steps
                lr = tune_inner_lr(init, k, max(steps), query, 25)
                later, trained = (lr,), max(steps)
            else:
                lr, trained = init.inner_lr, init.cfg.meta.inner_steps
                if later_lr == "tune":
                    later = tune_later_lr(init, lr, trained, k, max(steps), query, 25)
                else:
                    later = (lr if later_lr == "same" else float(later_lr),)
            c = curves(init, names, k, schedule(lr, later, trained, max(steps)), query, seed=1)
            row = {"init": init.label, "K": k if family == "sinusoid" else None, "inner_lr": lr, "later_lr": list(later),
                   "later_from_step": trained + 1, "tasks": len(names),
                   "mean": {s: float(c[:, s].mean()) for s in steps},
                   "ci95": {s: half_width(c[:, s]) for s in steps},
                   # a non-finite score counts as the worst one, so the median stays defined
                   "median": {s: float(np.median(np.where(np.isfinite(c[:, s]), c[:, s],
                                                          np.inf if family == "sinusoid" else -np.inf)))
                              for s in steps},
                   "diverged": {s: int(diverged(c, family)[:, s].sum()) for s in steps}}
            rows.append(row)
            log(f"{init.label:>16} K={k}: " + " ".join(f"{s}:{row['mean'][s]:.3f}" for s in steps)
                + f"  (alpha {alpha_text(row)}, {time.perf_counter() - t0:.0f}s)")
    return {"family": family, "steps": list(steps), "shots": list(shots), "tasks": list(names[:3]) + ["..."],
            "query_points": query if family == "sinusoid" else None, "rows": rows, "paper": PAPER[family]}


def over_training_runs(rows: list[dict[str, Any]], groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per group of training runs (--checkpoint LABEL=RUN1,RUN2,...): per step and K, the
    mean over runs of each run's task mean, and the 95% t-interval of that mean over runs (what a
    reader can expect from a new training run on another machine, not one run's draw); the median
    over runs of each run's task median; diverged tasks summed over runs."""
    out = []
    for label, members in groups.items():
        for k in dict.fromkeys(r["K"] for r in rows if r["init"] in members):
            mine = [r for r in rows if r["init"] in members and r["K"] == k]
            n, steps = len(mine), list(mine[0]["mean"])
            means = {s: np.array([r["mean"][s] for r in mine]) for s in steps}
            out.append({**{key: mine[0][key] for key in ("K", "inner_lr", "later_lr", "later_from_step", "tasks")},
                        "init": f"{label}: mean of {n} training runs",
                        **({} if len({tuple(r["later_lr"]) for r in mine}) == 1 else
                           {"later_lr": [], "alpha_note": "later steps tuned per run"}),
                        "mean": {s: float(means[s].mean()) for s in steps},
                        "ci95": {s: half_width(means[s]) for s in steps},
                        # robust: the median over runs of each run's median over tasks
                        "median": {s: float(np.median([r.get("median", r["mean"])[s] for r in mine])) for s in steps},
                        "diverged": {s: int(sum(r.get("diverged", {}).get(s, 0) for r in mine)) for s in steps},
                        "runs": n})
    return out


EXPLODED = 1000.0
"""A sinusoid adaptation has diverged once its query MSE exceeds EXPLODED x its MSE before adapting."""


def diverged(c: np.ndarray, family: str) -> np.ndarray:
    """tasks x (steps + 1): True where the score is non-finite or (sinusoid) has exploded; once
    diverged, a task counts as diverged at every later step."""
    bad = ~np.isfinite(c)
    if family == "sinusoid":
        with np.errstate(invalid="ignore"):
            bad |= c > EXPLODED * c[:, :1]
    return np.maximum.accumulate(bad, axis=1)


def alpha_text(row: dict[str, Any]) -> str:
    """`0.5`, or `0.5, then 0.1, 0.05 from step 2`."""
    if row.get("alpha_note"):
        return f"{row['inner_lr']:g}, {row['alpha_note']}"
    later = row.get("later_lr", [row["inner_lr"]])
    if all(x == row["inner_lr"] for x in later):
        return f"{row['inner_lr']:g}"
    return f"{row['inner_lr']:g}, then {', '.join(f'{x:g}' for x in later)} from step {row['later_from_step']}"


def markdown(result: dict[str, Any]) -> str:
    steps, fam = result["steps"], result["family"]
    metric = "query MSE (lower is better)" if fam == "sinusoid" else "mean return (higher is better)"
    head = "| init | K | alpha | " + " | ".join(f"{s} steps" for s in steps) + " |"
    lines = [f"{fam}: {metric} on {result['rows'][0]['tasks']} held-out tasks, mean ± 95% CI [median; tasks "
             f"diverged: non-finite{' or MSE > ' + format(EXPLODED, 'g') + 'x its value before adapting' if fam == 'sinusoid' else ''}]",
             "", head, "|" + " --- |" * (len(steps) + 3)]
    for r in result["rows"]:
        def cell(s: int) -> str:
            extra = f"{r['median'][s]:.3f}" if "median" in r else ""
            if r.get("diverged", {}).get(s):
                extra += f"; {r['diverged'][s]} diverged"
            return f"{r['mean'][s]:.3f} ± {r['ci95'][s]:.3f}" + (f" [{extra}]" if extra else "")
        cells = " | ".join(cell(s) for s in steps)
        lines.append(f"| {r['init']} | {r['K'] if r['K'] is not None else '-'} | {alpha_text(r)} | {cells} |")
    for label, vals in result["paper"].items():
        k = "5" if fam == "sinusoid" else "-"
        lines.append(f"| {label} | {k} | | " + " | ".join(f"{vals[s]:.2f}" if s in vals else "" for s in steps) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted({r["K"] for r in result["rows"]}, key=lambda k: -1 if k is None else k)
    fig = Figure(figsize=(5.5 * len(groups), 4))
    FigureCanvasAgg(fig)
    for n, k in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), n + 1)
        for r in (r for r in result["rows"] if r["K"] == k):
            xs = result["steps"]
            ax.errorbar(xs, [r["mean"][s] for s in xs], yerr=[r["ci95"][s] for s in xs], marker="o",
                        capsize=3, label=f"{r['init']} (α={alpha_text(r)})")
        for label, vals in result["paper"].items():
            if k in (5, None):
                ax.plot(list(vals), list(vals.values()), ls="--", marker="x", label=label)
        ax.set_xticks(result["steps"])
        ax.set_xlabel("gradient steps on the held-out task")
        ax.set_ylabel("query MSE" if result["family"] == "sinusoid" else "mean return")
        ax.set_title(f"{result['family']}" + (f", K = {k}" if k is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "fewshot.md", out / "fewshot.json", out / "fewshot.png"]
    paths[0].write_text(markdown(result))
    paths[1].write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, paths[2])
    return paths
