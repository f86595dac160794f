"""The joint pre-training baseline of `metarl fewshot`: one network trained on every training task
at once, no adaptation (the MAML paper's "pretrained" comparison)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from metarl.core import checkpoint, config as config_mod
from metarl.core.config import Config
from metarl.distributed.learner import initial_params
from metarl.core.policy import ParamSpec
from metarl.distributed.run import prepare_run_dir
from metarl.core.seeds import iteration_seed, task_seed
from metarl.tasks import make_family


def pretrain(cfg: Config, out: Path, iterations: int, lr: float, log=print) -> Path:
    """One network trained on every training task at once (no adaptation): Adam on the mean loss of
    a fresh batch from each task per iteration (with tasks.resample, fresh tasks too, as the
    meta-learners see them). Writes a checkpoint `fewshot eval` reads."""
    prepare_run_dir(out, resume=False)
    family = make_family(cfg)
    model, params = initial_params(family, cfg.meta.seed)
    theta = {k: v.requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    tasks = [family.make_task(n, task_seed(cfg.meta.seed, i)) for i, n in enumerate(cfg.tasks.train)]
    t0 = time.perf_counter()
    for it in range(iterations):
        if cfg.tasks.resample:
            for i, t in enumerate(tasks):
                t.reseed(iteration_seed(task_seed(cfg.meta.seed, i), it), redraw=True)
        losses = [t.loss(model, theta, t.sample(model, theta))[0] for t in tasks]
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % max(iterations // 10, 1) == 0:
            log(f"pretrain {it + 1}/{iterations}: mean loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f}s)")
    flat = torch.from_numpy(ParamSpec.of(model).flatten(theta))
    return checkpoint.save(out, {"theta": flat, "optimizer": opt.state_dict(), "iteration": iterations,
                                 "config": config_mod.to_dict(cfg), "kind": "pretrained"})
