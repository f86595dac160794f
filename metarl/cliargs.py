"""What every `metarl` subcommand shares: the config flags, the cluster/logging flags, and the
errors the CLI turns into one line and exit code 2. Subcommand modules import this module, never
metarl.cli (which imports them), so the command modules form no import cycle."""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from metarl import config as config_mod
from metarl.checkpoint import CheckpointError, RunDirError

USAGE_ERRORS: tuple[type[BaseException], ...] = (config_mod.ConfigError, CheckpointError, RunDirError)
"""Bad input: printed as `metarl: error: ...`, exit code 2."""


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (configs/*.yaml); flags below override it")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set meta.inner_lr=0.05 (repeatable)")
    p.add_argument("--seed", type=int, help="meta.seed")


def add_cluster_args(p: argparse.ArgumentParser, local_help: str, progress: bool = False) -> None:
    """--local, --address, --wandb (and --no-progress): where the actors run and where logs go."""
    p.add_argument("--local", action="store_true", help=local_help)
    p.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--wandb", choices=config_mod.WANDB_MODES, help="log.wandb_mode")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar or per-iteration lines")


def with_sets(cfg: config_mod.Config, items: list[str]) -> config_mod.Config:
    """`cfg` with each --set section.key=value applied in order (not yet validated)."""
    for item in items:
        if "=" not in item:
            raise config_mod.ConfigError(f"--set {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        cfg = config_mod.override(cfg, key.strip(), value)
    return cfg


def resolve_config(args: argparse.Namespace) -> config_mod.Config:
    """The config file, then --set overrides, then the named flags; validated."""
    cfg = with_sets(config_mod.load(args.config), args.set)
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
