"""`metarl dashboard`: the W&B view that compares skip counts, built with W&B's own workspace library
(wandb-workspaces): runs grouped by configuration (skip<k>, joint, <config>-updates, baseline) and fold; returns before and after adaptation against
frames/total; the outer loop's statistics; held-out fine-tuning curves per game; each evaluated
theta's held-out AUC against the frames its meta-training cost.

Every metric a panel shows is named below, in one place, as the code logs it (metarl.distributed.run's rows,
metarl.experiments.evaluate's curves and summary, the eval runs' config that metarl.experiments.sweep fills in). `build` is
a pure function of a `ViewInputs`; `Workspace.save()` is the only online step. Without W&B online
the view goes to `<sweep>/dashboard.json` (build's inputs, and the view as the library would upload
it), and `metarl dashboard --spec <file>` creates it later.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from metarl.core.config import WANDB_MODES, ConfigError
from metarl.distributed.tracking import read_metrics, wandb_mode

GROUP_BY = ("config", "fold")
"""Config keys of every training and evaluation run (metarl.distributed.run, metarl.experiments.sweep) the view groups by."""
STEP = "frames/total"
"""Meta-training rows' x-axis (metarl.distributed.run's step key): emulator frames over the run."""
ADAPTATION = (("return/pre", "return/post"), ("reward_per_step/pre", "reward_per_step/post"))
"""Before (theta) and after (theta') adaptation, over all tasks."""
PER_GAME = ("rate_pre/{game}", "rate_post/{game}")
"""The same per training game, as raw score per agent step (defined even when no episode ended)."""
OUTER = (("loss/inner", "loss/outer"), ("grad/norm",), ("grad/update_norm",), ("theta_norm",), ("outer_lr",),
         ("evaluations_used",), ("time/iteration_s",))
"""The outer loop's statistics every run logs."""
OUTER_FAMILIES = {"outer/": (("outer/approx_kl",), ("outer/clipfrac",), ("outer/pg_loss", "outer/v_loss"),
                             ("outer/entropy",), ("outer/grad_norm_last",), ("outer/steps",)),
                  "trust/": (("trust/kl",), ("trust/step_fraction",), ("trust/surrogate_gain",))}
"""Those of one outer loop (PPO's steps, meta.outer: trpo), shown when the runs logged the prefix."""
EVAL_STEP = "frames"
"""Held-out fine-tuning curves' x-axis (metarl.experiments.evaluate's step key): fine-tuning frames."""
HELDOUT = ("eval/{game}/{init}/return", "eval/{game}/{init}/reward_rate")
INITS = ("meta", "fresh")
"""A meta-trained theta and the un-pretrained network (the sweep's baseline)."""
AUC = ("{game}/meta/auc_return_mean", "{game}/meta/auc_reward_rate_mean")
"""Eval runs' summary: held-out area under the fine-tuning curve of the meta-trained theta."""
COMPUTE = "meta_frames"
"""Eval runs' config: the frames meta-training spent on the theta evaluated."""


@dataclass(frozen=True)
class ViewInputs:
    project: str
    group: str
    """The W&B group (log.experiment) whose runs the view shows; '' for the whole project."""
    train_games: tuple[str, ...]
    heldout_games: tuple[str, ...]
    logged: tuple[str, ...]
    """Metric names the runs logged: they decide which outer-loop family's panels appear."""
    entity: str = ""


def _line(title: str, x: str, ys: Iterable[str]) -> Any:
    import wandb_workspaces.reports.v2 as wr

    return wr.LinePlot(title=title, x=x, y=list(ys), groupby_aggfunc="mean", groupby_rangefunc="stderr")


def build(v: ViewInputs) -> Any:
    """The workspace view (wandb_workspaces.workspaces.Workspace); nothing is sent anywhere."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    training = [_line(f"{a} / {b}", STEP, (a, b)) for a, b in ADAPTATION]
    training += [_line(f"{game}: {', '.join(t.split('/')[0] for t in PER_GAME)}", STEP,
                       [t.format(game=game) for t in PER_GAME]) for game in v.train_games]
    outer = list(OUTER) + [ys for prefix, family in OUTER_FAMILIES.items()
                           if any(k.startswith(prefix) for k in v.logged) for ys in family]
    heldout = [_line(f"{game}: held-out {t.split('/')[-1]}", EVAL_STEP,
                     [t.format(game=game, init=init) for init in INITS]) for game in v.heldout_games for t in HELDOUT]
    heldout += [wr.ScatterPlot(title=f"{game}: {t.split('/')[-1]} vs meta-training frames", x=wr.Config(COMPUTE),
                               y=wr.SummaryMetric(t.format(game=game))) for game in v.heldout_games for t in AUC]
    sections = [ws.Section(name="Meta-training: before and after adaptation", panels=training, is_open=True),
                ws.Section(name="Outer loop", panels=[_line(" / ".join(ys), STEP, ys) for ys in outer], is_open=True),
                ws.Section(name="Held-out games: fine-tuning", panels=heldout, is_open=True)]
    runset = ws.RunsetSettings(groupby=[ws.Config(k) for k in GROUP_BY],
                               filters=ws.And(ws.Metric("Group") == v.group) if v.group else "")
    return ws.Workspace(entity=v.entity, project=v.project, name=f"metarl {v.group or v.project}: by skip",
                        sections=sections, runset_settings=runset, settings=ws.WorkspaceSettings(max_runs=100))


# ------------------------------------------------------------------------------------------
# where the inputs come from: a sweep directory on disk, or the W&B project's runs


def sweep_inputs(sweep_dir: Path) -> ViewInputs:
    """Project, group and games from a sweep directory: its sweep.json, every meta-training run
    (config.yaml beside metrics.jsonl) and every finished evaluation (eval/eval.json)."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"'{sweep_dir}' is not a sweep directory (no sweep.json)")
    log = json.loads(path.read_text())["config"]["log"]
    train, heldout, logged = {}, {}, set()
    for metrics in sorted(Path(sweep_dir).rglob("metrics.jsonl")):
        if ".incomplete-" in str(metrics) or not (metrics.parent / "config.yaml").is_file():
            continue
        train.update(dict.fromkeys(yaml.safe_load((metrics.parent / "config.yaml").read_text())["tasks"]["train"]))
        logged.update(k for row in read_metrics(metrics) for k in row)
    for result in sorted(Path(sweep_dir).rglob("eval/eval.json")):
        if ".incomplete-" not in str(result):
            heldout.update(dict.fromkeys(json.loads(result.read_text())["spec"]["games"]))
            logged.update(k for row in read_metrics(result.parent / "eval_metrics.jsonl") for k in row)
    if not train and not heldout:
        raise ConfigError(f"sweep '{sweep_dir}' holds no meta-training run or finished evaluation yet")
    return ViewInputs(log["wandb_project"], log["experiment"], tuple(train), tuple(heldout), tuple(sorted(logged)))


def api_inputs(api: Any, entity: str, project: str, group: str) -> ViewInputs:
    """The same from the runs W&B holds (wandb.Api): training games of the train runs, held-out
    games of the eval runs, and every name in their summaries."""
    runs = list(api.runs(f"{entity}/{project}", filters={"group": group} if group else {}))
    if not runs:
        raise ConfigError(f"W&B project {entity}/{project} has no runs{f' in group {group}' if group else ''}")
    train, heldout, logged = {}, {}, set()
    for r in runs:
        if r.job_type == "train":
            train.update(dict.fromkeys(r.config.get("tasks", {}).get("train", [])))
        elif r.job_type == "eval":
            heldout.update(dict.fromkeys(r.config.get("eval", {}).get("games", [])))
        logged.update(r.summary.keys())
    return ViewInputs(project, group, tuple(train), tuple(heldout), tuple(sorted(logged)), entity)


# ------------------------------------------------------------------------------------------
# create it online, or write it down


def write_spec(path: Path, v: ViewInputs) -> Path:
    """build's inputs, and the view as the library would upload it: its own pydantic model (the
    library has no public serialiser; `_to_model()` is what `Workspace.save()` sends)."""
    view = build(v)._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)
    path.write_text(json.dumps({"inputs": asdict(v), "view": view}, indent=1) + "\n")
    return path


