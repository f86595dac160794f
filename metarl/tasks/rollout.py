"""What every rollout task of an episodic game shares (Atari, MinAtar): the actor-critic loss of a
T x B rollout with GAE, and its gradient accumulated over chunks of whole time steps.

A subclass fills `Batch.data` with obs (T+1, B, ...), actions, rewards (training rewards), dones,
logp (T, B: the log-probability of each action taken) and values (T+1, B: what the policy predicted
while sampling, the last one the bootstrap), and sets `self.loss_cfg`.
"""

from __future__ import annotations

import torch
from torch import nn

from metarl.core.config import LossConfig
from metarl.core.losses import actor_critic_loss, gae, ppo_loss
from metarl.core.policy import Params, forward
from metarl.tasks.base import Batch, Task


class ActorCriticTask(Task):
    loss_cfg: LossConfig

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        obs = batch.data["obs"]
        T1, B = obs.shape[:2]
        logits, values = forward(model, params, obs.reshape(T1 * B, *obs.shape[2:]))
        logits, values = logits.reshape(T1, B, -1), values.reshape(T1, B)
        c = self.loss_cfg
        adv, ret = gae(batch.data["rewards"], values[:-1], batch.data["dones"], values[-1], c.gamma, c.gae_lambda)
        loss, parts = actor_critic_loss(
            logits[:-1].reshape(-1, logits.shape[-1]), values[:-1].reshape(-1), batch.data["actions"].reshape(-1),
            adv.reshape(-1), ret.reshape(-1), c.vf_coef, c.ent_coef, c.norm_adv,
        )
        return loss, {k: float(v) for k, v in parts.items()}

    def grad(self, model: nn.Module, params: Params, batch: Batch) -> tuple[tuple[torch.Tensor, ...], float, dict[str, float]]:
        """The gradient of `loss`, accumulated over chunks of about loss.grad_chunk samples (whole
        time steps), so peak memory is set by the chunk, not by rollout_len x num_envs.

        The advantages and returns are constants of the loss (GAE takes detached values), so they
        are computed once from the values the policy recorded while sampling; the gradient is taken
        at those same parameters, so they equal what `loss` recomputes (as CleanRL's PPO does).
        Each chunk's mean terms are weighted by its share of the batch: the sum of the chunks'
        gradients is the whole batch's."""
        c, d = self.loss_cfg, batch.data
        T, B = d["actions"].shape
        steps = T if c.grad_chunk == 0 else max(1, c.grad_chunk // B)
        if steps >= T or "values" not in d:
            return super().grad(model, params, batch)
        adv, ret = self.advantages(batch)
        if c.norm_adv and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        keys = tuple(params)
        grads = [torch.zeros_like(params[k]) for k in keys]
        total, stats = 0.0, {}
        for t0 in range(0, T, steps):
            t1 = min(T, t0 + steps)
            share = (t1 - t0) / T
            logits, v = forward(model, params, d["obs"][t0:t1].flatten(0, 1))
            loss, parts = actor_critic_loss(logits, v, d["actions"][t0:t1].flatten(), adv[t0:t1].flatten(),
                                            ret[t0:t1].flatten(), c.vf_coef, c.ent_coef, norm_adv=False)
            for g, gc in zip(grads, torch.autograd.grad(loss * share, tuple(params[k] for k in keys))):
                g += gc
            total += share * float(loss.detach())
            for k, x in parts.items():
                stats[k] = stats.get(k, 0.0) + share * float(x)
        return tuple(grads), total, stats

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and returns (T x B) from the values the policy recorded while sampling."""
        c, d = self.loss_cfg, batch.data
        return gae(d["rewards"], d["values"][:-1], d["dones"], d["values"][-1], c.gamma, c.gae_lambda)

    def ppo_grad(self, model: nn.Module, params: Params, batch: Batch, adv: torch.Tensor, ret: torch.Tensor,
                 idx: torch.Tensor, clip: float) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient of PPO's clipped loss (losses.ppo_loss) on the samples `idx` of the batch
        (flat indices t * B + b into its T x B steps), advantages normalised within them; `adv` and
        `ret` from `advantages` (computed once per batch, before any update). The loss and stats stay
        tensors on the batch's device: a GPU is not made to wait for them minibatch by minibatch."""
        c, d = self.loss_cfg, batch.data
        if "logp" not in d:
            raise ValueError(f"{type(self).__name__} batches carry no sampling log-probabilities (logp)")
        T, B = d["actions"].shape
        t, b = idx // B, idx % B
        logits, v = forward(model, params, d["obs"][t, b])
        loss, parts = ppo_loss(logits, v, d["actions"][t, b], d["logp"][t, b], d["values"][t, b], adv[t, b],
                               ret[t, b], clip, c.vf_coef, c.ent_coef, c.norm_adv)
        return torch.autograd.grad(loss, tuple(params.values())), loss.detach(), parts
