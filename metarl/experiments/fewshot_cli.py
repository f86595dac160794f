"""`metarl fewshot`: the commands (eval, pretrain, cost) over metarl.experiments.fewshot, metarl.experiments.pretrain and
metarl.distributed.profiling.

  metarl fewshot pretrain --config configs/sinusoid.yaml --out DIR    joint training on all tasks
  metarl fewshot eval --checkpoint maml=RUN --checkpoint fomaml=RUN --pretrained DIR --out DIR
  metarl fewshot cost --config configs/sinusoid.yaml                  seconds and memory per iteration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from metarl.core import config as config_mod
from metarl.cliargs import add_config_args, add_out_arg, add_set_args, claim_out, resolve_config, retire
from metarl.core.config import ConfigError
from metarl.experiments.fewshot import evaluate, load_init, markdown, over_training_runs, random_init, write_report
from metarl.experiments.pretrain import pretrain
from metarl.distributed.profiling import cost


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"'{text}' must be comma-separated integers, e.g. 0,1,5,10") from None
    if not vals or min(vals) < 0:
        raise ConfigError(f"'{text}' must list non-negative integers")
    return vals


def cmd_eval(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    inits, groups = [], {}
    for item in args.checkpoint:
        if "=" not in item:
            raise ConfigError(f"--checkpoint {item!r} must look like LABEL=RUN_DIR_OR_FILE, e.g. maml=runs/sine-maml")
        label, paths = item.split("=", 1)
        paths = [p for p in paths.split(",") if p]
        if len(paths) == 1:
            inits.append(load_init(label, paths[0]))
            continue
        groups[label] = [f"{label} [{Path(p).name}]" for p in paths]  # one training run per path
        inits += [load_init(name, p) for name, p in zip(groups[label], paths)]
    if args.pretrained:
        inits.append(load_init("pre-trained", args.pretrained))
    if not inits:
        raise ConfigError("fewshot eval needs at least one --checkpoint LABEL=DIR or --pretrained DIR")
    inits = [dataclasses.replace(i, cfg=resolve_config(args, base=i.cfg)) for i in inits]  # --set, --seed
    if not args.no_random:
        inits.append(random_init(inits[0].cfg))
    if args.tasks < 2:
        raise ConfigError(f"--tasks {args.tasks} must be at least 2")
    if getattr(args, "episodes", None) is not None:
        if args.episodes < 2:
            raise ConfigError(f"--episodes {args.episodes} must be at least 2")
        inits = [dataclasses.replace(i, cfg=config_mod.override(i.cfg, "nav2d.episodes", args.episodes)) for i in inits]
    later = getattr(args, "later_lr", "same")
    if later not in ("same", "tune"):
        try:
            if not 0 < float(later) < float("inf"):
                raise ValueError
        except ValueError:
            raise ConfigError(f"--later-lr {later!r} must be same, tune or a positive step size, e.g. 0.1") from None
    result = evaluate(inits, args.tasks, _ints(args.shots), _ints(args.sgd_steps), args.query, later_lr=later)
    result["rows"] += over_training_runs(result["rows"], groups)
    for p in write_report(result, out):
        print(f"wrote {p}")
    print(markdown(result))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    cfg = resolve_config(args)
    if args.iterations < 1 or not args.lr > 0:
        raise ConfigError("--iterations must be >= 1 and --lr positive")
    print(f"wrote {pretrain(cfg, out, args.iterations, args.lr)}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    out = claim_out(args.out) if args.out else None
    cfg = resolve_config(args)
    rows = cost(cfg, args.iterations)
    print(f"\n{cfg.tasks.family}: {cfg.num_tasks} tasks, skip {cfg.meta.skip}, S = {cfg.meta.inner_steps}, --local")
    print("| algo | s / meta-iteration | vs MAML | peak tensor MiB |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['algo']} | {r['seconds']:.3f} | {r['vs_maml']:.2f} | {r['peak_mb']:.2f} |")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("fewshot", help="MAML-paper few-shot results (sinusoid, nav2d) and per-iteration cost")
    sub = p.add_subparsers(dest="fewshot_command", required=True)
    e = sub.add_parser("eval", help="adapt checkpoints on held-out tasks: score after 0..n SGD steps")
    e.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                   help="a run directory or checkpoint file, e.g. maml=runs/sine-maml (repeatable)")
    e.add_argument("--pretrained", help="directory written by `metarl fewshot pretrain`")
    e.add_argument("--no-random", action="store_true", help="leave out the randomly initialised network")
    e.add_argument("--tasks", type=int, default=100, help="held-out tasks (sine-100000..., goal-100000...)")
    e.add_argument("--shots", default="5,10", help="sinusoid K values, comma-separated")
    e.add_argument("--sgd-steps", default="0,1,5,10", metavar="A,B,...",
                   help="report after these numbers of SGD steps (nav2d: e.g. 0,1,2,3)")
    retire(e, "--steps", "now --sgd-steps A,B,... (--steps counts fine-tuning env steps elsewhere)")
    e.add_argument("--query", type=int, default=100, help="sinusoid query points per task for the MSE")
    e.add_argument("--episodes", type=int, default=None,
                   help="nav2d episodes per rollout and step (default: the checkpoint's nav2d.episodes; the paper's test: 40)")
    e.add_argument("--later-lr", default="same", metavar="same|tune|LR",
                   help="meta-trained checkpoints: step size after the meta.inner_steps they were trained for; same = "
                        "their inner_lr, tune = each step's best of alpha/2^k (k = 0..7) on validation tasks, or a number")
    add_set_args(e)
    add_out_arg(e, "fewshot.md, fewshot.json and fewshot.png")
    e.set_defaults(func=cmd_eval)
    t = sub.add_parser("pretrain", help="train one network on all training tasks jointly (the baseline)")
    add_config_args(t)
    t.add_argument("--iterations", type=int, default=2000,
                   help="pre-training iterations, one Adam step each on a fresh batch of every task (default 2000; "
                        "meta.iterations is left as the config has it)")
    t.add_argument("--lr", type=float, default=1e-3, help="the pre-training's Adam step size (default 0.001)")
    add_out_arg(t, "the pre-trained checkpoint (as `metarl run` writes one)")
    t.set_defaults(func=cmd_pretrain)
    c = sub.add_parser("cost", help="seconds and peak memory per meta-iteration: MAML vs FOMAML vs Reptile")
    add_config_args(c)
    c.add_argument("--iterations", type=int, default=5,
                   help="timed meta-iterations per algorithm, median reported (default 5; not meta.iterations)")
    c.add_argument("--out", metavar="DIR", help="also write cost.json to this new directory; refused if it holds files")
    c.set_defaults(func=cmd_cost)
