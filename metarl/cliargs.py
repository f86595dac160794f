"""One vocabulary for every `metarl` subcommand (README: "Commands and their common flags").

Every flag that two commands share is added here, so that a name keeps one meaning and one unit
across commands: the config flags (--config or --checkpoint, --set, --seed), the cluster flags
(--local, --address, --wandb), --out with the one overwrite rule, and the evaluation quantities in
env steps (--steps, --at-steps, --seeds). A flag that sets a config key says so where it is added
(`config_flag`); `resolve_config` applies exactly the flags the command's parser declared. An old
spelling whose name or meaning changed is `retire`d: one line naming the new spelling, exit 2.

Subcommand modules import this module, never metarl.cli (which imports them), so the command
modules form no import cycle."""

from __future__ import annotations

import argparse
import datetime as _dt
import math
from pathlib import Path
from typing import Any

from metarl.core import config as config_mod
from metarl.core.checkpoint import CheckpointError, RunDirError

USAGE_ERRORS: tuple[type[BaseException], ...] = (config_mod.ConfigError, CheckpointError, RunDirError)
"""Bad input: printed as `metarl: error: ...`, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse in the CLI's form: a parse error is one line and exit code 2; no abbreviated flags
    (a prefix of a new flag must not stand in for an old spelling)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"metarl: error: {self.prog}: {message} (see {self.prog} --help)\n")


class _Retired(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, now: str = "", nargs: Any = "?", **_: Any):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=nargs, help=argparse.SUPPRESS)
        self.now = now

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        parser.exit(2, f"metarl: error: {parser.prog} {option_string}: {self.now}\n")


def retire(p: argparse.ArgumentParser, flag: str, now: str, switch: bool = False) -> None:
    """`flag` is an old spelling: using it prints one line naming the new one (`now`) and exits 2."""
    p.add_argument(flag, action=_Retired, now=now, nargs=0 if switch else "?")


def config_flag(p: argparse.ArgumentParser, flag: str, key: str, value: Any = None, **kw: Any) -> None:
    """A flag that sets the config key `key` (with `value`: a switch that sets it to that value)."""
    if value is not None:
        p.add_argument(flag, action="store_true", **kw)
    else:
        p.add_argument(flag, **kw)
    dest = flag.lstrip("-").replace("-", "_")
    p.set_defaults(config_flags={**(p.get_default("config_flags") or {}), dest: (key, value)})


def add_config_args(p: argparse.ArgumentParser, source: str = "file") -> None:
    """Where the config comes from, then --set and --seed over it. source: `file` (--config),
    `checkpoint` (--checkpoint, required: its run's config), `either` (--checkpoint or --config)."""
    if source in ("file", "either"):
        p.add_argument("--config", help="YAML config file (configs/*.yaml); --set and the flags below override it")
    if source in ("checkpoint", "either"):
        p.add_argument("--checkpoint", required=source == "checkpoint", metavar="RUN_OR_FILE",
                       help="a checkpoint file, or a run directory (its latest checkpoint); brings its run's config, "
                            "which --set and the flags below override")
    add_set_args(p)


def add_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set meta.inner_lr=0.05 (repeatable)")
    config_flag(p, "--seed", "meta.seed", type=int, metavar="S",
                help="meta.seed: the network's initialisation, the task seeds and the grouping")


def add_cluster_args(p: argparse.ArgumentParser, local_help: str, progress: bool = False) -> None:
    """--local, --address, --wandb (and --no-progress): where the actors run and where logs go."""
    p.add_argument("--local", action="store_true", help=local_help)
    config_flag(p, "--address", "ray.address",
                help="ray.address: the Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray)")
    config_flag(p, "--wandb", "log.wandb_mode", choices=config_mod.WANDB_MODES, help="log.wandb_mode")
    if progress:
        config_flag(p, "--no-progress", "log.progress", value=False,
                    help="log.progress=false: no progress bar or per-iteration lines")


def check_cluster_args(args: argparse.Namespace) -> None:
    """--local and --address exclude each other (checked before a command does anything)."""
    if getattr(args, "local", False) and getattr(args, "address", None):
        raise config_mod.ConfigError("--local runs without a Ray cluster; drop --address (or --local)")


def with_sets(cfg: config_mod.Config, items: list[str]) -> config_mod.Config:
    """`cfg` with each --set section.key=value applied in order (not yet validated)."""
    for item in items:
        if "=" not in item:
            raise config_mod.ConfigError(f"--set {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        cfg = config_mod.override(cfg, key.strip(), value)
    return cfg


def resolve_config(args: argparse.Namespace, base: config_mod.Config | None = None) -> config_mod.Config:
    """The config file (or `base`, a checkpoint's config), then --set, then the flags this command
    declared with `config_flag`; validated."""
    cfg = with_sets(base if base is not None else config_mod.load(args.config), args.set)
    for dest, (key, value) in (getattr(args, "config_flags", None) or {}).items():
        v = getattr(args, dest, None)
        if v is not None and v is not False:
            cfg = config_mod.override(cfg, key, v if value is None else value)
    return config_mod.validate(cfg)


# ------------------------------------------------------------------------------------------
# --out: one overwrite rule for every command that writes results


def add_out_arg(p: argparse.ArgumentParser, what: str, default: str = "", resumable: bool = False) -> None:
    """--out DIR for `what`; required unless the command has a `default`."""
    rule = "refused if it holds files" + (" unless --resume" if resumable else "")
    p.add_argument("--out", required=not default, metavar="DIR",
                   help=f"new directory for {what}" + (f" (default {default})" if default else "") + f"; {rule}")


def claim_out(out: str | Path, resumable: bool = False) -> Path:
    """The overwrite rule: results go to a new or empty directory, nothing is ever overwritten; a
    directory that holds files is refused with how to proceed (--resume where the command can)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        how = "pass --resume to continue it, or a new --out" if resumable else "pass a new --out"
        raise RunDirError(f"'{out}' already exists and is not empty; {how} (nothing was overwritten)")
    return out


def default_out(cfg: config_mod.Config, root: str = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.run_name}-{stamp}"


# ------------------------------------------------------------------------------------------
# evaluation quantities: env steps (frames are shown beside them), seeds


def add_steps_arg(p: argparse.ArgumentParser, help: str, budget_was: str = "", **kw: Any) -> None:
    """--steps N: env steps of fine-tuning (the old --budget is retired with `budget_was`)."""
    p.add_argument("--steps", type=int, metavar="N", help=help, **kw)
    retire(p, "--budget", budget_was or "now --steps N (env steps of fine-tuning)")


def add_at_steps_arg(p: argparse.ArgumentParser, help: str, at_was: str = "", **kw: Any) -> None:
    """--at-steps A,B,...: env steps at which a curve is read (the old --at is retired)."""
    p.add_argument("--at-steps", metavar="A,B,...", help=help, **kw)
    retire(p, "--at", at_was or "now --at-steps A,B,... (env steps, as before)")


def add_finetune_args(p: argparse.ArgumentParser, optimizer: bool = True, workers: bool = True) -> None:
    """The fine-tuner's most used keys as flags (the rest with --set finetune.*), and its actors."""
    if optimizer:
        config_flag(p, "--optimizer", "finetune.optimizer", choices=config_mod.FINETUNE_OPTIMIZERS,
                    help="finetune.optimizer: sgd (the inner loop) or adam")
    config_flag(p, "--lr", "finetune.lr", type=float, help="finetune.lr: the fine-tuner's step size (0: meta.inner_lr)")
    config_flag(p, "--epochs", "finetune.epochs", type=int, help="finetune.epochs: PPO passes over each rollout")
    config_flag(p, "--minibatches", "finetune.minibatches", type=int, help="finetune.minibatches: minibatches per pass")
    if workers:
        p.add_argument("--workers", type=int, default=0,
                       help="fine-tuning actors the command starts (default: one per cluster CPU; --local: one)")


def add_seeds_arg(p: argparse.ArgumentParser, what: str, **kw: Any) -> None:
    p.add_argument("--seeds", type=int, metavar="N", help=f"seeds 0..N-1, each with its own emulator seeds: {what}",
                   **kw)


def env_steps_list(text: str, flag: str = "--at-steps") -> tuple[int, ...]:
    """Comma-separated env-step counts (1e6 and 2.5e6 allowed: whole numbers)."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not (math.isfinite(v) and v == int(v) and v >= 1) for v in values):
        raise config_mod.ConfigError(f"{flag} {text!r} must be env-step counts separated by commas, e.g. 625000,2.5e6")
    return tuple(int(v) for v in values)
