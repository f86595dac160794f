"""MAML, FOMAML and Reptile against finite differences and slow paper-notation references.

The post-adaptation objective with task skipping, for a group led by task i with members M:

    F(theta) = sum_{j in M} L_j(theta'_i(theta); D_j),   theta_{s+1} = theta_s - alpha grad L_i(theta_s; D_i^s)

with every batch D held FIXED (collected once by the real code), so F is a deterministic function
of theta and its gradient can be checked by central differences in float64. The real functions
(metarl.core.meta.adapt / loss_grad / maml_backward, TaskWorker.adapt / evaluate / maml_correct /
reptile, and run.meta_iteration) are what is tested; the references below are deliberately slow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metarl.core import meta
from metarl.core.config import Config, LossConfig, MetaConfig, Nav2dConfig, SinusoidConfig, TasksConfig
from metarl.core.meta import Group
from metarl.core.policy import ParamSpec, init_params
from metarl.core.seeds import iteration_seed, task_seed
from metarl.distributed.fleet import start_fleet
from metarl.distributed.iteration import meta_iteration
from metarl.distributed.learner import Learner
from metarl.tasks.nav2d import Nav2dFamily
from metarl.tasks.sinusoid import SinusoidFamily, task_names
from metarl.distributed.worker import TaskWorker

SINE = SinusoidFamily(SinusoidConfig(k_shot=6, hidden=(6, 5)))
NAV = Nav2dFamily(Nav2dConfig(episodes=3, horizon=8, hidden=(6,), init_log_std=-1.0), LossConfig(ent_coef=0.01))
ALPHA = 0.3  # large enough that the second-order term is far above the finite-difference error


# ---- slow references ------------------------------------------------------------------------------


def adapted(task, model, theta: dict, batches: list, alpha: float) -> dict:
    """theta'_i: plain SGD through the fixed adaptation batches, written out step by step."""
    params = dict(theta)
    for batch in batches:
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss, _ = task.loss(model, p, batch)
        grads = torch.autograd.grad(loss, list(p.values()))
        params = {k: params[k] - alpha * g for k, g in zip(params, grads)}
    return params


def post_adaptation_loss(leader, members, model, spec, theta_flat: torch.Tensor, adapt_batches, eval_batches,
                         alpha: float) -> float:
    theta = spec.unflatten(theta_flat, dtype=torch.float64)
    theta_prime = adapted(leader, model, theta, adapt_batches, alpha)
    return float(sum(task.loss(model, theta_prime, b)[0] for task, b in zip(members, eval_batches)))


