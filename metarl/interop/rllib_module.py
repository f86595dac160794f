"""theta leaves metarl as an RLlib RLModule: export, and PPO fine-tuning from it with RLlib.

`MetarlModule` is an RLlib (new API stack) TorchRLModule whose network is the task family's own
(`TaskFamily.make_model()`: Atari's Nature CNN, the MinAtar network), so theta's flat vector loads
into it by name and its action logits and values are metarl's forward at theta. It implements
`ValueFunctionAPI` with the network's own value head, which RLlib's PPO needs.

  metarl export --checkpoint RUN_OR_CKPT --out DIR       an RLModule checkpoint of theta
  metarl ppo --checkpoint RUN_OR_CKPT --game G --steps N --out DIR
                                                         RLlib PPO (finetune.*) on G starting from theta
  metarl eval --checkpoint ... --learner rllib-ppo       the held-out comparison with RLlib's PPO

The games RLlib steps are metarl's own emulators, one per gymnasium env: Atari through the same
ale-py vector env (`tasks.atari.make_vector_env`, one emulator) as training, MinAtar through the
same `tasks.minatar.make_games`, so preprocessing, sticky actions, no-op starts and episode limits
are the protocol's by construction. What RLlib forces: it clips nothing itself, so the env returns
the sign-clipped reward when env.reward_clip is set and RLlib's own `episode_return_*` metrics are
then clipped scores; the raw game scores are logged beside them (`metarl/raw_return`,
`metarl/raw_reward`) by `RawScore` and are what `metarl eval` scores. nav2d is refused: its
policy has no value head (metarl fits a linear baseline per batch) and it is not a gymnasium env.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule

from metarl.core import checkpoint
from metarl.core.config import Config, ConfigError, EnvConfig, LossConfig, MinAtarConfig
from metarl.core.families import TRAITS
from metarl.core.policy import MINATAR_CHANNELS, NUM_ATARI_ACTIONS, NUM_MINATAR_ACTIONS, ParamSpec
from metarl.core.seeds import task_seed
from metarl.tasks.atari import AtariFamily, make_vector_env

RLLIB_FAMILIES = tuple(n for n, t in TRAITS.items() if t.games)  # episodic games with a value head
PPO_LEARNER = "rllib-ppo"


def network(family: str) -> torch.nn.Module:
    """The family's own network (`TaskFamily.make_model`), freshly initialised."""
    if family == "atari":
        return AtariFamily(EnvConfig(), LossConfig()).make_model()
    if family == "minatar":
        from metarl.tasks.minatar import MinAtarFamily  # the optional minatar package: imported only when used

        return MinAtarFamily(EnvConfig(), MinAtarConfig(), LossConfig()).make_model()
    raise ConfigError(refusal(family))


def refusal(family: str) -> str:
    why = (" (its Gaussian policy has no value head for PPO: metarl fits a linear baseline per batch)"
           if family == "nav2d" else "")
    return f"tasks.family '{family}' cannot leave as an RLlib module{why}; supported: {', '.join(RLLIB_FAMILIES)}"


def spaces(family: str) -> tuple[gym.spaces.Box, gym.spaces.Discrete]:
    """Observation and action spaces of the family's protocol (channels first, uint8)."""
    if family == "atari":
        return gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), gym.spaces.Discrete(NUM_ATARI_ACTIONS)
    if family == "minatar":
        return gym.spaces.Box(0, 1, (MINATAR_CHANNELS, 10, 10), np.uint8), gym.spaces.Discrete(NUM_MINATAR_ACTIONS)
    raise ConfigError(refusal(family))


class MetarlModule(TorchRLModule, ValueFunctionAPI):
    """metarl's network for model_config["family"] as an RLModule: one forward gives the logits
    and the value. `_forward_train` hands the value on as the "embeddings" PPO's learner passes
    back to `compute_values`, so a training step runs the network once."""

    def setup(self):
        self.net = network(self.model_config["family"])

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        logits, _ = self.net(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: logits}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        logits, values = self.net(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: logits, Columns.EMBEDDINGS: values}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        if embeddings is not None:
            return embeddings
        return self.net(batch[Columns.OBS])[1]


