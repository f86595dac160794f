"""The GPU paths, run where torch sees a CUDA device (skipped elsewhere; the CPU suite runs the same
code with the device string "cpu"): a task worker acting and taking gradients on cuda
(ray.gpus_per_worker > 0), the learner computing gradients from shipped batches on cuda, and the
fine-tuner acting and taking PPO updates on cuda in bf16 (finetune.gpus > 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl.core import config as config_mod
from metarl.experiments.finetune import FineTuneLearner, FineTuner
from metarl.distributed.learner import initial_theta
from metarl.distributed.learner import Learner
from metarl.core.policy import ParamSpec
from metarl.tasks import make_family
from metarl.tasks.base import batch_to_wire
from metarl.distributed.worker import TaskWorker

from conftest import CONFIGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def small(path: str, **overrides) -> config_mod.Config:
    cfg = config_mod.load(CONFIGS / path)
    for k, v in {"env.num_envs": 8, "env.rollout_len": 16, "log.wandb_mode": "disabled", **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return cfg


@pytest.mark.parametrize("path,game", [("atari12.yaml", "pong"), ("minatar.yaml", "breakout")])
def test_worker_on_cuda_matches_the_cpu_worker(path, game):
    """The same adaptation and evaluation on cuda and on the CPU: the batch and θ′ land in float32
    agreement (TF32 off), the actions drawn from the task's CPU generator are the same."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    family = make_family(small(path))
    theta = initial_theta(family, 0)
    out = {}
    for device in ("cpu", "cuda"):
        worker = TaskWorker(family, {game: 3}, inner_lr=0.01, inner_steps=1, device=device)
        theta_prime, stats = worker.adapt(game, theta)
        grad, _ = worker.evaluate(game, theta_prime)
        out[device] = theta_prime, grad
        assert worker.model.trunk[0].weight.device.type == device
    (tp_cpu, g_cpu), (tp_gpu, g_gpu) = out["cpu"], out["cuda"]
    assert np.isfinite(g_gpu).all() and g_gpu.shape == g_cpu.shape
    np.testing.assert_allclose(tp_gpu, tp_cpu, atol=1e-4)
    cos = float(g_cpu @ g_gpu / (np.linalg.norm(g_cpu) * np.linalg.norm(g_gpu)))
    assert cos > 0.99, cos


def test_learner_on_cuda_takes_gradients_from_shipped_batches():
    family = make_family(small("atari12.yaml"))
    learner = Learner(family, 0, outer_lr=1e-4, max_grad_norm=1.0, device="cuda")
    theta = learner.get_theta()
    task = family.make_task("pong", 0)
    model = family.make_model()
    batch = task.sample(model, ParamSpec.of(model).unflatten(theta))
    out = learner.step_on_batches(1, theta, batch_to_wire(batch))
    assert learner.theta.device.type == "cuda" and not out["update_skipped"] and out["update_norm"] > 0
    task.close()


@pytest.mark.parametrize("path,game", [("atari12.yaml", "pong"), ("minatar.yaml", "breakout")])
def test_finetuner_learns_on_cuda_with_ppo_in_bf16(path, game):
    cfg = config_mod.override(small(path), "finetune.gpus", 0.25)
    family = make_family(cfg)
    learner = FineTuneLearner("adam", 2.5e-4, 0.5, epochs=4, minibatches=4, clip=0.1, lr_decay="linear",
                              bf16=True, gpus=cfg.finetune.gpus)
    tuner = FineTuner(family, learner)
    assert next(tuner.model.parameters()).device.type == "cuda" and "on cuda" in learner.label
    trace = tuner.run(game, 0, initial_theta(family, 0), budget=4 * 8 * 16)
    assert trace["env_steps"] == [128, 256, 384, 512] and not trace["diverged"]
    assert all(np.isfinite(trace["loss"]))
    # it learns: the PPO updates on cuda in bf16 lower the loss on the rollout they were made from
    before, after = ppo_loss_before_after(family, tuner.model, learner, game)
    assert after < before, (before, after)


def ppo_loss_before_after(family, model, learner, game):
    """PPO's loss on one whole rollout, before and after the learner's epochs x minibatches updates
    on it (the fine-tuner's code path, its device and autocast)."""
    from metarl.core import meta
    from metarl.experiments.evaluate import make_optimizer, ppo_updates

    task = family.make_task(game, 1)
    try:
        params = meta.detached(ParamSpec.of(model).unflatten(initial_theta(family, 0), device=learner.device),
                               requires_grad=True)
        with torch.autocast(learner.device, dtype=torch.bfloat16, enabled=learner.bf16, cache_enabled=False):
            with torch.no_grad():
                batch = task.sample(model, params)
            adv, ret = task.advantages(batch)
            every = torch.arange(adv.numel(), device=adv.device)
            loss = lambda: float(task.ppo_grad(model, params, batch, adv, ret, every, learner.clip)[1])  # noqa: E731
            before = loss()
            ppo_updates(task, model, params, batch, learner, make_optimizer(params, learner), learner.lr,
                        torch.Generator().manual_seed(0))
            return before, loss()
    finally:
        task.close()


def test_learner_on_cuda_checkpoints_steps_and_resumes():
    """A cuda learner's checkpoint (Learner.state) leaves its Adam moments on cuda, so it keeps
    stepping; a learner restored from the checkpoint takes the same next step."""
    family = make_family(small("minatar.yaml"))
    a = Learner(family, seed=0, outer_lr=1e-3, max_grad_norm=1.0, device="cuda")
    g = np.random.default_rng(0).standard_normal(a.spec.numel).astype(np.float32)
    a.step(1, g)
    state = a.state()
    assert all(v.device.type == "cuda" for s in a.opt.state.values() for v in s.values() if torch.is_tensor(v))
    b = Learner(family, seed=1, outer_lr=1e-3, max_grad_norm=1.0, device="cuda")
    b.load_state(state)
    a.step(1, 0.5 * g)  # crashed with mixed devices when state() replaced the live moments
    b.step(1, 0.5 * g)
    np.testing.assert_allclose(a.get_theta(), b.get_theta(), rtol=0, atol=1e-7)
    assert a.iteration == b.iteration == 2
