"""The KL-constrained outer step (meta.outer = trpo): the workers' curvature products against
autograd through the inner steps, the solver and line search on known quadratics, and the step
through a real run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl.core import meta, trust
from metarl.core.config import LossConfig, Nav2dConfig
from metarl.core.policy import init_params
from metarl.tasks.nav2d import Nav2dFamily

NAV = Nav2dFamily(Nav2dConfig(episodes=3, horizon=8, hidden=(6,), init_log_std=-0.5), LossConfig(ent_coef=0.01))
NAMES = ["goal-0001", "goal-0002", "goal-0003", "goal-0004", "goal-0005"]
ALPHA = 0.3


def kept_iteration(algo: str, skip: int, inner_steps: int):
    """One stacked iteration in float64 with what a worker keeps for the trust region."""
    torch.manual_seed(0)
    model = NAV.make_model().double()
    theta = init_params(model)
    stack = NAV.make_stack([NAV.make_task(n, 700 + i) for i, n in enumerate(NAMES)])
    groups = meta.make_groups(len(NAMES), skip, np.random.default_rng(5))
    keep: list = []
    grads, _, eval_stats = meta.groups_step(stack, model, theta, groups, algo, ALPHA, inner_steps, keep=keep)
    region = meta.TrustRegion(stack, model, *keep, second_order=algo == "maml", inner_lr=ALPHA)
    return model, theta, stack, keep, region, grads, eval_stats


def post_update(stack, model, theta, adaptation, lead_row, differentiable: bool):
    """theta' of every member row as a function of theta: the inner SGD steps on the stored batches."""
    n = next(iter(adaptation.theta_prime.values())).shape[0]
    rows = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in theta.items()}
    for batch in adaptation.batches:
        g = torch.autograd.grad(stack.losses(model, rows, batch).sum(), tuple(rows.values()), create_graph=differentiable)
        rows = {k: v - ALPHA * gi for (k, v), gi in zip(rows.items(), g)}
    index = torch.tensor(lead_row)
    return {k: v.index_select(0, index) for k, v in rows.items()}


@pytest.mark.parametrize("algo,skip,inner_steps", [("maml", 1, 1), ("maml", 2, 2), ("fomaml", 2, 1)])
def test_kl_hessian_products_match_autograd_through_the_inner_steps(algo, skip, inner_steps):
    """TrustRegion.fvp = the Hessian of the members' summed KL(pi_old || pi_theta'(theta)) in theta
    times v, by third-order autograd through the written-out inner steps (maml; first order: the
    KL's Hessian in theta' itself). The objective at theta re-derives the kept theta' (KL 0)."""
    model, theta, stack, (a, lead_row, batch), region, grads, eval_stats = kept_iteration(algo, skip, inner_steps)
    surrogate, kl = region.objective(theta)
    at_kept = stack.surrogate_kl(model, meta.take_rows(a.theta_prime, lead_row), batch, region.old)[0].sum()
    assert surrogate == pytest.approx(float(at_kept), rel=1e-9)
    assert kl == pytest.approx(0.0, abs=1e-12)
    moved = {k: v + 0.05 for k, v in theta.items()}
    assert region.objective(moved)[1] > 1e-4  # elsewhere theta' moves and so does the policy

    p = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    if algo == "maml":
        members = post_update(stack, model, p, a, lead_row, differentiable=True)
        wrt = tuple(p.values())
    else:
        members = {k: v.detach().index_select(0, torch.tensor(lead_row)).requires_grad_(True)
                   for k, v in a.theta_prime.items()}
        wrt = tuple(members.values())
    total_kl = stack.surrogate_kl(model, members, batch, region.old)[1].sum()
    g_kl = torch.autograd.grad(total_kl, wrt, create_graph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        v = tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in theta.values())
        if algo == "maml":
            want = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g_kl, v)), wrt, retain_graph=True)
        else:  # J = I: the Fisher of each member row at its theta', summed over rows
            rows = tuple(vi.unsqueeze(0).expand_as(gi) for vi, gi in zip(v, g_kl))
            want = tuple(h.sum(0) for h in torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g_kl, rows)), wrt,
                                                              retain_graph=True))
        got = region.fvp(v)
        for x, y in zip(got, want):  # float64, other reduction orders: ~1e-15 relative apart, 1e-8 allowed
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    if algo == "maml":  # the surrogate's gradient at theta is the meta-gradient the worker reported
        surr = stack.surrogate_kl(model, post_update(stack, model, p, a, lead_row, differentiable=True), batch,
                                  region.old)[0].sum()
        for x, y in zip(torch.autograd.grad(surr, tuple(p.values())), grads):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


def test_subsampled_products_use_a_fraction_of_the_samples_and_stay_positive():
    """fisher_fraction < 1: a different (cheaper) curvature estimate, still a positive quadratic form."""
    model, theta, stack, keep, full, _, _ = kept_iteration("maml", 1, 1)
    sub = meta.TrustRegion(stack, model, *keep, second_order=True, inner_lr=ALPHA, fraction=0.3)
    v = tuple(torch.randn(x.shape, dtype=torch.float64) for x in theta.values())
    a_full = sum((x * y).sum() for x, y in zip(full.fvp(v), v))
    a_sub = sum((x * y).sum() for x, y in zip(sub.fvp(v), v))
    assert a_full > 0 and a_sub > 0 and not torch.isclose(a_full, a_sub)


