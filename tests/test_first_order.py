"""The first-order identity, the inner SGD step and the learner's update, on a real ALE game."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl.core import meta
from metarl.core.config import EnvConfig, LossConfig
from metarl.distributed.learner import Learner
from metarl.core.policy import NatureCNN, ParamSpec, init_params
from metarl.tasks.atari import AtariFamily
from metarl.distributed.worker import TaskWorker

ENV = EnvConfig(num_envs=2, rollout_len=6)
FAMILY = AtariFamily(ENV, LossConfig())


@pytest.fixture(scope="module")
def pong():
    torch.manual_seed(0)
    task = FAMILY.make_task("pong", seed=1)
    model = FAMILY.make_model()
    yield task, model, init_params(model)
    task.close()


def test_batch_shapes_and_protocol(pong):
    task, model, theta = pong
    b = task.sample(model, theta)
    assert b.data["obs"].shape == (ENV.rollout_len + 1, ENV.num_envs, 4, 84, 84)
    assert b.data["obs"].dtype == torch.uint8
    assert b.env_steps == ENV.rollout_len * ENV.num_envs
    assert b.frames == b.env_steps * 4
    assert int(b.data["actions"].max()) < 18
    assert set(np.unique(b.data["rewards"].numpy())) <= {-1.0, 0.0, 1.0}  # clipped for training


def test_first_order_gradient_equals_detached_copy_gradient(pong):
    task, model, theta = pong
    a = meta.adapt(task, model, theta, inner_lr=0.05, inner_steps=1)
    batch = task.sample(model, a.theta_prime)
    g_fo, loss, _ = meta.loss_grad(task, model, a.theta_prime, batch)
    # a separate module holding a detached copy of theta' as its own parameters
    copy = NatureCNN()
    copy.load_state_dict({k: v.detach().clone() for k, v in a.theta_prime.items()})
    own = dict(copy.named_parameters())
    loss_copy, _ = task.loss(copy, own, batch)
    loss_copy.backward()
    # one batch (no chunking at 12 samples): both sides are the same float32 forward and backward on the
    # same inputs in this process, so they agree to the last bit on any CPU; the tolerances only
    # allow a few float32 ulps
    assert abs(float(loss_copy.detach()) - loss) < 1e-5
    for (name, p), g in zip(own.items(), g_fo):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # and no gradient reaches theta through theta' (first order)
    assert all(not v.requires_grad for v in a.theta_prime.values())


def test_chunked_gradient_equals_whole_batch_gradient():
    """AtariTask.grad in chunks of whole time steps, with the advantages from the values recorded
    while sampling, equals the gradient of the whole-batch loss (which recomputes the values)."""
    env = EnvConfig(num_envs=4, rollout_len=10)
    family = AtariFamily(env, LossConfig(grad_chunk=12))  # 3 steps x 4 envs: chunks of 3, 3, 3, 1 steps
    torch.manual_seed(0)
    task, model = family.make_task("breakout", seed=2), family.make_model()
    theta = init_params(model)
    try:
        batch = task.sample(model, theta)
        p = meta.detached(theta, requires_grad=True)
        recorded = batch.data["values"]
        with torch.no_grad():
            _, recomputed = model(batch.data["obs"].flatten(0, 1))
        # the same float32 network on batches of 4 vs 40 observations: the kernels may reduce in another
        # order, a few ulps apart (|values| < 1 here); 1e-5 is ~80 float32 ulps of 1
        torch.testing.assert_close(recorded, recomputed.reshape(recorded.shape), rtol=1e-4, atol=1e-5)
        chunked, loss_c, stats_c = task.grad(model, p, batch)
        whole_loss, stats_w = task.loss(model, p, batch)
        whole = torch.autograd.grad(whole_loss, tuple(p.values()))
        # float32 sums of the same per-sample terms grouped by chunk instead of all at once: their
        # rounding scales with the size of the terms, i.e. with each tensor's largest entry, not with
        # the entry itself (differences ~5e-6 of it), so atol is relative to that: 1e-4 of it
        assert abs(loss_c - float(whole_loss)) < 1e-4 * max(1.0, abs(float(whole_loss)))
        for k in stats_w:
            assert abs(stats_c[k] - stats_w[k]) < 1e-4 * max(1.0, abs(stats_w[k])), k
        for name, gc, gw in zip(p, chunked, whole):
            torch.testing.assert_close(gc, gw, rtol=1e-3, atol=1e-4 * float(gw.abs().max()), msg=name)
        # and the inner step and the meta-gradient go through it: the same call on the same inputs in
        # this process, hence the same float on any CPU
        assert meta.loss_grad(task, model, theta, batch)[1] == loss_c
    finally:
        task.close()


def test_inner_step_is_plain_sgd(pong):
    task, model, theta = pong
    torch.manual_seed(3)
    a = meta.adapt(task, model, theta, inner_lr=0.1, inner_steps=1)
    g, _, _ = meta.loss_grad(task, model, a.thetas[0], a.batches[0])  # the step's own gradient, bit for bit
    for (name, p0), g0 in zip(theta.items(), g):  # tolerance: the update's own float32 rounding, |theta| < 1
        torch.testing.assert_close(a.theta_prime[name], p0 - 0.1 * g0, rtol=1e-5, atol=1e-6)
    two = meta.adapt(task, model, theta, inner_lr=0.1, inner_steps=2)
    assert len(two.batches) == 2 and len(two.thetas) == 2
    assert not torch.equal(two.thetas[1]["pi.weight"], theta["pi.weight"])


def test_paramspec_roundtrip():
    model = NatureCNN()
    spec = ParamSpec.of(model)
    params = init_params(model)
    flat = spec.flatten(params)
    assert flat.dtype == np.float32 and flat.shape == (spec.numel,)
    back = spec.unflatten(flat)
    for k in params:
        assert torch.equal(back[k], params[k])
    back["pi.bias"].add_(1.0)
    assert np.array_equal(flat, spec.flatten(params))  # unflatten never aliases the wire array


def test_worker_evaluate_returns_flat_first_order_gradient():
    w = TaskWorker(FAMILY, {"pong": 5, "breakout": 6}, inner_lr=0.05, inner_steps=1)
    try:
        theta = Learner(FAMILY, 0, 1e-3, 1.0, "cpu").get_theta()
        theta_prime, astats = w.adapt("pong", theta)
        assert theta_prime.shape == theta.shape and not np.array_equal(theta_prime, theta)
        assert astats["env_steps"] == ENV.num_envs * ENV.rollout_len
        g, stats = w.evaluate("breakout", theta_prime)  # theta' of pong applied to another task
        assert g.shape == theta.shape and stats["finite"] and stats["grad_norm"] > 0
        with pytest.raises(KeyError):
            w.evaluate("qbert", theta_prime)
    finally:
        w.close()


def test_learner_adam_step_descends_and_guards_nonfinite():
    learner = Learner(FAMILY, 0, outer_lr=1e-3, max_grad_norm=1e9, device="cpu")
    theta0 = learner.get_theta()
    g = np.random.default_rng(0).normal(size=theta0.shape).astype(np.float32)
    out = learner.step(2, g, g)  # mean of two equal gradients is g
    delta = learner.get_theta() - theta0
    big = np.abs(g) > 1e-3
    # Adam's first step is -lr g / (|g| + 1e-8): -lr sign(g) within 1e-5 where |g| > 1e-3; theta1 is
    # float32 with |theta| < 1, so delta carries <= 6e-8 / 1e-3 = 6e-5 relative rounding
    np.testing.assert_allclose(delta[big], -1e-3 * np.sign(g[big]), rtol=1e-3)
    assert not out["update_skipped"] and learner.iteration == 1
    bad = g.copy()
    bad[10] = np.nan
    before = learner.get_theta()
    out = learner.step(1, bad)
    assert out["update_skipped"] and np.array_equal(before, learner.get_theta())
    clipped = Learner(FAMILY, 0, outer_lr=1e-3, max_grad_norm=0.5, device="cpu")
    st = clipped.step(1, g)
    # the reported norm is before clipping (~1.3e3, not 0.5). It is a float32 sum of 1.7M squares whose
    # rounding depends on the CPU's vector width: 2.5e-5 relative with 8 lanes, 5e-4 with a single
    # sequential accumulator; hence a float64 reference and rel=1e-3
    assert st["grad_norm"] == pytest.approx(float(np.linalg.norm(g.astype(np.float64))), rel=1e-3)


def test_learner_clips_the_averaged_gradient_before_adam():
    """Two Adam steps with gradients a thousand times apart in norm, both above max_grad_norm: with
    clipping both reach Adam at norm 0.5 and the second step moves theta as far as the first; without
    it the first gradient dominates Adam's moments and the second step is ~1/3 shorter. Compared with
    torch.optim.Adam run on the same gradients clipped by hand."""
    clip = 0.5
    learner = Learner(FAMILY, 0, outer_lr=1e-3, max_grad_norm=clip, device="cpu")
    theta0 = learner.get_theta()
    g = np.random.default_rng(1).normal(size=theta0.shape).astype(np.float32)  # norm ~1.3e3
    grads = [g, 1e-3 * g]  # norms ~1.3e3 and ~1.3, both above the clip
    ref = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = torch.optim.Adam([ref], lr=1e-3)
    steps, ref_steps = [], []
    for x in grads:
        before, ref_before = learner.get_theta(), ref.detach().clone()
        out = learner.step(2, 2 * x)  # the learner averages over n_evaluations = 2
        t = torch.from_numpy(x)
        norm = float(t.norm())
        assert norm > clip and out["grad_norm"] == pytest.approx(norm, rel=1e-4)  # reported before clipping
        ref.grad = t * min(1.0, clip / (norm + 1e-6))
        opt.step()
        steps.append(learner.get_theta() - before)
        ref_steps.append((ref.detach() - ref_before).numpy())
    # the same float32 Adam on the same clipped gradients; the scale factor's rounding may differ
    # in the last bits (the norm is a float32 sum), which Adam's normalisation all but cancels
    for s, r in zip(steps, ref_steps):
        np.testing.assert_allclose(s, r, rtol=1e-3, atol=1e-7)  # atol: float32 rounding of theta (|theta| < 1)
    # clipped, the two gradients reach Adam equal, so the steps are equal; unclipped, the second
    # step would be ~0.67 of the first
    ratio = np.linalg.norm(steps[1]) / np.linalg.norm(steps[0])
    assert ratio == pytest.approx(1.0, abs=0.02), ratio


def test_outer_lr_schedule_follows_the_iteration_and_survives_a_resume():
    """Cosine decay: the step size the learner uses is beta * (1 + cos(pi t / T)) / 2, logged per
    step, and a learner restored from a mid-run state continues the schedule where it was."""
    from metarl.distributed.learner import lr_factor

    total, g = 4, np.ones(ParamSpec.of(NatureCNN()).numel, dtype=np.float32)
    learner = Learner(FAMILY, 0, outer_lr=1e-3, max_grad_norm=1e9, device="cpu", lr_decay="cosine",
                      total_iterations=total)
    lrs = [learner.step(1, g)["outer_lr"] for _ in range(2)]
    np.testing.assert_allclose(lrs, [1e-3, 1e-3 * (1 + np.cos(np.pi / 4)) / 2], rtol=1e-6)
    resumed = Learner(FAMILY, 1, outer_lr=1e-3, max_grad_norm=1e9, device="cpu", lr_decay="cosine",
                      total_iterations=total)
    resumed.load_state(learner.state())
    assert resumed.step(1, g)["outer_lr"] == pytest.approx(1e-3 * lr_factor("cosine", 2, total)) == learner.step(1, g)["outer_lr"]
    assert lr_factor("cosine", total, total) == 0.0 and lr_factor("linear", 1, 4) == 0.75
    assert lr_factor("constant", 3, 4) == 1.0
    with pytest.raises(ValueError, match="unknown outer-lr decay"):
        Learner(FAMILY, 0, 1e-3, 1.0, "cpu", lr_decay="step", total_iterations=4)