def read_spec(path: Path) -> ViewInputs:
    try:
        d = json.loads(Path(path).read_text())["inputs"]
        return ViewInputs(**{k: tuple(x) if isinstance(x, list) else x for k, x in d.items()})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--spec '{path}' is not a dashboard.json written by metarl "
                          f"({type(e).__name__}: {e})") from None


def save(v: ViewInputs) -> str:
    """Create the view in W&B (online); its URL."""
    if not v.entity:
        import wandb

        v = replace(v, entity=wandb.Api().default_entity)
    return build(v).save().url


def create_command(path: Path, entity: str) -> str:
    return f"WANDB_API_KEY=... metarl dashboard --spec {path} --entity {entity or 'ENTITY'}"


def written_line(path: Path, mode: str, entity: str) -> str:
    return f"dashboard: W&B is {mode}; view written to {path}; create it with: {create_command(path, entity)}"


def publish(sweep_dir: Path, mode: str, log: Callable[[str], None] = print) -> None:
    """The end of `metarl sweep`: write <sweep>/dashboard.json; online, also create the view. A
    failed upload does not fail the finished sweep: it names the command that creates it later."""
    v = replace(sweep_inputs(sweep_dir), entity=os.environ.get("WANDB_ENTITY", ""))
    path = write_spec(Path(sweep_dir) / "dashboard.json", v)
    if mode != "online":
        log(written_line(path, mode, v.entity))
        return
    try:
        log(f"dashboard: {save(v)}")
    except Exception as e:  # the sweep's results are all written; only the view is missing
        log(f"warning: dashboard not created ({type(e).__name__}: {e}); create it with: "
            f"{create_command(path, v.entity)}")