def module_spec(family: str, load_state_path: str | Path | None = None) -> RLModuleSpec:
    obs_space, act_space = spaces(family)
    return RLModuleSpec(module_class=MetarlModule, observation_space=obs_space, action_space=act_space,
                        model_config={"family": family},
                        load_state_path=None if load_state_path is None else str(load_state_path))


def build_module(family: str, theta: np.ndarray) -> MetarlModule:
    """A MetarlModule holding theta (the flat vector, laid out by the network's ParamSpec)."""
    module = module_spec(family).build()
    params = ParamSpec.of(module.net).unflatten(theta)
    module.net.load_state_dict(params, strict=True)
    return module


# ------------------------------------------------------------------------------------------
# export


def load_theta(path: Path) -> tuple[Path, dict[str, Any], Config, np.ndarray]:
    """A metarl checkpoint (file or run directory) whose family can leave: path, state, config, theta."""
    path, state, cfg = checkpoint.load_configured(path)
    if cfg.tasks.family not in RLLIB_FAMILIES:
        raise ConfigError(refusal(cfg.tasks.family))
    return path, state, cfg, checkpoint.flat_theta(state, path, ParamSpec.of(network(cfg.tasks.family)).numel)


def require_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"'{out}' exists and is not an empty directory; pass a new one (nothing was overwritten)")


def export(family: str, theta: np.ndarray, out: Path, info: dict[str, Any] | None = None) -> MetarlModule:
    """Write theta as an RLModule checkpoint to `out` (RLlib's `save_to_path`), plus
    metarl_export.json saying where it came from."""
    module = build_module(family, theta)
    module.save_to_path(str(Path(out).resolve()))
    (Path(out) / "metarl_export.json").write_text(json.dumps({"family": family, **(info or {})}, indent=2) + "\n")
    return module


def ray_version() -> str:
    import ray

    return ray.__version__


# ------------------------------------------------------------------------------------------
# the games as gymnasium envs (one emulator each; RLlib vectorises them)


class AtariGame(gym.Env):
    """One ALE game under metarl's protocol: the ale-py vector env of training with one emulator.
    env_config: game, seed, env (EnvConfig fields)."""

    def __init__(self, env_config: dict[str, Any]):
        self.cfg = EnvConfig(**env_config["env"])
        self.observation_space, self.action_space = spaces("atari")
        self.venv, obs = make_vector_env(env_config["game"], self.cfg, int(env_config.get("seed", 0)), num_envs=1)
        self.obs = obs[0]
        self.action = np.zeros(1, dtype=np.int64)
        self.ep_return = 0.0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.obs = self.venv.reset(seed=seed)[0][0]
        return self.obs, {}  # after an episode the emulator has already reset itself (as in training)

    def step(self, action):
        self.action[0] = action
        obs, r, term, trunc, info = self.venv.step(self.action)
        self.obs = obs[0]
        raw = float(r[0])
        done = bool(term[0] or trunc[0])
        last = info["final_obs"][0] if done and "final_obs" in info else self.obs
        reward = float(np.sign(raw)) if self.cfg.reward_clip else raw
        return last, reward, bool(term[0]), bool(trunc[0]), self._info(raw, done)

    def _info(self, raw: float, done: bool) -> dict[str, float]:
        """The raw reward, and at an episode's end its raw return (the game score)."""
        self.ep_return += raw
        info = {"raw_reward": raw}
        if done:
            info["raw_return"], self.ep_return = self.ep_return, 0.0
        return info

    def close(self):
        self.venv.close()


class MinAtarGame(gym.Env):
    """One MinAtar game under metarl's protocol (10 channels first, uint8, raw rewards).
    env_config: game, seed, minatar (MinAtarConfig fields)."""

    def __init__(self, env_config: dict[str, Any]):
        from metarl.tasks.minatar import make_games, write_state

        self.cfg = MinAtarConfig(**env_config["minatar"])
        self.observation_space, self.action_space = spaces("minatar")
        self.write_state = write_state
        self.game = make_games(env_config["game"], self.cfg, int(env_config.get("seed", 0)), 1)[0]
        self.steps, self.ep_return = 0, 0.0

    def _obs(self) -> np.ndarray:
        obs = np.zeros((MINATAR_CHANNELS, 10, 10), dtype=np.uint8)
        self.write_state(obs, self.game)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.game.seed(seed)
        self.game.reset()
        self.steps, self.ep_return = 0, 0.0
        return self._obs(), {}

    def step(self, action):
        r, terminal = self.game.act(int(action))
        self.steps += 1
        limit = self.cfg.max_episode_steps
        truncated = bool(limit and self.steps >= limit and not terminal)
        self.ep_return += float(r)
        info = {"raw_reward": float(r)}
        if terminal or truncated:
            info["raw_return"], self.ep_return = self.ep_return, 0.0
        return self._obs(), float(r), bool(terminal), truncated, info