def central_differences(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    for n in range(x.numel()):
        e = torch.zeros_like(x)
        e[n] = h
        out[n] = (f(x + e) - f(x - e)) / (2 * h)
    return out


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def float64_setup(family, names: list[str], seed: int = 0):
    torch.manual_seed(seed)
    model = family.make_model().double()
    theta = init_params(model)
    tasks = [family.make_task(n, seed=100 + i) for i, n in enumerate(names)]
    return model, theta, tasks


# ---- MAML: the real meta-gradient against finite differences ----------------------------------------


@pytest.mark.parametrize("family,names", [
    (SINE, ["sine-0001", "sine-0002", "sine-0003"]),
    (NAV, ["goal-0001", "goal-0002", "goal-0003"]),
], ids=["sinusoid", "nav2d"])
@pytest.mark.parametrize("skip", [1, 3])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(family, names, skip, inner_steps):
    model, theta, tasks = float64_setup(family, names)
    spec = ParamSpec.of(model)
    leader, members = tasks[0], tasks[:skip]  # skip 1: the leader evaluates its own theta'
    a = meta.adapt(leader, model, theta, ALPHA, inner_steps)
    eval_batches = [t.sample(model, a.theta_prime) for t in members]
    # the group's first-order gradients, summed, then one backward through the leader's inner steps
    g_sum = None
    for t, b in zip(members, eval_batches):
        g, _, _ = meta.loss_grad(t, model, a.theta_prime, b)
        g_sum = g if g_sum is None else tuple(x + y for x, y in zip(g_sum, g))
    maml = flat(meta.maml_backward(leader, model, a, ALPHA, g_sum))

    theta_flat = flat(theta.values()).detach()
    f = lambda x: post_adaptation_loss(leader, members, model, spec, x, a.batches, eval_batches, ALPHA)  # noqa: E731
    fd = central_differences(f, theta_flat)
    # central differences in float64 with h = 1e-6: rounding ~ eps |F| / h ~ 2e-9 (|F| up to ~10 here),
    # truncation h^2 |F'''| / 6 ~ 1e-12; atol=1e-7 is ~50x that, far below the first-order gap below
    torch.testing.assert_close(maml, fd, rtol=1e-5, atol=1e-7)
    # the check has teeth: the first-order gradient is measurably different from the true one
    assert (flat(g_sum) - fd).norm() > 1e-3 * fd.norm()
    # and adapt() really is S plain SGD steps on its own batches
    ref = adapted(leader, model, theta, a.batches, ALPHA)
    for k in ref:
        torch.testing.assert_close(a.theta_prime[k], ref[k], rtol=1e-12, atol=1e-12)
    assert len(a.batches) == inner_steps
    # K-shot regression takes every step on the same K points; RL steps roll out afresh
    if inner_steps > 1:
        assert all(b is a.batches[0] for b in a.batches) == (family is SINE)


def test_maml_backward_is_linear_so_one_backward_serves_a_group():
    model, theta, tasks = float64_setup(SINE, ["sine-0004", "sine-0005", "sine-0006"])
    a = meta.adapt(tasks[0], model, theta, ALPHA, 2)
    gs = [meta.loss_grad(t, model, a.theta_prime, t.sample(model, a.theta_prime))[0] for t in tasks]
    summed = flat(meta.maml_backward(tasks[0], model, a, ALPHA, tuple(sum(x) for x in zip(*gs))))
    each = sum(flat(meta.maml_backward(tasks[0], model, a, ALPHA, g)) for g in gs)
    torch.testing.assert_close(summed, each, rtol=1e-10, atol=1e-12)


# ---- the worker and the run loop: the same numbers through the wire format ----------------------------


class CountingFamily(SinusoidFamily):
    """The sinusoid family whose tasks count how often their loss is evaluated."""

    def make_task(self, name, seed):
        task = super().make_task(name, seed)
        task.loss_calls = 0
        inner = task.loss

        def loss(model, params, batch):
            task.loss_calls += 1
            return inner(model, params, batch)

        task.loss = loss
        return task


def twins(family, names, seeds):
    """Fresh copies of tasks: with the same seeds they draw exactly the batches the worker drew."""
    return {n: family.make_task(n, s) for n, s in zip(names, seeds)}


def test_worker_maml_correct_is_one_backward_per_group_and_matches_float64():
    family = CountingFamily(SINE.cfg)
    names, seeds = ["sine-0010", "sine-0011", "sine-0012"], [5, 6, 7]
    worker = TaskWorker(family, dict(zip(names, seeds)), ALPHA, 2, keep_adaptation=True)
    torch.manual_seed(1)
    theta = ParamSpec.of(worker.model).flatten(init_params(family.make_model()))
    theta_prime, _ = worker.adapt(names[0], theta)
    grads = [worker.evaluate(n, theta_prime)[0] for n in names]
    calls_before = worker.tasks[names[0]].loss_calls
    corrected = worker.maml_correct(names[0], *grads)
    assert worker.tasks[names[0]].loss_calls - calls_before == 2  # S = 2 HVPs for three members, not 6
    with pytest.raises(RuntimeError):
        worker.maml_correct(names[0], *grads)  # the adaptation is released after use

    # float64 reference on the same batches
    model = family.make_model().double()
    spec = ParamSpec.of(model)
    twin = twins(SINE, names, seeds)
    theta64 = spec.unflatten(torch.from_numpy(theta), dtype=torch.float64)
    adapt_batches = [twin[names[0]].sample(model, theta64)] * 2  # K-shot: both steps on one support set
    tp64 = adapted(twin[names[0]], model, theta64, adapt_batches, ALPHA)
    eval_batches = [twin[n].sample(model, tp64) for n in names]
    # float32 worker vs float64 reference: each entry carries float32 rounding (eps 1.2e-7) of terms as
    # large as the largest entries (differences ~4 eps of max|.| here), so atol is relative to that scale
    ref = spec.flatten(tp64)
    np.testing.assert_allclose(theta_prime, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    expected = _true_meta_gradient(twin[names[0]], [twin[n] for n in names], model, spec, theta64, adapt_batches,
                                   eval_batches)
    # the same rule for the meta-gradient, whose second-order term is ~alpha = 30% of it
    np.testing.assert_allclose(corrected, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _true_meta_gradient(leader, members, model, spec, theta64, adapt_batches, eval_batches) -> np.ndarray:
    """d/dtheta of sum_j L_j(theta'(theta)) by autograd through the written-out inner steps."""
    x = torch.cat([v.reshape(-1) for v in theta64.values()]).detach().requires_grad_(True)
    params = {k: v.view(s) for k, v, s in zip(spec.names, torch.split(x, spec.sizes), spec.shapes)}
    for batch in adapt_batches:
        loss, _ = leader.loss(model, params, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: p - ALPHA * g for (k, p), g in zip(params.items(), grads)}
    total = sum(t.loss(model, params, b)[0] for t, b in zip(members, eval_batches))
    (g,) = torch.autograd.grad(total, [x])
    return g.numpy()


def test_fomaml_gradient_is_the_detached_copy_gradient():
    names, seeds = ["sine-0020", "sine-0021"], [3, 4]
    worker = TaskWorker(SINE, dict(zip(names, seeds)), ALPHA, 1)
    torch.manual_seed(2)
    theta = ParamSpec.of(worker.model).flatten(init_params(SINE.make_model()))
    theta_prime, _ = worker.adapt(names[0], theta)
    g, stats = worker.evaluate(names[1], theta_prime)  # skip 2: the leader's theta' on another task
    twin = twins(SINE, names, seeds)
    copy = SINE.make_model()  # a module that owns a detached copy of theta' as its parameters
    copy.load_state_dict(ParamSpec.of(copy).unflatten(theta_prime))
    own = dict(copy.named_parameters())
    loss, _ = twin[names[1]].loss(copy, own, twin[names[1]].sample(copy, own))
    loss.backward()
    expected = ParamSpec.of(copy).flatten_grads([p.grad for p in own.values()])
    # the same float32 loss and backward on the same points in this process: equal to the last bit on
    # any CPU; the tolerances only allow a few ulps
    assert stats["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-8)
    assert np.linalg.norm(g) > 0


def test_reptile_direction_is_theta_minus_theta_prime_exactly():
    names, seeds = ["sine-0030"], [9]
    worker = TaskWorker(SINE, dict(zip(names, seeds)), ALPHA, 3)
    torch.manual_seed(3)
    spec = ParamSpec.of(worker.model)
    theta = spec.flatten(init_params(SINE.make_model()))
    direction, stats = worker.reptile(names[0], theta)
    task, model = twins(SINE, names, seeds)[names[0]], SINE.make_model()
    params = spec.unflatten(theta)
    support = task.sample(model, params)  # K-shot: every step on the same K points
    for _ in range(3):  # S = 3 SGD steps, written out
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        loss, _ = task.loss(model, params, support)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {k: (p - ALPHA * g).detach() for (k, p), g in zip(params.items(), grads)}
    # exact: the worker runs these same float32 operations, in this order, on the same inputs in this
    # process (same kernels), so the result is bit-identical on any CPU; no two machines are compared
    assert np.array_equal(direction, theta - spec.flatten(params))
    assert stats["env_steps"] == SINE.cfg.k_shot and stats["grad_norm"] > 0


# ---- the whole meta-iteration (run.meta_iteration, local actors) against the float64 references ----------


def small_config(algo: str, skip: int, inner_steps: int, stack: str = "per_task") -> Config:
    return Config(
        tasks=TasksConfig(family="sinusoid", train=task_names(40, 4)),
        meta=MetaConfig(algo=algo, skip=skip, inner_lr=ALPHA, inner_steps=inner_steps, outer_lr=1e-3,
                        max_grad_norm=1e6, seed=4, task_batching=stack),
        sinusoid=SINE.cfg,
        ray=dataclasses.replace(Config().ray, workers=2),  # each worker owns two tasks
    )


def reference_direction(cfg: Config, groups: list[Group], theta: np.ndarray, iteration: int | None = None) -> np.ndarray:
    """What the learner should receive, averaged: per group, MAML / FOMAML / Reptile in float64.
    iteration: the tasks' RNGs restart from (task seed, iteration), as in stacked mode."""
    names, m = cfg.tasks.train, cfg.meta
    seeds = [task_seed(m.seed, i) for i in range(len(names))]
    if iteration is not None:
        seeds = [iteration_seed(s, iteration) for s in seeds]
    twin = twins(SINE, names, seeds)
    model = SINE.make_model().double()
    spec = ParamSpec.of(model)
    theta64 = spec.unflatten(torch.from_numpy(theta), dtype=torch.float64)
    total, count = np.zeros(spec.numel), 0
    for g in groups:
        leader = twin[names[g.leader]]
        batches = []
        params = theta64
        for _ in range(m.inner_steps):  # the leader's draws come first, in the same order as the worker's
            batches.append(leader.sample(model, params) if not batches else batches[0])  # K-shot: one support set
            params = adapted(leader, model, params, batches[-1:], m.inner_lr)
        if m.algo == "reptile":
            total += spec.flatten(theta64).astype(np.float64) - torch.cat([v.reshape(-1) for v in params.values()]).numpy()
            count += 1
            continue
        members = [twin[names[j]] for j in g.members]
        evals = [t.sample(model, params) for t in members]
        if m.algo == "maml":
            total += _true_meta_gradient(leader, members, model, spec, theta64, batches, evals)
        else:
            for t, b in zip(members, evals):
                total += flat(meta.loss_grad(t, model, params, b)[0]).numpy()
        count += len(members)
    return total / count


@pytest.mark.parametrize("algo,skip,inner_steps", [
    ("maml", 1, 1), ("maml", 2, 2), ("maml", 3, 1), ("fomaml", 2, 1), ("reptile", 2, 3),
])
def test_meta_iteration_feeds_the_learner_the_right_direction(algo, skip, inner_steps):
    cfg = small_config(algo, skip, inner_steps)
    fleet = start_fleet(cfg, local=True)
    b = fleet.backend
    theta0 = b.get(b.call(fleet.learner, Learner.get_theta))
    groups = meta.make_groups(cfg.num_tasks, skip, np.random.default_rng(11))
    rec = meta_iteration(fleet, cfg.tasks.train, groups, algo, timeout=60)
    theta1 = b.get(b.call(fleet.learner, Learner.get_theta))
    expected = reference_direction(cfg, groups, theta0)
    assert rec["tasks_dropped"] == [] and not rec["update_skipped"]
    assert rec["adaptations"] == len(groups)
    assert rec["evaluations_used"] == (len(groups) if algo == "reptile" else cfg.num_tasks)
    # float32 workers vs the float64 reference: a few eps (1.2e-7) relative to max|g|; rel=2e-4 and
    # the 1e-3 max|g| cut for the signs below leave >100x
    assert rec["grad/norm"] == pytest.approx(float(np.linalg.norm(expected)), rel=2e-4)
    # Adam's first step moves every coordinate by -outer_lr * sign(g)
    big = np.abs(expected) > 1e-3 * np.abs(expected).max()
    assert big.sum() > 10
    np.testing.assert_array_equal(np.sign(theta1 - theta0)[big], -np.sign(expected[big]))


@pytest.mark.parametrize("algo,skip,inner_steps", [("maml", 2, 2), ("maml", 3, 1), ("fomaml", 2, 1), ("reptile", 2, 3)])
def test_stacked_meta_iteration_feeds_the_learner_the_same_direction(algo, skip, inner_steps):
    """Stacked mode (one batched call per worker computing whole groups) against the same float64
    task-by-task references: the groups are split over two workers, the data come from
    (task seed, iteration)."""
    cfg = small_config(algo, skip, inner_steps, stack="stacked")
    fleet = start_fleet(cfg, local=True)
    assert fleet.stacked and all(len(w.tasks) == cfg.num_tasks for w in fleet.workers)
    b = fleet.backend
    theta0 = b.get(b.call(fleet.learner, Learner.get_theta))
    groups = meta.make_groups(cfg.num_tasks, skip, np.random.default_rng(11))
    rec = meta_iteration(fleet, cfg.tasks.train, groups, algo, timeout=60, iteration=7)
    theta1 = b.get(b.call(fleet.learner, Learner.get_theta))
    expected = reference_direction(cfg, groups, theta0, iteration=7)
    assert rec["tasks_dropped"] == [] and not rec["update_skipped"]
    assert rec["adaptations"] == len(groups)
    assert rec["evaluations_used"] == (len(groups) if algo == "reptile" else cfg.num_tasks)
    assert rec["env_steps/adapt"] == len(groups) * SINE.cfg.k_shot  # K-shot: S steps on one support set
    assert rec["grad/norm"] == pytest.approx(float(np.linalg.norm(expected)), rel=2e-4)
    big = np.abs(expected) > 1e-3 * np.abs(expected).max()
    assert big.sum() > 10
    np.testing.assert_array_equal(np.sign(theta1 - theta0)[big], -np.sign(expected[big]))


@pytest.mark.parametrize("family,names", [
    (SINE, ["sine-0001", "sine-0002", "sine-0003", "sine-0004", "sine-0005"]),
    (NAV, ["goal-0001", "goal-0002", "goal-0003", "goal-0004", "goal-0005"]),
], ids=["sinusoid", "nav2d"])
@pytest.mark.parametrize("algo,skip,inner_steps", [("maml", 2, 2), ("fomaml", 3, 1), ("reptile", 2, 2)])
def test_groups_step_equals_the_task_by_task_math(family, names, algo, skip, inner_steps):
    """meta.groups_step on a TaskStack (all groups in one batched pass) against meta.adapt /
    loss_grad / maml_backward task by task, in float64, on identical data: same per-task
    statistics, same summed meta-gradient."""
    model, theta, _ = float64_setup(family, names)
    seeds = [500 + i for i in range(len(names))]
    groups = meta.make_groups(len(names), skip, np.random.default_rng(3))
    stacked_tasks = [family.make_task(n, s) for n, s in zip(names, seeds)]
    got, adapt_stats, eval_stats = meta.groups_step(family.make_stack(stacked_tasks), model, theta, groups, algo,
                                                    ALPHA, inner_steps)
    tasks = [family.make_task(n, s) for n, s in zip(names, seeds)]
    want = [torch.zeros_like(v) for v in theta.values()]
    for g in groups:
        a = meta.adapt(tasks[g.leader], model, theta, ALPHA, inner_steps)
        assert adapt_stats[g.leader]["inner_losses"] == pytest.approx(a.losses, rel=1e-9)
        if algo == "reptile":
            parts = [meta.reptile_direction(theta, a.theta_prime)]
        else:
            parts = []
            for j in g.members:
                batch = tasks[j].sample(model, a.theta_prime)
                grads, loss, _ = meta.loss_grad(tasks[j], model, a.theta_prime, batch)
                assert eval_stats[j]["loss"] == pytest.approx(loss, rel=1e-9)
                assert eval_stats[j]["env_steps"] == batch.env_steps
                assert eval_stats[j]["returns"] == pytest.approx(batch.episode_returns, rel=1e-9)
                parts.append(grads)
            if algo == "maml":
                v = tuple(sum(x) for x in zip(*parts))
                parts = [meta.maml_backward(tasks[g.leader], model, a, ALPHA, v)]
        for p in parts:
            want = [w + x for w, x in zip(want, p)]
    assert flat(want).norm() > 0
    # float64, batched vs task by task (other reduction orders): ~1e-15 of max|g| ~ 50 apart
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("skip", [1, 2])
def test_multi_step_loss_meta_gradient_is_the_autograd_gradient(skip):
    """meta.step_loss = mean: the stacked MAML meta-gradient equals autograd of
    (1/S) sum_s sum_j L_j(theta_s(theta)) through the written-out inner steps (float64), where
    every theta_s is adapted on the leader's one K-shot support set."""
    names = ["sine-0001", "sine-0002", "sine-0003", "sine-0004"]
    model, theta, _ = float64_setup(SINE, names)
    seeds = [700 + i for i in range(len(names))]
    groups = meta.make_groups(len(names), skip, np.random.default_rng(5))
    S = 2
    got, _, _ = meta.groups_step(SINE.make_stack([SINE.make_task(n, s) for n, s in zip(names, seeds)]), model, theta,
                                 groups, "maml", ALPHA, S, step_loss="mean")
    last, _, _ = meta.groups_step(SINE.make_stack([SINE.make_task(n, s) for n, s in zip(names, seeds)]), model, theta,
                                  groups, "maml", ALPHA, S)
    twin = [SINE.make_task(n, s) for n, s in zip(names, seeds)]
    supports = {g.leader: twin[g.leader].sample(model, theta) for g in groups}
    queries = {j: twin[j].sample(model, theta) for g in groups for j in g.members}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    total = 0.0
    for g in groups:
        params = leaves
        for _ in range(S):
            loss, _ = twin[g.leader].loss(model, params, supports[g.leader])
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
            params = {k: p - ALPHA * gr for (k, p), gr in zip(params.items(), grads)}
            total = total + sum(twin[j].loss(model, params, queries[j])[0] for j in g.members) / S
    want = torch.autograd.grad(total, tuple(leaves.values()))
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-9, atol=1e-11)
    assert (flat(got) - flat(last)).norm() > 1e-2 * flat(want).norm()  # the mean is not the last-step loss
