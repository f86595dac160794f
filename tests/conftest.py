"""Shared test set-up: no W&B account, small torch thread pools, paths to the repo's configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def smoke_config_path() -> Path:
    return CONFIGS / "smoke.yaml"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by the tests that need real actors (run() reuses it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def own_ray():
    """A Ray instance of the module's own (address="local"): never one another process started;
    the session's, if a test before started it."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PER_ROLLOUT = 4 * 16  # smoke config: num_envs x rollout_len


def smoke(**overrides):
    """configs/smoke.yaml with W&B off, no progress lines, and `section.key=value` overrides."""
    from metarl.core import config as config_mod

    cfg = config_mod.load(CONFIGS / "smoke.yaml")
    for k, v in {"log.wandb_mode": "disabled", "log.progress": False, **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def assert_png(path) -> None:
    """A real PNG with axes, lines and text, not an empty canvas."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))


def one_update(task, model, theta, batch, learner):
    """One fine-tuning update of `learner` from theta on `batch` (the code path of metarl eval):
    the loss on that batch before and after, and the updated parameters."""
    import torch

    from metarl.experiments.finetune import make_optimizer, update

    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    with torch.no_grad():
        before = float(task.loss(model, params, batch)[0])
    grads, _, _ = task.grad(model, params, batch)
    update(params, grads, learner, make_optimizer(params, learner))
    with torch.no_grad():
        after = float(task.loss(model, params, batch)[0])
    return before, after, params
