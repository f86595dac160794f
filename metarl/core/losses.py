"""Pure loss functions: GAE, the actor-critic policy-gradient surrogate, regression MSE.

Shapes are written T (time) x B (batch of environments). Nothing here knows about Ray, workers or
configs: every function takes tensors and numbers and returns tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    rewards, values, dones: T x B; dones[t] = 1 when the episode ended with the step taken at t.
    last_value: B, the value of the observation after the last step (bootstrap).
    Returns (advantages, returns), both T x B, with no gradient flowing through them.
    """
    rewards, values, dones, last_value = (x.detach() for x in (rewards, values, dones, last_value))
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_value)
    next_value = last_value
    for t in range(T - 1, -1, -1):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        next_adv = delta + gamma * lam * nonterminal * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv, adv + values


def actor_critic_loss(logits: torch.Tensor, values: torch.Tensor, actions: torch.Tensor,
                      advantages: torch.Tensor, returns: torch.Tensor, vf_coef: float, ent_coef: float,
                      norm_adv: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-E[log pi(a|s) A] + vf_coef * E[(V - R)^2] / 2 - ent_coef * E[H(pi)].

    logits: N x A, values/actions/advantages/returns: N (flatten T x B first). The seed's eq. (1),
    -E[sum_t R_t], is the special case A = return, vf_coef = ent_coef = 0.
    """
    if norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    pg_loss = -(logp * advantages.detach()).mean()
    v_loss = 0.5 * (values - returns.detach()).pow(2).mean()
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    loss = pg_loss + vf_coef * v_loss - ent_coef * entropy
    return loss, {"pg_loss": pg_loss.detach(), "v_loss": v_loss.detach(), "entropy": entropy.detach()}


def gaussian_pg_loss(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor,
                     advantages: torch.Tensor, norm_adv: bool = True) -> torch.Tensor:
    """REINFORCE surrogate for a diagonal Gaussian policy: -E[log N(a; mean, std) A].

    mean, actions: N x D; log_std: D; advantages: N.
    """
    if norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return -(gaussian_log_prob(actions, mean, log_std) * advantages.detach()).mean()


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over the last (action) dimension."""
    var = torch.exp(2 * log_std)
    return (-0.5 * (actions - mean).pow(2) / var - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, the MAML paper's regression loss."""
    return (pred - target).pow(2).mean()


def ppo_loss(logits: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, logp_old: torch.Tensor,
             values_old: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor, clip: float,
             vf_coef: float, ent_coef: float, norm_adv: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017) with a clipped value loss:
    -E[min(r A, clip(r, 1-c, 1+c) A)] + vf_coef * E[max((V-R)^2, (V_old + clip(V-V_old, -c, c) - R)^2)] / 2
    - ent_coef * E[H(pi)], r = pi(a|s) / pi_old(a|s).

    All inputs N (logits N x A); logp_old and values_old are what the policy recorded while sampling.
    At the sampling parameters (r = 1, V = V_old) its gradient is actor_critic_loss's. clip = 0: no
    clipping, -E[r A] + vf_coef * E[(V-R)^2] / 2 - ent_coef * E[H(pi)]."""
    if norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    log_ratio = logp - logp_old
    ratio = log_ratio.exp()
    values = values.float()
    if clip > 0:
        pg_loss = -torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages).mean()
        v_clipped = values_old + (values - values_old).clamp(-clip, clip)
        v_loss = 0.5 * torch.max((values - returns).pow(2), (v_clipped - returns).pow(2)).mean()
    else:  # no clip: the importance-weighted actor-critic surrogate
        pg_loss = -(ratio * advantages).mean()
        v_loss = 0.5 * (values - returns).pow(2).mean()
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    loss = pg_loss + vf_coef * v_loss - ent_coef * entropy
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()  # Schulman's low-variance KL estimator
        clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
    return loss, {"pg_loss": pg_loss.detach(), "v_loss": v_loss.detach(), "entropy": entropy.detach(),
                  "approx_kl": approx_kl, "clipfrac": clipfrac}