GAME_ENVS = {"atari": AtariGame, "minatar": MinAtarGame}


class RawScore(RLlibCallback):
    """Logs the raw game score beside RLlib's (possibly clipped) returns: per step the raw reward
    (summed per iteration) and per finished episode its raw return (the iteration's series)."""

    def on_episode_step(self, *, episode, metrics_logger=None, **kwargs) -> None:
        metrics_logger.log_value("metarl/raw_reward", episode.get_infos(-1).get("raw_reward", 0.0), reduce="sum")

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        metrics_logger.log_value("metarl/raw_return", float(episode.get_infos(-1)["raw_return"]), reduce="item_series")


# ------------------------------------------------------------------------------------------
# PPO from theta


@dataclass(frozen=True)
class PPOLearner:
    """RLlib's PPO as the fine-tuner, with the config's finetune section (`of`): one training
    iteration per rollout of T x B env steps (T = finetune.rollout_len or env.rollout_len, the
    rollout of metarl's fine-tuner), `epochs` passes over it in `minibatches` minibatches; clipped
    surrogate, no KL term (CleanRL's Atari PPO). gamma, lambda and the loss weights are the run's."""

    lr: float
    epochs: int
    minibatches: int
    clip: float
    max_grad_norm: float
    env_runners: int = 1
    """RLlib env-runner actors (0: sample in the driver's process)."""

    @staticmethod
    def of(cfg: Config, env_runners: int = 1) -> "PPOLearner":
        """finetune.* as RLlib's PPO takes them; what it cannot honour is refused, naming the keys."""
        f = cfg.finetune
        cannot = [f"finetune.optimizer={f.optimizer}"] * (f.optimizer != "adam") + \
                 [f"finetune.lr_decay={f.lr_decay}"] * (f.lr_decay != "constant") + \
                 ["finetune.bf16=true"] * f.bf16 + [f"finetune.gpus={f.gpus:g}"] * (f.gpus > 0)
        if cannot:
            raise ConfigError(f"{PPO_LEARNER} fine-tunes with Adam at a constant step in float32 on the CPU; the config "
                              f"asks for {', '.join(cannot)}: change {'it' if len(cannot) == 1 else 'them'} with --set")
        return PPOLearner(cfg.finetune_lr, f.epochs, f.minibatches, f.clip, f.max_grad_norm, env_runners)

    @property
    def label(self) -> str:
        return f"{PPO_LEARNER} lr {self.lr:g}, {self.epochs} epochs x {self.minibatches} minibatches, clip {self.clip:g}"


