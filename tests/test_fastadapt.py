"""Fast adaptation (metarl.experiments.fastadapt) on real MinAtar tasks: its step accounting, that 0
updates measures theta itself, that one update is meta.adapt's inner step (plain and PPO's), that
alpha = 0 never moves the policy, divergence, and the same numbers from Ray actors as in this process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarl.core import config as config_mod, meta
from metarl.core.meta import InnerPPO
from metarl.core.policy import ParamSpec
from metarl.core.seeds import task_seed
from metarl.distributed.learner import initial_theta
from metarl.experiments.fastadapt import MEASURED, fast_adapt, run_fast_jobs
from metarl.tasks import make_family

from conftest import CONFIGS

pytest.importorskip("minatar")

B, T = 4, 8
TB = B * T


def minatar(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    for k, v in {"env.num_envs": B, "env.rollout_len": T, "log.wandb_mode": "disabled", **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


@pytest.fixture(scope="module")
def setting():
    torch.set_num_threads(1)  # as the actors run (FastAdapter); a busy machine makes thread pools crawl
    family = make_family(minatar())
    model = family.make_model()
    return family, model, ParamSpec.of(model).unflatten(initial_theta(family, 0))


def measured(task, model, params, rollouts: int) -> tuple[float, float, int]:
    """Reward rate, mean return and episodes of `rollouts` fresh rollouts with `params` (by hand)."""
    with torch.no_grad():
        batches = [task.sample(model, params) for _ in range(rollouts)]
    returns = [r for b in batches for r in b.episode_returns]
    return (sum(b.reward_sum for b in batches) / (rollouts * TB), float(np.mean(returns)) if returns else math.nan,
            len(returns))


def test_env_steps_count_every_evaluation_and_every_update(setting):
    family, model, theta = setting
    out = fast_adapt(family.make_task("breakout", 3), model, theta, 0.1, None, updates=(1, 3), eval_rollouts=2)
    # 2 evaluation rollouts per point; 1, then 2 more adaptation rollouts
    assert out["updates"] == [0, 1, 3]
    assert out["env_steps"] == [2 * TB, 4 * TB + TB, 6 * TB + 3 * TB]
    assert all(len(out[k]) == 3 for k in MEASURED) and not out["diverged"] and out["seconds"] > 0
    assert all(isinstance(n, int) for n in out["episodes"]) and sum(out["episodes"]) > 0


def test_zero_updates_measures_theta_and_one_update_is_the_workers_inner_step(setting):
    """Replayed by hand on a task of the same seed: rollouts with theta, one `meta.adapt` step, rollouts
    with its theta'. A large alpha so that theta' plays differently; 0 updates does not depend on alpha."""
    family, model, theta = setting
    out = fast_adapt(family.make_task("breakout", 3), model, theta, 5.0, None, updates=(1,), eval_rollouts=3)
    again = fast_adapt(family.make_task("breakout", 3), model, theta, 0.01, None, updates=(1,), eval_rollouts=3)
    assert (out["reward_rate"][0], out["episodes"][0]) == (again["reward_rate"][0], again["episodes"][0])
    task = family.make_task("breakout", 3)
    rate0, return0, episodes0 = measured(task, model, theta, 3)
    theta_prime = meta.adapt(task, model, theta, 5.0, 1).theta_prime
    rate1, return1, episodes1 = measured(task, model, theta_prime, 3)
    assert out["reward_rate"] == [rate0, rate1]
    np.testing.assert_array_equal(out["return"], [return0, return1])
    assert out["episodes"] == [episodes0, episodes1]
    moved = math.sqrt(sum(float(((theta_prime[k] - theta[k]).double() ** 2).sum()) for k in theta))
    assert out["theta_distance"] == [0.0, pytest.approx(moved)] and moved > 1.0


def test_ppo_inner_updates_are_the_workers_too(setting):
    family, model, theta = setting
    inner = InnerPPO(2, 2, 0.2)
    out = fast_adapt(family.make_task("asterix", 5), model, theta, 0.5, inner, updates=(2,), eval_rollouts=1)
    task = family.make_task("asterix", 5)
    rate0, _, _ = measured(task, model, theta, 1)
    params = meta.adapt(task, model, theta, 0.5, 1, inner).theta_prime
    params = meta.adapt(task, model, params, 0.5, 1, inner).theta_prime
    rate2, _, episodes2 = measured(task, model, params, 1)
    assert out["reward_rate"] == [rate0, rate2] and out["episodes"][1] == episodes2
    assert out["theta_distance"][1] == pytest.approx(math.sqrt(sum(float(((params[k] - theta[k]).double() ** 2).sum())
                                                                   for k in theta)))


def test_alpha_zero_measures_theta_at_every_point(setting):
    """With alpha = 0 every rollout, evaluation or adaptation, is played by theta: the measurements
    are slices of one stream of rollouts with theta (2 evaluation, 1 update, 2, 2 updates, 2)."""
    family, model, theta = setting
    out = fast_adapt(family.make_task("space_invaders", 9), model, theta, 0.0, None, updates=(1, 3), eval_rollouts=2)
    assert out["theta_distance"] == [0.0, 0.0, 0.0]
    task = family.make_task("space_invaders", 9)
    with torch.no_grad():
        stream = [task.sample(model, theta) for _ in range(2 + 1 + 2 + 2 + 2)]
    rate = lambda bs: sum(b.reward_sum for b in bs) / (len(bs) * TB)  # noqa: E731
    assert out["reward_rate"] == [rate(stream[0:2]), rate(stream[3:5]), rate(stream[7:9])]
    assert out["episodes"] == [sum(len(b.episode_returns) for b in s) for s in (stream[0:2], stream[3:5], stream[7:9])]


def test_divergence_fills_the_later_points_with_nan(setting):
    family, model, theta = setting
    out = fast_adapt(family.make_task("breakout", 3), model, theta, 1e30, None, updates=(1, 3, 10), eval_rollouts=1)
    assert out["diverged"] and math.isfinite(out["reward_rate"][0]) and out["env_steps"][0] == TB
    assert all(math.isnan(out[k][-1]) for k in MEASURED)
    with pytest.raises(ValueError, match="increasing"):
        fast_adapt(family.make_task("breakout", 3), model, theta, 0.1, None, updates=(3, 1))


def test_ray_actors_and_this_process_agree_and_use_the_configs_inner_loop(own_ray):
    """meta.inner_epochs x inner_minibatches = 2 x 2 reaches the actors as InnerPPO (their minibatches
    drawn from the task's generator): Ray and --local agree to the last bit, and with a direct fast_adapt."""
    cfg = minatar(**{"meta.inner_epochs": 2, "meta.inner_minibatches": 2, "meta.inner_lr": 0.5})
    family = make_family(cfg)
    thetas = {"fresh": initial_theta(family, 0)}
    kw = dict(games=("freeway", "breakout"), seeds=(0, 1), updates=(1, 2), eval_rollouts=1, log=lambda _: None)
    on_ray = run_fast_jobs(family, cfg, thetas, local=False, **kw)
    local = run_fast_jobs(family, cfg, thetas, local=True, **kw)
    assert [(j["game"], j["seed"], j["env_seed"]) for j in local] == [
        (g, s, task_seed(s, gi)) for gi, g in enumerate(kw["games"]) for s in (0, 1)]
    for a, b in zip(on_ray, local):
        assert (a["game"], a["seed"]) == (b["game"], b["seed"])
        for key in MEASURED:
            np.testing.assert_array_equal(a["fast"][key], b["fast"][key], err_msg=key)
    job = local[-1]
    model = family.make_model()
    torch.manual_seed(job["env_seed"] + 1)  # torch's global RNG plays no part
    direct = fast_adapt(family.make_task(job["game"], job["env_seed"]), model,
                        ParamSpec.of(model).unflatten(thetas["fresh"]), 0.5, InnerPPO(2, 2, 0.2), (1, 2), 1)
    for key in MEASURED:
        np.testing.assert_array_equal(job["fast"][key], direct[key], err_msg=key)
