"""GAE and the actor-critic surrogate against slow reference versions in the paper's notation."""

from __future__ import annotations

import math

import numpy as np
import torch

from metarl.core.losses import actor_critic_loss, gae, mse, ppo_loss


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


def ppo_inputs(seed: int = 2, N: int = 16, A: int = 6):
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(size=(N, A)), requires_grad=True)
    values = torch.tensor(rng.normal(size=N), requires_grad=True)
    actions = torch.tensor(rng.integers(A, size=N))
    adv, ret = torch.tensor(rng.normal(size=N)), torch.tensor(rng.normal(size=N))
    return logits, values, actions, adv, ret


def test_ppo_loss_at_the_sampling_parameters_has_the_actor_critic_gradient():
    """r = 1 and V = V_old: no clip is active, and the clipped surrogate's gradient is the
    actor-critic surrogate's (both for the logits and the values)."""
    logits, values, actions, adv, ret = ppo_inputs()
    logp_old = torch.log_softmax(logits.detach(), -1).gather(-1, actions[:, None]).squeeze(-1)
    loss, parts = ppo_loss(logits, values, actions, logp_old, values.detach(), adv, ret, 0.1, 0.5, 0.01)
    g_ppo = torch.autograd.grad(loss, (logits, values))
    ac, _ = actor_critic_loss(logits, values, actions, adv, ret, 0.5, 0.01)
    g_ac = torch.autograd.grad(ac, (logits, values))
    for a, b in zip(g_ppo, g_ac):
        assert torch.allclose(a, b, atol=1e-12)
    assert abs(float(parts["approx_kl"])) < 1e-12 and float(parts["clipfrac"]) == 0.0


def test_ppo_clip_stops_the_policy_gradient_past_the_trust_region():
    """A sample whose ratio already left [1 - c, 1 + c] in its advantage's direction contributes no
    policy gradient; one that moved against its advantage still does."""
    logits = torch.zeros(2, 3, requires_grad=True)
    actions, adv = torch.tensor([0, 0]), torch.tensor([1.0, -1.0])
    logp_now = float(torch.log_softmax(torch.zeros(3), -1)[0])
    logp_old = torch.tensor([logp_now - 0.5, logp_now - 0.5])  # both ratios e^0.5 ~ 1.65 > 1.1
    loss, parts = ppo_loss(logits, torch.zeros(2), actions, logp_old, torch.zeros(2), adv, torch.zeros(2),
                           clip=0.1, vf_coef=0.0, ent_coef=0.0, norm_adv=False)
    loss.backward()
    assert torch.all(logits.grad[0] == 0)  # positive advantage, ratio above 1 + c: clipped
    assert logits.grad[1, 0] > 0  # negative advantage, ratio above 1: still pushed down
    assert float(parts["clipfrac"]) == 1.0 and float(parts["approx_kl"]) > 0


def test_ppo_value_clip_takes_the_larger_error():
    """The value term is max((V-R)^2, (V_old + clip(V - V_old) - R)^2) / 2."""
    values, values_old, ret = torch.tensor([1.0, 0.05]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0])
    _, parts = ppo_loss(torch.zeros(2, 3), values, torch.tensor([0, 1]), torch.full((2,), -math.log(3)), values_old,
                        torch.zeros(2), ret, clip=0.1, vf_coef=1.0, ent_coef=0.0, norm_adv=False)
    # sample 0: unclipped (1-2)^2 = 1, clipped (0.1-2)^2 = 3.61; sample 1: both 0.0025
    assert math.isclose(float(parts["v_loss"]), 0.5 * (3.61 + 0.0025) / 2, rel_tol=1e-6)