def test_conjugate_gradient_solves_a_positive_definite_system():
    """The solver's promise, not a residual one machine reached: it stops once |r|^2 < tol, i.e.
    |r| < sqrt(tol) = 1e-5, and reports |r| = |b - A x|. Which iteration first crosses the threshold,
    and how far below it lands, depends on the BLAS's rounding (e.g. 34 iterations, |r| = 5.7e-6)."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(30, 30))
    a = m @ m.T + 0.5 * np.eye(30)  # eigenvalues in [0.5, ~120]: cond ~240
    b = rng.normal(size=30)
    products = []

    def fvp(v):
        products.append(v)
        return a @ v

    x, residual = trust.conjugate_gradient(fvp, b, iters=60)
    bound = np.sqrt(1e-10)  # conjugate_gradient's default tol is on |r|^2
    assert len(products) < 60 and residual < bound  # stopped by the tolerance, not by running out
    # the recurrence's |r| drifts from the true one only by float64 rounding, <~ iters eps |A| |x|
    rounding = 60 * np.finfo(np.float64).eps * np.linalg.norm(a, 2) * np.linalg.norm(x)
    true = b - a @ x
    assert abs(residual - np.linalg.norm(true)) <= rounding
    # no element of r exceeds |r|, and x is within |r| / lambda_min(A) of A^-1 b
    np.testing.assert_allclose(a @ x, b, rtol=0, atol=bound + rounding)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=0, atol=(bound + rounding) / np.linalg.eigvalsh(a)[0])


def test_step_meets_the_kl_bound_on_a_quadratic():
    """Linear surrogate g.(theta - theta0), curvature products A, true KL 0.45 d^T A d: the full step
    (sized for 1/2 d^T A d = max_kl) is accepted at 0.9 max_kl, along -A^-1 g."""
    rng = np.random.default_rng(1)
    m = rng.normal(size=(8, 8))
    a = m @ m.T + np.eye(8)
    theta0, g = rng.normal(size=8), rng.normal(size=8)

    def objective(theta):
        d = theta - theta0
        return float(g @ d), float(0.45 * d @ a @ d)

    res = trust.trust_region_step(theta0, g, lambda v: a @ v, objective, max_kl=0.02, cg_iters=20, damping=0.0)
    assert res.accepted and res.fraction == 1.0
    # d^T A d = 2 max_kl for any CG output s (the step is scaled by s^T A s): exact up to float64 rounding
    assert res.kl == pytest.approx(0.9 * 0.02, rel=1e-6)
    d = res.theta - theta0
    want = -np.linalg.solve(a, g)
    # CG's stopping rule promises |g - A s| < sqrt(1e-10), so |s - A^-1 g| < 1e-5 / lambda_min(A) and
    # the unit directions differ by at most twice that over |A^-1 g|
    assert res.cg_residual < 1e-5
    bound = 2 * 1e-5 / (np.linalg.eigvalsh(a)[0] * np.linalg.norm(want))
    np.testing.assert_allclose(d / np.linalg.norm(d), want / np.linalg.norm(want), rtol=0, atol=bound)
    assert res.surrogate_after < res.surrogate_before


def test_backtracks_then_rejects_when_no_candidate_improves():
    """A surrogate that only worsens along the step: every shrunken candidate fails, theta is kept."""
    theta0, g = np.zeros(3), np.array([1.0, 0.0, 0.0])

    def objective(theta):
        return float(np.sum(theta ** 2)), 0.0  # minimum at theta0: no step improves it

    res = trust.trust_region_step(theta0, g, lambda v: v, objective, max_kl=0.01, cg_iters=5)
    assert not res.accepted and res.fraction == 0.0
    np.testing.assert_array_equal(res.theta, theta0)

    def kl_too_big(theta):  # improves, but the KL is over the bound at every fraction tried
        return float(theta[0]), 1.0

    res = trust.trust_region_step(theta0, g, lambda v: v, kl_too_big, max_kl=0.01, cg_iters=5)
    assert not res.accepted


def test_subsampled_products_do_not_depend_on_how_groups_are_split_over_workers():
    """Each row's curvature subsample comes from its own seed: the products of one region holding
    every group equal the sum over two regions holding half the groups each (two workers)."""
    torch.manual_seed(0)
    model = NAV.make_model().double()
    theta = init_params(model)
    groups = meta.make_groups(len(NAMES), 2, np.random.default_rng(5))
    seed_of = {i: 1000 + 17 * i for i in range(len(NAMES))}

    def region(share):
        stack = NAV.make_stack([NAV.make_task(n, 700 + i) for i, n in enumerate(NAMES)])
        keep: list = []
        meta.groups_step(stack, model, theta, share, "maml", ALPHA, 1, keep=keep)
        seeds = ([seed_of[g.leader] for g in share], [seed_of[j] + 1 for g in share for j in g.members])
        return meta.TrustRegion(stack, model, *keep, second_order=True, inner_lr=ALPHA, fraction=0.4, row_seeds=seeds)

    v = tuple(torch.randn(x.shape, dtype=torch.float64) for x in theta.values())
    whole = region(groups).fvp(v)
    halves = [region(groups[:2]).fvp(v), region(groups[2:]).fvp(v)]
    for w, a, b in zip(whole, *halves):  # the same float64 terms summed in another order: rounding only
        torch.testing.assert_close(w, a + b, rtol=1e-9, atol=1e-12)
