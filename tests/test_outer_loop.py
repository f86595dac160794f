"""PPO's outer loop (metarl.core.outer): meta.outer_epochs x outer_minibatches clipped Adam steps per
meta-iteration on the members' evaluation rollouts, theta' following theta by the shift or the
exact rule, computed on the workers (one round trip per step) or all on the learner. Real MinAtar
rollouts, real torch gradients; the fault test kills a real Ray worker between outer steps."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl.core import config as config_mod, meta, outer
from metarl.core.config import ConfigError
from metarl.distributed.fleet import outer_plan, start_fleet
from metarl.distributed.iteration import meta_iteration
from metarl.distributed.learner import Learner
from metarl.core.losses import actor_critic_loss, ppo_loss
from metarl.core.policy import init_params
from metarl.tasks import make_family
from metarl.distributed.worker import TaskWorker

from conftest import CONFIGS

pytest.importorskip("minatar")

GAMES = ["breakout", "space_invaders", "asterix"]


def minatar(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    small = {"tasks.train": GAMES, "env.num_envs": 4, "env.rollout_len": 8, "log.wandb_mode": "disabled",
             "log.progress": False, "ray.cpus_per_worker": 0.25, "meta.outer_epochs": 2, "meta.outer_minibatches": 2,
             "meta.outer_clip": 0.2}
    for k, v in {**small, **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def iterations(cfg, n: int = 1, skip: int = 2, backend=None, worker_cls=TaskWorker):
    """n meta-iterations with fixed groups; theta before, after, and the metrics rows."""
    fleet = start_fleet(cfg, local=backend is None, backend=backend, worker_cls=worker_cls)
    b = fleet.backend
    theta0 = b.get(b.call(fleet.learner, Learner.get_theta))
    rng = np.random.default_rng(3)
    recs = [meta_iteration(fleet, cfg.tasks.train, meta.make_groups(cfg.num_tasks, skip, rng), "fomaml", 120, it)
            for it in range(n)]
    theta = b.get(b.call(fleet.learner, Learner.get_theta))
    iteration = b.get(b.call(fleet.learner, Learner.info))["iteration"]
    return fleet, theta0, theta, recs, iteration


@pytest.mark.parametrize("follow", ["shift", "exact"])
def test_workers_and_learner_take_the_same_outer_steps(follow):
    """Every outer step on the workers (a round trip each) or all on the learner from the shipped
    rollouts: the same seeded rollouts, minibatches (drawn from (seed, iteration) on either side),
    theta' rule and gradient code give the same theta. Both run in this process, so the sums are
    the same float32 additions in the same order; atol 1e-7 is a few ulps of |theta| < 0.5."""
    _, t0_w, t_w, rec_w, it_w = iterations(minatar(**{"meta.grad_on": "worker", "meta.follow": follow}))
    _, t0_l, t_l, rec_l, it_l = iterations(minatar(**{"meta.grad_on": "learner", "meta.follow": follow}))
    np.testing.assert_array_equal(t0_w, t0_l)
    assert it_w == it_l == 1  # one iteration, however many outer steps it took
    for rec in rec_w + rec_l:
        assert rec["outer/steps"] == 4 and rec["tasks_dropped"] == [] and not rec["update_skipped"]
        assert rec["outer/approx_kl"] > 0  # the later steps moved the post-update policies
    assert [r["outer/round_trips"] for r in rec_w] == [4]  # the learner path has none
    assert "outer/round_trips" not in rec_l[0]
    np.testing.assert_allclose(t_l, t_w, rtol=0, atol=1e-7)
    assert rec_l[-1]["grad/update_norm"] == pytest.approx(rec_w[-1]["grad/update_norm"], rel=1e-5)


def test_outer_steps_move_theta_further_than_one_step():
    """Four clipped steps per iteration against one: the same first gradient (same rollouts),
    then three more steps that move theta on; with the exact rule theta' is redone each time."""
    _, t0, t1, rec1, _ = iterations(minatar(**{"meta.outer_epochs": 1, "meta.outer_minibatches": 1,
                                               "meta.outer_clip": 0.0}))
    _, t0b, t4, rec4, _ = iterations(minatar())
    np.testing.assert_array_equal(t0, t0b)
    assert "outer/steps" not in rec1[0] and rec4[0]["outer/steps"] == 4
    assert np.linalg.norm(t4 - t0) > 2 * np.linalg.norm(t1 - t0)


