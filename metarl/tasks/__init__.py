"""Task families. `make_family(cfg)` picks the one a config names."""

from __future__ import annotations

from metarl.config import Config
from metarl.tasks.base import Batch, Task, TaskFamily


def make_family(cfg: Config) -> TaskFamily:
    """The task family named by cfg.tasks.family, built from the sections it needs."""
    fam = cfg.tasks.family
    if fam == "atari":
        from metarl.tasks.atari import AtariFamily

        return AtariFamily(cfg.env, cfg.loss)
    if fam == "minatar":
        from metarl.tasks.minatar import MinAtarFamily

        return MinAtarFamily(cfg.env, cfg.minatar, cfg.loss)
    if fam == "sinusoid":
        from metarl.tasks.sinusoid import SinusoidFamily

        return SinusoidFamily(cfg.sinusoid)
    if fam == "nav2d":
        from metarl.tasks.nav2d import Nav2dFamily

        return Nav2dFamily(cfg.nav2d, cfg.loss)
    raise ValueError(f"unknown task family {fam!r}")


__all__ = ["Batch", "Task", "TaskFamily", "make_family"]
