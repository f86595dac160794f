"""The `metarl` command. Bad input gets one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path

from metarl import config as config_mod




def _usage_errors() -> tuple[type[BaseException], ...]:
    from metarl.checkpoint import CheckpointError
    from metarl.run import RunDirError

    return (config_mod.ConfigError, CheckpointError, RunDirError)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (configs/*.yaml); flags below override it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set meta.inner_lr=0.05 (repeatable)")
    p.add_argument("--seed", type=int, help="meta.seed")


def resolve_config(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.load(args.config)
    for item in args.set:
        if "=" not in item:
            raise config_mod.ConfigError(f"--set {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        cfg = config_mod.override(cfg, key.strip(), value)
    flag_map = {"workers": "ray.workers", "skip": "meta.skip", "algo": "meta.algo", "iterations": "meta.iterations",
                "seed": "meta.seed", "address": "ray.address"}
    for flag, key in flag_map.items():
        v = getattr(args, flag, None)
        if v is not None:
            cfg = config_mod.override(cfg, key, v)
    if getattr(args, "no_progress", False):
        cfg = config_mod.override(cfg, "log.progress", False)
    if getattr(args, "wandb", None):
        cfg = config_mod.override(cfg, "log.wandb_mode", args.wandb)
    return config_mod.validate(cfg)


def default_out(cfg: config_mod.Config, root: str = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.run_name}-{stamp}"


def cmd_run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(config_mod.describe())
        return 0
    cfg = resolve_config(args)
    if args.resume and not args.out:
        raise config_mod.ConfigError("--resume needs --out DIR: the run directory to continue")
    out = Path(args.out) if args.out else default_out(cfg)
    from metarl.run import run

    summary = run(cfg, out, resume=args.resume, local=args.local)
    last = summary["last"]
    print(f"done: {summary['iterations']} iterations, {summary['env_steps']:,} env steps, "
          f"{summary['wall_s']:.1f}s in meta-iterations; run directory {summary['run_dir']}"
          + (f"; last R_post {last.get('return/post')}" if last else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl", description="Meta-RL with task skipping on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="meta-train theta (FOMAML/MAML/Reptile with task skipping)")
    add_config_args(p)
    p.add_argument("--workers", type=int, help="ray.workers: task worker actors (0 = one per task)")
    p.add_argument("--skip", type=int, help="meta.skip: task skip count k")
    p.add_argument("--algo", choices=config_mod.ALGOS, help="meta.algo")
    p.add_argument("--iterations", type=int, help="meta.iterations")
    p.add_argument("--out", help="run directory (default runs/<name>-<time>); reused only with --resume")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--local", action="store_true", help="run every actor in this process, without Ray")
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--wandb", choices=config_mod.WANDB_MODES, help="log.wandb_mode")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-iteration lines")
    p.add_argument("--help-config", action="store_true", help="print every config key with its doc and exit")
    p.set_defaults(func=cmd_run)

    import importlib

    for extra in ("metarl.evaluate", "metarl.sweep", "metarl.bench", "metarl.fewshot", "metarl.curves",
                  "metarl.rllib_cli"):
        try:
            mod = importlib.import_module(extra)
        except ModuleNotFoundError as e:
            if e.name != extra:  # a real missing dependency inside the module: say so
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _usage_errors() as e:
        print(f"metarl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metarl: interrupted; resume with --resume --out <run dir>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