def test_one_unclipped_step_is_the_one_step_update():
    """outer_epochs = outer_minibatches = 1 and no clip is no plan at all: the iteration takes the
    one-step path, so a fixed-seed run's theta is today's to the bit; and the reason this is the
    same update: at the sampling parameters the unclipped PPO loss has the actor-critic gradient."""
    one = minatar(**{"meta.outer_epochs": 1, "meta.outer_minibatches": 1, "meta.outer_clip": 0.0})
    assert outer_plan(one) is None and outer_plan(minatar()) is not None
    _, _, t_explicit, _, _ = iterations(one)
    base = config_mod.validate(config_mod.override(config_mod.override(config_mod.override(
        minatar(), "meta.outer_epochs", 1), "meta.outer_minibatches", 1), "meta.outer_clip", 0.0))
    _, _, t_base, _, _ = iterations(base)
    np.testing.assert_array_equal(t_explicit, t_base)
    torch.manual_seed(0)
    logits = torch.randn(64, 6, requires_grad=True)  # float32: ppo_loss computes in float32 (bf16 inputs)
    values = torch.randn(64, requires_grad=True)
    actions = torch.randint(0, 6, (64,))
    adv, ret = torch.randn(64), torch.randn(64)
    logp_old = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1).detach()
    a2c, _ = actor_critic_loss(logits, values, actions, adv, ret, 0.5, 0.01)
    unclipped, _ = ppo_loss(logits, values, actions, logp_old, values.detach(), adv, ret, 0.0, 0.5, 0.01)
    for x, y in zip(torch.autograd.grad(a2c, (logits, values)), torch.autograd.grad(unclipped, (logits, values))):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)  # float32 rounding of exp(0) * A vs A


def test_exact_rule_redoes_the_inner_step_and_shift_moves_with_theta():
    cfg = minatar()
    family = make_family(cfg)
    model = family.make_model()
    torch.manual_seed(0)
    theta = init_params(model)
    task = family.make_task("breakout", 11)
    a = meta.adapt(task, model, theta, inner_lr=0.1, inner_steps=2)
    again = outer.readapt(task, model, theta, a.batches, 0.1)  # at theta: theta' itself
    for k in theta:
        torch.testing.assert_close(again[k], a.theta_prime[k], rtol=0, atol=0)
    moved = {k: v + 0.01 for k, v in theta.items()}
    redone = outer.readapt(task, model, moved, a.batches, 0.1)
    shifted = outer.shifted(a.theta_prime, theta, moved)
    for k in theta:
        torch.testing.assert_close(shifted[k], a.theta_prime[k] + 0.01, rtol=0, atol=1e-6)
    # the inner gradient changes with theta, so the exact rule differs from the shift (first order)
    assert max(float((redone[k] - shifted[k]).abs().max()) for k in theta) > 1e-6
    task.close()


def test_config_refuses_what_the_outer_loop_does_not_run():
    with pytest.raises(ConfigError, match="outer_epochs"):
        minatar(**{"meta.outer_epochs": 0})
    with pytest.raises(ConfigError, match="outer_clip"):
        minatar(**{"meta.outer_clip": -0.1})
    with pytest.raises(ConfigError, match="runs fomaml"):
        minatar(**{"meta.algo": "reptile"})
    with pytest.raises(ConfigError, match="meta.follow"):
        minatar(**{"meta.follow": "approx"})


def test_learner_state_leaves_the_optimizer_untouched():
    """Learner.state() copies Adam's moments to the CPU; the optimizer keeps its own tensors (on a
    cuda learner, replacing them with CPU copies made the next step mix devices)."""
    family = make_family(minatar())
    learner = Learner(family, seed=0, outer_lr=1e-3, max_grad_norm=1.0, device="cpu")
    learner.step(1, np.ones(learner.spec.numel, dtype=np.float32))
    live = {k: v for s in learner.opt.state.values() for k, v in s.items()}
    state = learner.state()
    after = {k: v for s in learner.opt.state.values() for k, v in s.items()}
    assert all(after[k] is live[k] for k in live)
    saved = next(iter(state["optimizer"]["state"].values()))
    assert saved["exp_avg"] is not live["exp_avg"]
    torch.testing.assert_close(saved["exp_avg"], live["exp_avg"], rtol=0, atol=0)


def killer_worker(marker: Path) -> type:
    """A TaskWorker that dies (SIGKILL, its own process) answering outer step 3 of space_invaders,
    once (the marker file says it happened)."""

    class KillsItselfInRound(TaskWorker):
        def round_grad(self, task_name, r, theta, theta_prime=None):
            if task_name == "space_invaders" and r == 2 and not marker.exists():
                marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            return super().round_grad(task_name, r, theta, theta_prime)

    return KillsItselfInRound


