"""MinAtar games as tasks: the CPU-scale Atari (Young & Tian 2019, the `minatar` package).

One task is one game with B environments (env.num_envs) stepped by the task's worker, T steps per
rollout (env.rollout_len). Every game acts with MinAtar's full set of 6 actions (one output layer
fits all, as the 18 ALE actions do on Atari) and uses MinAtar's defaults: sticky actions 0.1 and
difficulty ramping (minatar.*). Observations are the games' binary object channels, channels
first and zero-padded to Seaquest's 10 so that one network fits every game:

  asterix         player, enemy, trail, gold                                        (4)
  breakout        paddle, ball, trail, brick                                        (4)
  freeway         chicken, car, speed1 .. speed5                                    (7)
  seaquest        sub_front, sub_back, friendly_bullet, trail, enemy_bullet,
                  enemy_fish, enemy_sub, oxygen_guage, diver_guage, diver           (10)
  space_invaders  cannon, alien, alien_left, alien_right, friendly_bullet,
                  enemy_bullet                                                      (6)

Rewards are the games' own (small integers): training uses them unclipped and the logged returns
are the raw episode scores. Environments persist across rollouts, as on Atari: an episode goes on
through parameter changes. `minatar` is GPL-licensed and an optional extra (`metarl[minatar]`);
only this module imports it, when a task is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metarl.core.families import MINATAR_GAMES, TRAITS
from metarl.core.config import EnvConfig, LossConfig, MinAtarConfig
from metarl.core.policy import MINATAR_CHANNELS, NUM_MINATAR_ACTIONS, MinAtarNet, Params, forward, params_device
from metarl.tasks.base import Batch, Task, TaskFamily
from metarl.tasks.rollout import ActorCriticTask


def make_games(game: str, cfg: MinAtarConfig, seed: int, n: int) -> list:
    """n MinAtar environments of one game, game i seeded seed + i and reset."""
    try:
        from minatar import Environment
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("tasks.family = minatar needs the minatar package: pip install 'metarl[minatar]'") from e
    games = []
    for i in range(n):
        g = Environment(game, sticky_action_prob=cfg.sticky_actions, difficulty_ramping=cfg.difficulty_ramping)
        g.seed(seed + i)
        g.reset()
        games.append(g)
    return games


def write_state(out: np.ndarray, game) -> None:
    """One game's state (10 x 10 x C bool) into a 10-channel channels-first uint8 slot."""
    state = game.state()
    out[: state.shape[2]] = state.transpose(2, 0, 1)


