"""theta as an RLlib RLModule (metarl.interop.rllib_module): the exported module computes metarl's forward
at theta, RLlib's loader gives it back, and RLlib's PPO starts from it on metarl's own games."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, smoke
from metarl.core import checkpoint, config as config_mod
from metarl import cli
from metarl.core.policy import ParamSpec, forward
from metarl.interop.rllib_module import (AtariGame, MetarlModule, MinAtarGame, PPOLearner, build_module, export,
                                 finetune_ppo, network, ppo_config, spaces)

pytest.importorskip("minatar")
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.rl_module.apis import ValueFunctionAPI  # noqa: E402
from ray.rllib.core.rl_module.rl_module import RLModule  # noqa: E402

TOL = 1e-5  # float32: the module runs the same network, so the outputs agree far below this


def minatar_cfg(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    for k, v in {"log.wandb_mode": "disabled", "log.progress": False, "env.num_envs": 2, "env.rollout_len": 32,
                 **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def config_of(family: str):
    return smoke() if family == "atari" else minatar_cfg()


def fresh_theta(family: str) -> np.ndarray:
    from metarl.distributed.learner import initial_theta
    from metarl.tasks import make_family

    return initial_theta(make_family(config_of(family)), seed=0)


def trained_theta(family: str) -> np.ndarray:
    """theta after metarl's own fine-tuner (Adam, 3 rollouts of a real game): weights that moved."""
    from metarl.experiments.finetune import FineTuneLearner, finetune
    from metarl.tasks import make_family

    fam = make_family(config_of(family))
    model = fam.make_model()
    spec = ParamSpec.of(model)
    task = fam.make_task("pong" if family == "atari" else "breakout", 0)
    try:
        _, params = finetune(task, model, spec.unflatten(fresh_theta(family)), FineTuneLearner("adam", 1e-2),
                             budget=3 * task.T * task.B)
    finally:
        task.close()
    return spec.flatten(params)


def observations(family: str, n: int = 16) -> torch.Tensor:
    """Random observations in the family's range, and real ones from its emulator."""
    rng = np.random.default_rng(1)
    space, _ = spaces(family)
    rand = rng.integers(0, int(space.high.max()) + 1, (n, *space.shape), dtype=np.uint8)
    env = AtariGame({"game": "pong", "seed": 3, "env": {}}) if family == "atari" else \
        MinAtarGame({"game": "breakout", "seed": 3, "minatar": {}})
    obs, _ = env.reset()
    real = [obs]
    for _ in range(n - 1):
        real.append(env.step(env.action_space.sample())[0])
    env.close()
    return torch.from_numpy(np.concatenate([rand, np.stack(real)]))


def max_diffs(module: RLModule, family: str, theta: np.ndarray, obs: torch.Tensor) -> tuple[float, float]:
    """Max |module - metarl's functional forward at theta| over logits and values."""
    model = network(family)
    with torch.no_grad():
        logits, values = forward(model, ParamSpec.of(model).unflatten(theta), obs)
        out = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        v = module.compute_values({Columns.OBS: obs})
    return float((out - logits).abs().max()), float((v - values).abs().max())


def write_checkpoint(run_dir: Path, cfg, theta: np.ndarray, iteration: int = 7) -> Path:
    return checkpoint.save(run_dir, {"theta": torch.from_numpy(theta), "optimizer": {}, "iteration": iteration,
                                     "config": config_mod.to_dict(cfg)})


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("family", ["atari", "minatar"])
def test_module_is_the_family_network(family):
    module = build_module(family, fresh_theta(family))
    assert isinstance(module, ValueFunctionAPI)
    from metarl.tasks import make_family

    theirs = ParamSpec.of(make_family(config_of(family)).make_model())
    assert ParamSpec.of(module.net) == theirs  # same names and shapes: theta loads by name, no second copy
    obs_space, act_space = spaces(family)
    assert module.observation_space == obs_space and module.action_space == act_space
    assert act_space.n == (18 if family == "atari" else 6)


