"""Atari 2600 games as tasks, stepped by ale-py's C++ vector environment.

Every game uses the full 18-action set so one network fits all; observations are 84x84 gray,
4-frame stacks, frameskip 4 with max-pooling, up to 30 no-op starts, sticky actions 0.25 and no
life-loss termination (Machado et al. 2018). The emulator always returns raw rewards: training
clips them to their sign here (so logged returns stay the real game score); evaluation does not.
Environments persist across rollouts (A2C-style): an episode continues through parameter changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metarl.core.families import TRAITS
from metarl.core.config import EnvConfig, LossConfig
from metarl.core.policy import NUM_ATARI_ACTIONS, NatureCNN, Params, forward, params_device
from metarl.tasks.base import Batch, Task, TaskFamily
from metarl.tasks.rollout import ActorCriticTask


def make_vector_env(game: str, env: EnvConfig, seed: int, num_envs: int | None = None):
    """An AtariVectorEnv with metarl's protocol (raw rewards; clipping happens in the task)."""
    from ale_py.vector_env import AtariVectorEnv

    venv = AtariVectorEnv(
        game,
        num_envs or env.num_envs,
        num_threads=env.env_threads,
        repeat_action_probability=env.sticky_actions,
        full_action_space=True,
        frameskip=env.frameskip,
        noop_max=env.noop_max,
        episodic_life=False,
        reward_clipping=False,
        max_num_frames_per_episode=env.max_episode_frames,
        autoreset_mode="SameStep",
    )
    obs, _ = venv.reset(seed=seed)
    return venv, obs


def split_envs(num_envs: int, min_part: int = 4) -> list[slice]:
    """The emulators in two halves, so that while one half steps in its C++ thread the policy acts
    for the other (double-buffered sampling); one part when the halves would be smaller than
    `min_part`, where the policy's per-call cost outweighs the overlap."""
    if num_envs < 2 * min_part:
        return [slice(0, num_envs)]
    return [slice(0, num_envs // 2), slice(num_envs // 2, num_envs)]


class AtariTask(ActorCriticTask):
    def __init__(self, game: str, seed: int, env: EnvConfig, loss: LossConfig, emulators: bool = True):
        self.name = game
        self.env_cfg, self.loss_cfg = env, loss
        self.B, self.T = env.num_envs, env.rollout_len
        self.venvs = []
        if not emulators:  # a scorer: loss and grad of shipped batches only (the learner's)
            return
        self.parts = split_envs(self.B)
        # emulator i is seeded seed + i whichever part it sits in
        made = [make_vector_env(game, env, seed + p.start, p.stop - p.start) for p in self.parts]
        self.venvs = [venv for venv, _ in made]
        self.obs = np.concatenate([obs for _, obs in made])
        self.gen = torch.Generator().manual_seed(seed)
        self.ep_return = np.zeros(self.B, dtype=np.float64)

    @torch.no_grad()
    def sample(self, model: nn.Module, params: Params) -> Batch:
        """T steps of every emulator. With two parts the emulators of one step while the policy acts
        for the other, and only one part steps at a time (the emulator threads stay as configured)."""
        T, B = self.T, self.B
        buf = {"obs": np.empty((T + 1, B, *self.obs.shape[1:]), dtype=np.uint8),
               "actions": np.empty((T, B), dtype=np.int64), "rewards": np.empty((T, B), dtype=np.float32),
               "dones": np.empty((T, B), dtype=np.float32), "values": np.empty((T + 1, B), dtype=np.float32),
               "logp": np.empty((T, B), dtype=np.float32)}
        buf["obs"][0] = self.obs
        finished: list[float] = []
        order = [(t, part) for t in range(T) for part in range(len(self.parts))]
        overlap = len(self.parts) > 1
        self._act(model, params, buf, *order[0])
        self._send(buf, *order[0])
        for k, (t, part) in enumerate(order):
            nxt = order[k + 1] if k + 1 < len(order) else None
            if nxt and overlap:
                self._act(model, params, buf, *nxt)
            self._recv(buf, t, part, finished)
            if nxt:
                if not overlap:
                    self._act(model, params, buf, *nxt)
                self._send(buf, *nxt)
        self.obs = buf["obs"][T].copy()
        device = params_device(params)
        buf["values"][T] = forward(model, params, torch.from_numpy(self.obs).to(device))[1].float().cpu().numpy()  # bootstrap
        raw_sum = float(buf["rewards"].sum())
        if self.env_cfg.reward_clip:
            np.sign(buf["rewards"], out=buf["rewards"])
        data = {k: torch.from_numpy(v).to(device) for k, v in buf.items()}
        return Batch(data, env_steps=T * B, episode_returns=finished, reward_sum=raw_sum,
                     frames=T * B * self.env_cfg.frameskip)

    def _act(self, model: nn.Module, params: Params, buf: dict[str, np.ndarray], t: int, part: int) -> None:
        """Draw step t's actions for one part from the policy."""
        s = self.parts[part]
        logits, values = forward(model, params, torch.from_numpy(buf["obs"][t, s]).to(params_device(params)))
        logits = logits.float().cpu()  # actions drawn on the CPU from the task's generator, whatever the device
        actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.gen)
        buf["values"][t, s] = values.float().cpu().numpy()
        buf["actions"][t, s] = actions.squeeze(-1).numpy()
        buf["logp"][t, s] = torch.log_softmax(logits, -1).gather(-1, actions).squeeze(-1).numpy()

    def _send(self, buf: dict[str, np.ndarray], t: int, part: int) -> None:
        self.venvs[part].send(buf["actions"][t, self.parts[part]])

    def _recv(self, buf: dict[str, np.ndarray], t: int, part: int, finished: list[float]) -> None:
        """Wait for one part's step t; record it and the raw returns of episodes that ended."""
        s = self.parts[part]
        buf["obs"][t + 1, s], r, term, trunc, _ = self.venvs[part].recv()
        done = np.logical_or(term, trunc)
        ep_return = self.ep_return[s]  # a view: updated in place
        ep_return += r
        finished.extend(ep_return[done].tolist())
        ep_return[done] = 0.0
        buf["rewards"][t, s], buf["dones"][t, s] = r, done

    def close(self) -> None:
        for venv in self.venvs:
            venv.close()


@dataclass(frozen=True)
class AtariFamily(TaskFamily):
    """One ALE game per task, under the protocol of EnvConfig; the Nature CNN."""

    traits = TRAITS["atari"]
    env: EnvConfig
    loss: LossConfig

    def make_model(self) -> nn.Module:
        return NatureCNN(NUM_ATARI_ACTIONS)

    obs_bytes = 4 * 84 * 84  # a 4-frame stack of 84 x 84 gray frames, uint8

    @property
    def frames_per_step(self) -> int:  # type: ignore[override]
        return self.env.frameskip

    def make_task(self, name: str, seed: int) -> Task:
        return AtariTask(name, seed, self.env, self.loss)

    def raw_stepper(self, name: str, seed: int):
        venv, _ = make_vector_env(name, self.env, seed)
        rng = np.random.default_rng(seed)

        def step(n: int) -> None:
            for _ in range(n):
                venv.step(rng.integers(0, venv.single_action_space.n, self.env.num_envs, dtype=np.int32))

        return step, venv.close

    def make_scorer(self) -> Task:
        return AtariTask("scorer", 0, self.env, self.loss, emulators=False)
