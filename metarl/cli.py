"""The `metarl` command. Bad input gets one line on stderr and exit code 2, never a traceback.

`run` is defined here; every other subcommand's parser and handler live in its module (which
imports metarl.cliargs for the shared flags, never this module)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metarl.tools import bench
from metarl.core import config as config_mod
from metarl.experiments import curves, dashboard, evaluate, fewshot_cli, probe, references, sweep, training
from metarl.interop import rllib_cli
from metarl.cliargs import (USAGE_ERRORS, Parser, add_cluster_args, add_config_args, add_out_arg, check_cluster_args,
                            claim_out, config_flag, default_out, resolve_config)
from metarl.distributed.run import run
from metarl.distributed.stopping import Stopped, resume_command

SUBCOMMAND_MODULES = (evaluate, sweep, dashboard, bench, fewshot_cli, curves, probe, rllib_cli, training, references)


def cmd_run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(config_mod.describe())
        return 0
    if args.resume and not args.out:
        raise config_mod.ConfigError("--resume needs --out DIR: the run directory to continue")
    if args.out and not args.resume:
        claim_out(args.out, resumable=True)
    cfg = resolve_config(args)
    out = Path(args.out) if args.out else default_out(cfg)
    try:
        summary = run(cfg, out, resume=args.resume, local=args.local)
    except Stopped as e:
        print(f"metarl: {e}\nresume with: {resume_command(str(out), args.argv)}", file=sys.stderr)
        return e.exit_code
    last = summary["last"]
    print(f"done: {summary['iterations']} iterations, {summary['env_steps']:,} env steps, "
          f"{summary['wall_s']:.1f}s in meta-iterations; run directory {summary['run_dir']}"
          + (f"; last R_post {last.get('return/post')}" if last else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="metarl", description="Meta-RL with task skipping on Ray. Common flags keep one meaning "
                                               "across commands (README: Commands and their common flags).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="meta-train theta (FOMAML/MAML/Reptile with task skipping)")
    add_config_args(p)
    config_flag(p, "--workers", "ray.workers", type=int, help="ray.workers: task worker actors (0 = one per task)")
    config_flag(p, "--skip", "meta.skip", type=int, help="meta.skip: task skip count k")
    config_flag(p, "--algo", "meta.algo", choices=config_mod.ALGOS, help="meta.algo")
    config_flag(p, "--iterations", "meta.iterations", type=int, help="meta.iterations: meta-iterations to run")
    add_out_arg(p, "the run", default="runs/<name>-<time>", resumable=True)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add_cluster_args(p, "run every actor in this process, without Ray", progress=True)
    p.add_argument("--help-config", action="store_true", help="print every config key with its doc and exit")
    p.set_defaults(func=cmd_run)
    for mod in SUBCOMMAND_MODULES:
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a resume command repeats
    try:
        check_cluster_args(args)
        return int(args.func(args) or 0)
    except USAGE_ERRORS as e:
        print(f"metarl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metarl: interrupted; resume with --resume --out <run dir>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
