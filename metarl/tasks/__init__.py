"""Task families. `make_family(cfg)` builds the one a config names, as metarl.core.families declares it
(its module is imported only then: the optional minatar package loads only for MinAtar runs)."""

from __future__ import annotations

from metarl.core.config import Config
from metarl.core.families import TRAITS
from metarl.tasks.base import Batch, Task, TaskFamily


def make_family(cfg: Config) -> TaskFamily:
    """The task family named by cfg.tasks.family, built from the config sections it takes."""
    if cfg.tasks.family not in TRAITS:
        raise ValueError(f"unknown task family {cfg.tasks.family!r}")
    traits = TRAITS[cfg.tasks.family]
    return traits.family_class()(*(getattr(cfg, s) for s in traits.sections))


__all__ = ["Batch", "Task", "TaskFamily", "make_family"]