@pytest.mark.parametrize("family", ["atari", "minatar"])
def test_exported_module_equals_functional_forward(family, tmp_path):
    obs = observations(family)
    for name, theta in (("fresh", fresh_theta(family)), ("trained", trained_theta(family))):
        module = build_module(family, theta)
        d_logits, d_values = max_diffs(module, family, theta, obs)
        assert d_logits <= TOL and d_values <= TOL, (name, d_logits, d_values)
        export(family, theta, tmp_path / name)
        loaded = RLModule.from_checkpoint(str(tmp_path / name))  # RLlib's own loader
        assert isinstance(loaded, MetarlModule)
        d_logits, d_values = max_diffs(loaded, family, theta, obs)
        assert d_logits <= TOL and d_values <= TOL, (name, d_logits, d_values)
    # the trained theta is not the fresh one, so the checks above compared two different networks
    assert np.abs(theta - fresh_theta(family)).max() > 1e-3


def test_export_command_writes_a_loadable_module(tmp_path, capsys):
    cfg = minatar_cfg()
    theta = trained_theta("minatar")
    write_checkpoint(tmp_path / "run", cfg, theta)
    out = tmp_path / "module"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    meta = json.loads((out / "metarl_export.json").read_text())
    assert meta["family"] == "minatar" and meta["iteration"] == 7 and meta["ray"] == "2.60.0"
    loaded = RLModule.from_checkpoint(str(out))
    assert max(max_diffs(loaded, "minatar", theta, observations("minatar"))) <= TOL


def test_export_refuses_bad_input(tmp_path, capsys):
    theta = fresh_theta("minatar")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    nav = write_checkpoint(tmp_path / "nav", config_mod.validate(config_mod.load(CONFIGS / "nav2d.yaml")),
                           np.zeros(3, dtype=np.float32))
    good = write_checkpoint(tmp_path / "run", minatar_cfg(), theta)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for ckpt, out, says in ((foreign, tmp_path / "a", "not a metarl checkpoint"), (nav, tmp_path / "b", "nav2d"),
                            (good, taken, "already exists and is not empty"), (tmp_path / "missing.pt", tmp_path / "c", "does not exist")):
        assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
        assert not (out / "module_state.pkl").exists()
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1


def test_games_follow_metarl_protocol():
    """The gymnasium envs RLlib steps are metarl's emulators: the same first observation for a seed,
    clipped training reward with the raw one in info (Atari), raw rewards on MinAtar."""
    from metarl.core.config import EnvConfig
    from metarl.tasks.atari import make_vector_env
    from metarl.tasks.minatar import MinAtarTask

    env = AtariGame({"game": "breakout", "seed": 5, "env": {}})
    venv, first = make_vector_env("breakout", EnvConfig(), 5, num_envs=1)
    venv.close()
    obs, _ = env.reset()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and np.array_equal(obs, first[0])
    for _ in range(300):
        _, r, term, trunc, info = env.step(1)  # FIRE keeps the ball in play
        assert r == np.sign(info["raw_reward"])
    env.close()
    cfg = minatar_cfg()
    game = MinAtarGame({"game": "breakout", "seed": 4, "minatar": {}})
    task = MinAtarTask("breakout", 4, cfg.env, cfg.minatar, cfg.loss)
    assert np.array_equal(game.reset()[0], task.obs[0])  # the task's game 0 is seeded seed + 0