@pytest.mark.slow
def test_a_worker_killed_between_outer_steps_drops_its_task_for_the_rest(ray_session, tmp_path):
    """Real Ray actors: the worker holding space_invaders dies in the third outer step. Its task is
    dropped (kind died, named with the step) for the rest of that iteration; the other members'
    steps go on; Ray restarts the worker and the next iteration uses every task again."""
    import sys

    from ray import cloudpickle

    from metarl.distributed.backend import RayBackend

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class travels with its code

    cfg = minatar(**{"ray.workers": 3, "meta.grad_on": "worker", "ray.max_worker_restarts": 2,
                     "ray.call_timeout_s": 120})
    fleet = start_fleet(cfg, local=False, backend=RayBackend(), worker_cls=killer_worker(tmp_path / "marker"))
    rng = np.random.default_rng(3)
    recs, deadline = [], time.monotonic() + 600  # a hang guard: how soon Ray's restart serves depends on the load
    while time.monotonic() < deadline and (len(recs) < 2 or recs[-1]["tasks_dropped"]):  # until it serves again
        recs.append(meta_iteration(fleet, cfg.tasks.train, meta.make_groups(3, 1, rng), "fomaml", 120, len(recs)))
    assert (tmp_path / "marker").exists()
    first = recs[0]
    assert first["tasks_dropped"] == ["space_invaders"]
    assert first["drop_kinds"] == {"space_invaders": "died"}
    assert "outer step 3" in first["drop_reasons"]["space_invaders"]
    assert first["outer/steps"] == 4 and not first["update_skipped"]  # the other members' steps went on
    for rec in recs[1:-1]:  # while Ray restarts the worker, its task is dropped, the others still step
        assert rec["tasks_dropped"] == ["space_invaders"] and rec["outer/steps"] == 4
    assert recs[-1]["tasks_dropped"] == [] and recs[-1]["outer/steps"] == 4, recs[-1]["drop_reasons"]
    assert fleet.backend.get(fleet.backend.call(fleet.learner, Learner.info))["iteration"] == len(recs)


def test_inner_ppo_takes_several_clipped_steps_that_improve_the_adaptation_batch():
    """meta.inner_epochs x inner_minibatches = 2 x 4: eight clipped SGD steps of alpha on the
    leader's rollout. From the same rollout, theta' moves the policy further than the one
    actor-critic step of the MAML form and raises the importance-weighted advantage on that
    rollout more; the refusal names the first-order settings it needs."""
    from metarl.core.policy import forward

    cfg = config_mod.validate(config_mod.override(config_mod.override(
        config_mod.load(CONFIGS / "minatar.yaml"), "env.num_envs", 8), "env.rollout_len", 32))
    family = make_family(cfg)
    model = family.make_model()
    torch.manual_seed(0)
    theta = init_params(model)

    def adapted(inner):
        torch.manual_seed(1)
        return meta.adapt(family.make_task("breakout", 3), model, theta, 0.1, 1, inner)

    one, eight = adapted(None), adapted(meta.InnerPPO(2, 4, 0.2))
    batch = one.batches[0]
    assert torch.equal(batch.data["obs"], eight.batches[0].data["obs"])  # the same rollout
    d = batch.data
    T, B = d["actions"].shape
    adv, _ = family.make_task("breakout", 3).advantages(batch)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)

    def kl_and_gain(params):
        with torch.no_grad():
            logits, _ = forward(model, params, d["obs"][:T].flatten(0, 1))
            logp = torch.log_softmax(logits, -1).gather(1, d["actions"].reshape(-1, 1)).squeeze(1)
            old = d["logp"].reshape(-1)
            return float((old - logp).mean()), float((torch.exp(logp - old) * adv.reshape(-1)).mean())

    kl1, gain1 = kl_and_gain(one.theta_prime)
    kl8, gain8 = kl_and_gain(eight.theta_prime)
    assert kl8 > 2 * abs(kl1) and gain8 > gain1 > 0, (kl1, kl8, gain1, gain8)
    with pytest.raises(ConfigError, match="is first-order"):
        config_mod.validate(config_mod.override(config_mod.override(cfg, "meta.inner_epochs", 2), "meta.follow", "exact"))


def test_inner_ppo_minibatches_come_from_the_task_not_from_torchs_global_rng():
    """A fixed-seed run's inner PPO loop draws its minibatches from the task's seeded generator:
    the same theta' whatever torch's global RNG holds (it used to follow the global RNG, which no
    worker seeds)."""
    cfg = config_mod.validate(config_mod.override(config_mod.override(
        config_mod.load(CONFIGS / "minatar.yaml"), "env.num_envs", 4), "env.rollout_len", 16))
    family = make_family(cfg)
    model = family.make_model()
    torch.manual_seed(0)
    theta = init_params(model)

    def adapted(global_seed: int, task_seed: int = 3):
        torch.manual_seed(global_seed)
        return meta.adapt(family.make_task("breakout", task_seed), model, theta, 0.1, 1,
                          meta.InnerPPO(2, 4, 0.2)).theta_prime

    a, b, other = adapted(1), adapted(2), adapted(1, task_seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a)
