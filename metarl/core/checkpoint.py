"""Atomic checkpoints that load without executing pickled code.

A checkpoint is a torch file of tensors and plain values (theta, Adam state, iteration, grouping
RNG state, cumulative counters, the resolved config), written to a temporary file, fsynced and
renamed into place, so a crash mid-write never leaves a half-written checkpoint under the real
name. Loading uses `torch.load(weights_only=True)`, which refuses arbitrary pickled objects;
`load_configured` and `flat_theta` are how every reader of a trained theta (`metarl eval`, `sweep`,
`probe`, `fewshot`, the RLlib export) opens one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.core import config as config_mod

CKPT_RE = re.compile(r"^ckpt_(\d{6})\.pt$")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the CLI prints it as one line and exits 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the CLI prints it as one line and exits 2."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, state: dict[str, Any], keep: int = 3) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"ckpt_{int(state['iteration']):06d}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))


def resolve(path: Path | str) -> Path:
    """A checkpoint file as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if path.is_dir():
        latest_ckpt = latest(path)
        if latest_ckpt is None:
            raise CheckpointError(f"'{path}' holds no checkpoint; pass <run>/checkpoints/ckpt_*.pt")
        return latest_ckpt
    return path


def load(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a file from <run>/checkpoints/")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or carrying pickled code
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable ({first}); delete it to fall back to an earlier one"
        ) from None
    missing = {"theta", "optimizer", "iteration"} - set(state if isinstance(state, dict) else {})
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(sorted(missing))}; it is not a metarl checkpoint")
    return state


def latest(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_configured(path: Path | str) -> tuple[Path, dict[str, Any], config_mod.Config]:
    """A checkpoint file, or a run directory's latest checkpoint: its path, its state, and the
    config it was trained with, validated (every reader of a trained theta starts here)."""
    path = resolve(path)
    state = load(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint '{path}' carries no config; it was not written by metarl run or pretrain")
    return path, state, config_mod.validate(config_mod.from_dict(state["config"]))


def flat_theta(state: dict[str, Any], path: Path, numel: int) -> np.ndarray:
    """A checkpoint's theta as the flat float32 vector a network of `numel` parameters takes."""
    theta = state["theta"].detach().to(torch.float32).numpy()
    if theta.shape != (numel,):
        raise CheckpointError(f"checkpoint '{path}' has {theta.size} parameters, the network {numel}")
    return theta
