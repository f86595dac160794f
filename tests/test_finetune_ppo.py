"""The fine-tuner's PPO updates (finetune.epochs / minibatches / clip / lr_decay / bf16) on MinAtar:
the direction of an update, that every minibatch sees the weights the previous one left (also
under bf16 autocast), a budget run through `metarl learn`, and the config's one-line errors."""

from __future__ import annotations

import csv

import pytest
import torch

from metarl.core import config as config_mod, meta
from metarl.cli import main
from metarl.experiments.finetune import FineTuneLearner, finetune, make_optimizer, ppo_updates
from metarl.core.policy import init_params
from metarl.tasks import make_family

from conftest import CONFIGS

pytest.importorskip("minatar")


def minatar(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    for k, v in {"env.num_envs": 16, "env.rollout_len": 32, "log.wandb_mode": "disabled", **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def rewarded_batch(task, model, theta):
    for _ in range(3):  # let a few episodes end so that the batch carries rewards
        batch = task.sample(model, theta)
    assert float(batch.data["rewards"].sum()) > 0
    return batch


def test_ppo_update_favours_advantaged_actions_and_every_minibatch_sees_the_last_ones_weights():
    """With the policy term alone, 4 epochs x 4 minibatches raise the advantage-weighted
    log-probability of the actions taken, and the later minibatches measure a ratio away from 1
    (approx KL > 0): the weights moved between them. Under bf16 autocast too, where a weight cache
    would hold the first minibatch's weights (ratio stuck at 1, KL exactly 0)."""
    cfg = minatar(**{"loss.vf_coef": 0.0, "loss.ent_coef": 0.0})
    family = make_family(cfg)
    model = family.make_model()
    task = family.make_task("breakout", 1)
    theta0 = init_params(model)
    batch = rewarded_batch(task, model, theta0)
    adv, _ = task.advantages(batch)
    adv = ((adv - adv.mean()) / (adv.std() + 1e-8)).flatten()
    d = batch.data

    def weighted_logp(params):
        with torch.no_grad():
            logits, _ = torch.func.functional_call(model, params, (d["obs"][:-1].flatten(0, 1),))
            logp = torch.log_softmax(logits, -1).gather(1, d["actions"].reshape(-1, 1)).squeeze(1)
        return float((adv * logp).mean())

    assert torch.allclose(d["logp"].flatten(), torch.log_softmax(
        torch.func.functional_call(model, theta0, (d["obs"][:-1].flatten(0, 1),))[0].detach(), -1
    ).gather(1, d["actions"].reshape(-1, 1)).squeeze(1), atol=1e-5)  # the sampler recorded log pi_old(a|s)
    losses = {}
    for bf16 in (False, True):
        learner = FineTuneLearner("adam", 1e-4, 0.5, epochs=4, minibatches=4, clip=0.1, bf16=bf16)
        params = meta.detached(theta0, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss, stats = ppo_updates(task, model, params, batch, learner, make_optimizer(params, learner),
                                      learner.lr, torch.Generator().manual_seed(0))
        assert weighted_logp(params) > weighted_logp(theta0), bf16
        assert stats["approx_kl"] > 0, bf16
        assert 0.0 <= stats["clipfrac"] <= 1.0
        losses[bf16] = loss
    assert abs(losses[True] - losses[False]) < 0.05 * abs(losses[False]) + 1e-3


def test_a_ppo_budget_run_anneals_the_step_size_and_reports_kl(monkeypatch):
    cfg = minatar(**{"env.num_envs": 8, "env.rollout_len": 16})
    family = make_family(cfg)
    model = family.make_model()
    theta = init_params(model)
    seen = []
    real_update = ppo_updates

    def spy(task, model, params, batch, learner, opt, lr, gen):
        seen.append((lr, opt.param_groups[0]["lr"]))
        return real_update(task, model, params, batch, learner, opt, lr, gen)

    monkeypatch.setattr("metarl.experiments.finetune.ppo_updates", spy)
    lines: list[str] = []
    learner = FineTuneLearner("adam", 1e-3, 0.5, epochs=2, minibatches=2, clip=0.2, lr_decay="linear", bf16=True)
    trace, after = finetune(family.make_task("space_invaders", 0), model, theta, learner, budget=512,
                            progress=lines.append, progress_every_s=0.0)
    assert trace["env_steps"] == [128, 256, 384, 512] and not trace["diverged"]
    assert all(torch.isfinite(torch.tensor(trace["loss"])))
    assert [lr for lr, _ in seen] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # linear to 0 over the budget
    assert all(lr == opt_lr for lr, opt_lr in seen)
    assert "approx KL" in lines[-1]
    assert any(not torch.equal(after[k], theta[k]) for k in theta)


def test_learn_runs_ppo_and_rejects_bad_ppo_settings(tmp_path, capsys):
    base = ["learn", "--config", str(CONFIGS / "minatar.yaml"), "--set", "log.wandb_mode=disabled",
            "--set", "env.num_envs=4", "--games", "breakout", "--seeds", "1", "--local"]
    ppo = ["--set", "finetune.epochs=2", "--set", "finetune.minibatches=4", "--set", "finetune.rollout_len=8",
           "--set", "finetune.clip=0.1"]
    out = tmp_path / "ppo"
    assert main([*base, *ppo, "--steps", "96", "--points", "3", "--out", str(out)]) == 0
    assert "PPO 2 epochs x 4 minibatches, clip 0.1" in capsys.readouterr().out
    assert [int(r["env_steps"]) for r in csv.DictReader(open(out / "eval_curves.csv"))] == [32, 64, 96]
    for setting, message in (("finetune.epochs=0", "finetune.epochs and finetune.minibatches must be >= 1"),
                             ("finetune.minibatches=64", "exceeds the rollout's 32 samples"),
                             ("finetune.clip=0", "finetune.clip = 0.0 must be > 0"),
                             ("finetune.lr_decay=fast", "finetune.lr_decay 'fast' is unknown")):
        target = tmp_path / setting.split("=")[0]
        assert main([*base, *ppo, "--set", setting, "--steps", "96", "--out", str(target)]) == 2, setting
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (setting, err)
        assert not target.exists()


def test_ppo_needs_a_rollout_family():
    cfg = config_mod.override(config_mod.load(CONFIGS / "sinusoid.yaml"), "finetune.epochs", 4)
    with pytest.raises(config_mod.ConfigError, match="need a rollout family"):
        config_mod.validate(cfg)


def test_a_gpu_finetuner_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    base = ["learn", "--config", str(CONFIGS / "minatar.yaml"), "--set", "log.wandb_mode=disabled",
            "--games", "breakout", "--steps", "64", "--seeds", "1", "--local"]
    assert main([*base, "--set", "finetune.gpus=-1", "--out", str(tmp_path / "a")]) == 2
    assert "finetune.gpus = -1.0 must be >= 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--set", "finetune.gpus=0.25", "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert "torch sees no CUDA device" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "b").exists()