def cmd_dashboard(args: argparse.Namespace) -> int:
    mode = wandb_mode(args.wandb or "auto")
    entity = args.entity or os.environ.get("WANDB_ENTITY", "")
    if args.sweep and args.spec:
        raise ConfigError("pass --sweep DIR or --spec FILE, not both")
    if not (args.sweep or args.spec or args.project):
        raise ConfigError("pass --project P (the runs W&B holds), --sweep DIR or --spec FILE")
    v = None
    if args.sweep:
        if not Path(args.sweep).is_dir():
            raise ConfigError(f"--sweep '{args.sweep}' is not a directory")
        v = sweep_inputs(Path(args.sweep))
    elif args.spec:
        v = read_spec(Path(args.spec))
    if v is not None:
        v = replace(v, entity=entity or v.entity, project=args.project or v.project,
                    group=v.group if args.group is None else args.group)
    if args.sweep:
        path = write_spec(Path(args.sweep) / "dashboard.json", v)
        if mode != "online":
            print(written_line(path, mode, v.entity))
            return 0
    if mode != "online":
        raise ConfigError(f"creating the view needs W&B online (WANDB_API_KEY), and W&B is {mode}; "
                          f"`metarl dashboard --sweep DIR` writes it to DIR/dashboard.json offline")
    if v is None:
        import wandb

        api = wandb.Api()
        v = api_inputs(api, entity or api.default_entity, args.project, args.group or "")
    print(f"dashboard: {save(v)}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("dashboard", help="the W&B view comparing skip counts (runs grouped by configuration and fold)")
    p.add_argument("--sweep", help="a sweep directory: games and names from its runs (also writes DIR/dashboard.json)")
    p.add_argument("--spec", help="a dashboard.json written offline: create that view now")
    p.add_argument("--project", help="W&B project (default: the sweep's log.wandb_project); alone: read its runs")
    p.add_argument("--entity", help="W&B entity (default: WANDB_ENTITY, else your default entity)")
    p.add_argument("--group", help="W&B group whose runs the view shows (default: the sweep's log.experiment)")
    p.add_argument("--wandb", choices=WANDB_MODES, help="auto (default): online with WANDB_API_KEY, else offline")
    p.set_defaults(func=cmd_dashboard)
