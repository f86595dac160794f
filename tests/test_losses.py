"""GAE and the actor-critic surrogate against slow reference versions in the paper's notation."""

from __future__ import annotations

import math

import numpy as np
import torch

from metarl.losses import actor_critic_loss, gae, mse


def gae_reference(r, v, done, v_last, gamma, lam):
    """A_t = sum_{l>=0} (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with the
    sum and the bootstrap cut at the end of an episode (Schulman et al. 2016, eq. 16)."""
    T, B = r.shape
    V = np.concatenate([v, v_last[None]], 0)
    A = np.zeros((T, B))
    for b in range(B):
        for t in range(T):
            total, coef = 0.0, 1.0
            for l in range(t, T):
                nonterminal = 1.0 - done[l, b]
                delta = r[l, b] + gamma * V[l + 1, b] * nonterminal - V[l, b]
                total += coef * delta
                if done[l, b]:
                    break
                coef *= gamma * lam
            A[t, b] = total
    return A, A + v


def test_gae_matches_reference_with_episode_ends():
    rng = np.random.default_rng(0)
    T, B = 9, 4
    r, v, v_last = rng.normal(size=(T, B)), rng.normal(size=(T, B)), rng.normal(size=B)
    done = (rng.random((T, B)) < 0.25).astype(np.float64)
    done[3, 0] = 1.0
    for gamma, lam in ((0.99, 0.95), (0.9, 1.0), (0.5, 0.0)):
        A_ref, R_ref = gae_reference(r, v, done, v_last, gamma, lam)
        A, R = gae(*(torch.tensor(x) for x in (r, v, done, v_last)), gamma, lam)
        np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(R.numpy(), R_ref, rtol=1e-10, atol=1e-10)


def test_gae_lambda_one_is_discounted_return_minus_value():
    r = torch.tensor([[1.0], [0.0], [2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5], [0.1], [0.3]], dtype=torch.float64)
    done = torch.zeros(3, 1, dtype=torch.float64)
    A, R = gae(r, v, done, torch.tensor([4.0], dtype=torch.float64), gamma=0.9, lam=1.0)
    G0 = 1.0 + 0.9 * 0.0 + 0.81 * 2.0 + 0.729 * 4.0
    assert math.isclose(float(R[0, 0]), G0, rel_tol=1e-12)
    assert math.isclose(float(A[0, 0]), G0 - 0.5, rel_tol=1e-12)


def ac_loss_reference(logits, values, actions, adv, ret, vf_coef, ent_coef, norm_adv):
    N = len(actions)
    if norm_adv:
        adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)
    pg = v = ent = 0.0
    for n in range(N):
        z = logits[n] - logits[n].max()
        p = np.exp(z) / np.exp(z).sum()
        pg += -math.log(p[actions[n]]) * adv[n]
        v += 0.5 * (values[n] - ret[n]) ** 2
        ent += -(p * np.log(p)).sum()
    return pg / N + vf_coef * v / N - ent_coef * ent / N


def test_actor_critic_loss_matches_reference():
    rng = np.random.default_rng(1)
    N, A = 12, 18
    logits, values = rng.normal(size=(N, A)), rng.normal(size=N)
    actions, adv, ret = rng.integers(A, size=N), rng.normal(size=N), rng.normal(size=N)
    for norm in (True, False):
        ref = ac_loss_reference(logits, values, actions, adv, ret, 0.5, 0.01, norm)
        loss, parts = actor_critic_loss(*(torch.tensor(x) for x in (logits, values, actions, adv, ret)), 0.5, 0.01, norm)
        assert math.isclose(float(loss), ref, rel_tol=1e-9), (float(loss), ref)
        assert set(parts) == {"pg_loss", "v_loss", "entropy"}


def test_policy_gradient_points_towards_advantaged_action():
    logits = torch.zeros(1, 3, requires_grad=True)
    loss, _ = actor_critic_loss(logits, torch.zeros(1), torch.tensor([2]), torch.tensor([1.0]),
                                torch.zeros(1), vf_coef=0.0, ent_coef=0.0, norm_adv=False)
    loss.backward()
    assert logits.grad[0, 2] < 0 < logits.grad[0, 0]  # descending raises the advantaged action's logit


def test_mse():
    assert float(mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))) == 5.0