class MinAtarTask(ActorCriticTask):
    def __init__(self, game: str, seed: int, env: EnvConfig, minatar: MinAtarConfig, loss: LossConfig,
                 games: bool = True):
        self.name = game
        self.cfg, self.loss_cfg = minatar, loss
        self.B, self.T = env.num_envs, env.rollout_len
        self.games = []
        if not games:  # a scorer: loss and grad of shipped batches only (the learner's)
            return
        self.games = make_games(game, minatar, seed, self.B)
        self.obs = np.zeros((self.B, MINATAR_CHANNELS, 10, 10), dtype=np.uint8)
        for i, g in enumerate(self.games):
            write_state(self.obs[i], g)
        self.gen = torch.Generator().manual_seed(seed)
        self.ep_return = [0.0] * self.B  # plain lists: per-game scalar updates in the hot loop
        self.ep_len = [0] * self.B

    @torch.no_grad()
    def sample(self, model: nn.Module, params: Params) -> Batch:
        """T steps of every game, acting with `params`; an episode that ends (or reaches
        minatar.max_episode_steps) is recorded with its raw score and its game reset."""
        T, B, limit = self.T, self.B, self.cfg.max_episode_steps
        obs = np.zeros((T + 1, B, MINATAR_CHANNELS, 10, 10), dtype=np.uint8)
        actions = np.empty((T, B), dtype=np.int64)
        rewards = np.zeros((T, B), dtype=np.float32)
        dones = np.zeros((T, B), dtype=np.float32)
        values = np.empty((T + 1, B), dtype=np.float32)
        logps = np.empty((T, B), dtype=np.float32)
        obs[0] = self.obs
        finished: list[float] = []
        ep_return, ep_len, games = self.ep_return, self.ep_len, self.games
        device = params_device(params)  # the batch lives where the parameters that collected it do
        for t in range(T):
            logits, v = forward(model, params, torch.from_numpy(obs[t]).to(device))
            values[t] = v.float().cpu().numpy()
            # inverse-CDF draw from the softmax (one uniform per game): as torch.multinomial, cheaper
            logits = logits.float().cpu()  # actions drawn on the CPU from the task's generator
            cdf = torch.softmax(logits, -1).cumsum(-1)
            u = torch.rand(B, 1, generator=self.gen) * cdf[:, -1:]
            a = torch.searchsorted(cdf, u).clamp_(max=NUM_MINATAR_ACTIONS - 1)
            actions[t] = a.squeeze(-1).numpy()
            logps[t] = torch.log_softmax(logits, -1).gather(-1, a).squeeze(-1).numpy()
            r_t, d_t, next_obs = rewards[t], dones[t], obs[t + 1]
            for i, (g, a) in enumerate(zip(games, actions[t].tolist())):
                r, terminal = g.act(a)
                ep_return[i] += r
                ep_len[i] += 1
                r_t[i] = r
                if terminal or (limit and ep_len[i] >= limit):
                    finished.append(float(ep_return[i]))
                    ep_return[i], ep_len[i] = 0.0, 0
                    d_t[i] = 1.0
                    g.reset()
                write_state(next_obs[i], g)
        self.obs = obs[T].copy()
        values[T] = forward(model, params, torch.from_numpy(self.obs).to(device))[1].float().cpu().numpy()  # bootstrap
        data = {k: torch.from_numpy(v).to(device) for k, v in (("obs", obs), ("actions", actions), ("rewards", rewards),
                                                                ("dones", dones), ("values", values), ("logp", logps))}
        return Batch(data, env_steps=T * B, episode_returns=finished, reward_sum=float(rewards.sum()),
                     frames=T * B)


def random_stepper(game: str, cfg: MinAtarConfig, num_envs: int, seed: int = 0):
    """The emulator limit the bench compares against: step(n) steps `num_envs` games of one game n
    times with uniformly random actions, resets and state reads included, no policy and no buffers."""
    games = make_games(game, cfg, seed, num_envs)
    rng = np.random.default_rng(seed)

    def step(n: int) -> None:
        acts = rng.integers(0, NUM_MINATAR_ACTIONS, size=(n, num_envs))
        for t in range(n):
            for i, g in enumerate(games):
                _, terminal = g.act(int(acts[t, i]))
                if terminal:
                    g.reset()
                g.state()

    return step, lambda: None


def raw_steps_per_second(game: str, cfg: MinAtarConfig, num_envs: int, steps: int, seed: int = 0) -> float:
    step, _ = random_stepper(game, cfg, num_envs, seed)
    t0 = time.perf_counter()
    step(steps)
    return steps * num_envs / (time.perf_counter() - t0)


@dataclass(frozen=True)
class MinAtarFamily(TaskFamily):
    traits = TRAITS["minatar"]
    env: EnvConfig
    minatar: MinAtarConfig
    loss: LossConfig

    obs_bytes = MINATAR_CHANNELS * 10 * 10  # binary channels, uint8

    def make_model(self) -> nn.Module:
        return MinAtarNet(NUM_MINATAR_ACTIONS)

    def make_task(self, name: str, seed: int) -> Task:
        if name not in MINATAR_GAMES:
            raise ValueError(f"unknown MinAtar game {name!r}; valid games: {', '.join(MINATAR_GAMES)}")
        return MinAtarTask(name, seed, self.env, self.minatar, self.loss)

    def raw_stepper(self, name: str, seed: int):
        return random_stepper(name, self.minatar, self.env.num_envs, seed)

    def make_scorer(self) -> Task:
        return MinAtarTask("scorer", 0, self.env, self.minatar, self.loss, games=False)