def test_ppo_starts_from_theta_and_checkpoints(ray_local, tmp_path):
    """RLlib PPO on a held-out MinAtar game (64 env steps an iteration, in process): its module
    starts at theta, training moves it, and RLlib's checkpoint holds the trained module."""
    cfg = minatar_cfg()
    theta = trained_theta("minatar")
    export("minatar", theta, tmp_path / "start")
    learner = PPOLearner(lr=2.5e-4, epochs=1, minibatches=2, clip=0.1, max_grad_norm=0.5, env_runners=0)
    algo = ppo_config(cfg, "breakout", tmp_path / "start", learner, seed=0).build_algo()
    try:
        start = algo.get_module().net
        assert np.array_equal(ParamSpec.of(start).flatten(dict(start.named_parameters())), theta)
    finally:
        algo.stop()
    trace = finetune_ppo(cfg, "breakout", tmp_path / "start", learner, budget=128, seed=0,
                         save_to=tmp_path / "rllib")
    assert trace["env_steps"][-1] >= 128 and len(trace["env_steps"]) >= 2
    assert all(np.isfinite(trace["loss"])) and not trace["diverged"]
    # raw scores: breakout's rewards are >= 0, so all steps' rewards hold at least the finished episodes'
    assert trace["episodes"] and sum(trace["reward_sum"]) >= sum(r for _, r in trace["episodes"])
    saved = next((tmp_path / "rllib").rglob("default_policy"))
    trained = RLModule.from_checkpoint(str(saved))
    after = ParamSpec.of(trained.net).flatten(dict(trained.net.named_parameters()))
    assert np.isfinite(after).all() and np.abs(after - theta).max() > 0


def test_ppo_command_takes_finetune_and_meta_seed(ray_local, tmp_path, capsys):
    """`metarl ppo --local`: PPO's settings are the checkpoint's finetune section under --lr, --epochs
    and --set, --seed is meta.seed (the fresh network's and RLlib's); what RLlib cannot do is refused."""
    from metarl.distributed.learner import initial_theta
    from metarl.tasks import make_family
    from metarl.distributed.tracking import read_metrics

    cfg = minatar_cfg()
    write_checkpoint(tmp_path / "run", cfg, trained_theta("minatar"))
    out = tmp_path / "ppo"
    base = ["ppo", "--checkpoint", str(tmp_path / "run"), "--game", "breakout", "--steps", "64", "--local"]
    assert cli.main([*base, "--set", "finetune.bf16=true", "--out", str(out)]) == 2
    assert "asks for finetune.bf16=true" in capsys.readouterr().err and not out.exists()
    assert cli.main([*base, "--lr", "1e-3", "--epochs", "1", "--set", "finetune.minibatches=2", "--seed", "3",
                     "--init", "fresh", "--out", str(out)]) == 0
    result = json.loads((out / "ppo.json").read_text())
    assert result["learner"] == {"lr": 1e-3, "epochs": 1, "minibatches": 2, "clip": 0.2, "max_grad_norm": 0.5,
                                 "env_runners": 0}  # clip and grad norm: configs/minatar.yaml's finetune
    assert result["seed"] == 3 and result["env_steps"] >= 64 and (out / "rllib").is_dir()
    start = RLModule.from_checkpoint(str(out / "start_module"))
    assert np.array_equal(ParamSpec.of(start.net).flatten(dict(start.net.named_parameters())),
                          initial_theta(make_family(cfg), 3))
    assert [r["env_steps"] for r in read_metrics(out / "ppo_metrics.jsonl")] == result["trace"]["env_steps"]


@pytest.mark.slow
def test_eval_with_rllib_ppo(ray_local, tmp_path, capsys):
    """`metarl eval --learner rllib-ppo`: theta and the fresh network, each fine-tuned by RLlib's PPO."""
    write_checkpoint(tmp_path / "run", minatar_cfg(), trained_theta("minatar"))
    out = tmp_path / "eval"
    rc = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--learner", "rllib-ppo", "--games", "breakout",
                   "--steps", "64", "--seeds", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    assert result["learner"].startswith("rllib-ppo")
    assert {(r["game"], r["init"]) for r in result["summary"]} == {("breakout", "meta"), ("breakout", "fresh")}
    assert all(j["trace"]["env_steps"][-1] >= 64 for j in result["jobs"])