def ppo_config(cfg: Config, game: str, start: Path, learner: PPOLearner, seed: int):
    """RLlib PPOConfig for `game` of cfg's family, its module's weights loaded from the RLModule
    checkpoint `start` (RLModuleSpec.load_state_path), B envs of T steps per iteration."""
    from ray.rllib.algorithms.ppo import PPOConfig

    family = cfg.tasks.family
    env_config = {"game": game, "seed": seed, "env": asdict(cfg.env), "minatar": asdict(cfg.minatar)}
    B, T = cfg.env.num_envs, cfg.env.rollout_len
    return (
        PPOConfig()
        .environment(env=GAME_ENVS[family], env_config=env_config)
        .env_runners(num_env_runners=learner.env_runners, num_envs_per_env_runner=B,
                     rollout_fragment_length=T, num_cpus_per_env_runner=1)
        .learners(num_learners=0)
        .rl_module(rl_module_spec=module_spec(family, start))
        .training(train_batch_size_per_learner=T * B, minibatch_size=max(1, T * B // learner.minibatches),
                  num_epochs=learner.epochs, lr=learner.lr, gamma=cfg.loss.gamma, lambda_=cfg.loss.gae_lambda,
                  vf_loss_coeff=cfg.loss.vf_coef, entropy_coeff=cfg.loss.ent_coef, clip_param=learner.clip,
                  use_kl_loss=False, grad_clip=learner.max_grad_norm or None, grad_clip_by="global_norm")
        .callbacks(RawScore)
        .debugging(seed=seed)
    )


def finetune_ppo(cfg: Config, game: str, start: Path, learner: PPOLearner, budget: int, seed: int,
                 save_to: Path | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """RLlib PPO training iterations from the module checkpoint `start` until `budget` env steps are
    sampled; the trace of `metarl.experiments.evaluate.finetune` (per iteration: env steps, frames, raw reward,
    loss; episodes as [iteration index, raw return]). `save_to`: RLlib's algorithm checkpoint."""
    algo = ppo_config(cfg, game, start, learner, seed).build_algo()
    frameskip = cfg.env.frameskip if cfg.tasks.family == "atari" else 1
    trace: dict[str, Any] = {"env_steps": [], "frames": [], "reward_sum": [], "loss": [], "episodes": [],
                             "diverged": False}
    t0 = time.perf_counter()
    try:
        steps = 0
        while steps < budget:
            result = algo.train()
            runners = result["env_runners"]
            steps = int(runners["num_env_steps_sampled_lifetime"])
            loss = float(result["learners"]["default_policy"]["total_loss"])
            returns = runners.get("metarl/raw_return", [])  # RLlib reports an empty series as NaN, not []
            trace["episodes"] += [[len(trace["env_steps"]), float(r)] for r in (returns if isinstance(returns, (list, tuple)) else [])]
            trace["env_steps"].append(steps)
            trace["frames"].append(steps * frameskip)
            trace["reward_sum"].append(float(runners.get("metarl/raw_reward", 0.0)))
            trace["loss"].append(loss)
            if progress is not None:
                progress(f"{steps:,}/{budget:,} env steps ({steps / (time.perf_counter() - t0):.0f}/s), "
                         f"loss {loss:.4f}, {len(trace['episodes'])} episodes")
            if not math.isfinite(loss):
                trace["diverged"] = True
                break
        trace["seconds"] = time.perf_counter() - t0
        if save_to is not None:
            algo.save_to_path(str(Path(save_to).resolve()))
    finally:
        algo.stop()
    return trace


def ppo_jobs(cfg: Config, learner: PPOLearner):
    """`metarl.experiments.evaluate.run_jobs` with RLlib's PPO as the fine-tuner: every (game, init, seed) one
    after another in this process (each PPO brings its own env-runner actors), every theta
    exported to an RLModule checkpoint first and loaded by RLlib."""

    def run(family, _learner, thetas: dict[str, np.ndarray], spec, local: bool, address: str = "",
            workers: int = 0, log: Callable[[str], None] = print) -> list[dict]:
        ray_init(address, local)
        jobs = [{"game": g, "init": init, "seed": s, "env_seed": task_seed(s, gi)}
                for gi, g in enumerate(spec.games) for s in spec.seeds for init in thetas]
        with tempfile.TemporaryDirectory(prefix="metarl-rllib-") as tmp:
            starts = {init: Path(tmp) / init for init in thetas}
            for init, theta in thetas.items():
                export(cfg.tasks.family, theta, starts[init])
            for job in jobs:
                job["trace"] = finetune_ppo(cfg.finetuning, job["game"], starts[job["init"]], learner, spec.budget,
                                            job["env_seed"])
                log(f"eval ({PPO_LEARNER}): {job['game']} from {job['init']}, seed {job['seed']}: "
                    f"{len(job['trace']['episodes'])} episodes in {job['trace']['seconds']:.1f}s")
        return jobs

    return run


def ray_init(address: str = "", local: bool = False) -> None:
    """Attach to `address` (or RAY_ADDRESS), else (and always with `local`) start a local Ray on
    loopback (as metarl.distributed.backend does: never a cluster that happens to run on this machine)."""
    import os

    import ray

    address = "" if local else address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level="WARNING")
