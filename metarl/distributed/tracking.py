"""Logging in one place: metrics.jsonl, W&B (offline without an API key) and progress.

Workers and the learner return metric dicts; only the driver calls this module.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def wandb_mode(requested: str) -> str:
    """auto -> WANDB_MODE if set, else online with an API key in the environment, else offline."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class Tracker:
    """Writes one JSON line per record and mirrors numeric scalars to W&B."""

    def __init__(self, run_dir: Path, *, project: str, group: str, name: str, config: dict[str, Any],
                 mode: str, job_type: str = "train", metrics_file: str = "metrics.jsonl",
                 step_key: str = "iteration"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / metrics_file
        self.step_key = step_key
        self.mode = wandb_mode(mode)
        self.wandb_run = None
        if self.mode != "disabled":
            import wandb

            id_file = self.run_dir / f"wandb_id_{job_type}.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            self.wandb_run = wandb.init(
                project=project, group=group, name=name, config=config, job_type=job_type,
                dir=str(self.run_dir), mode=self.mode, id=run_id, resume="allow" if run_id else None,
                settings=wandb.Settings(quiet=True, console="off"),
            )
            id_file.write_text(self.wandb_run.id)
            self.wandb_run.define_metric(step_key)
            self.wandb_run.define_metric("*", step_metric=step_key)

    def log(self, record: dict[str, Any]) -> None:
        record = _clean(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            scalars = {k: (float(v) if isinstance(v, bool) else v) for k, v in record.items()
                       if isinstance(v, (int, float)) and v is not None}
            self.wandb_run.log(scalars)

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))})

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in _clean(values).items():
                self.wandb_run.summary[k] = v

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def progress_line(rec: dict[str, Any], total: int) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"

    return (f"iter {rec['iteration']}/{total} | env steps {rec['env_steps/total']:,} | "
            f"R_pre {f(rec.get('return/pre'))} | R_post {f(rec.get('return/post'))} | "
            f"{rec['time/iteration_s']:.1f}s/it" + (" | UPDATE SKIPPED" if rec.get("update_skipped") else ""))


class Progress:
    """A tqdm bar on a terminal; one plain line per iteration otherwise (job logs, CI)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr)

    def update(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(progress_line(rec, self.total).split(" | ", 1)[1])
            self.bar.update(1)
        else:
            print(progress_line(rec, self.total), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
