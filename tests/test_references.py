"""`metarl references`: the random policy is uniform and does not learn, each seed's scratch run starts
from its own initialisation, the scores and the final rate against hand-computed values, normalise's
two fixed points and refusals, load's refusals, and a tiny real run of the command on MinAtar."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from metarl.cli import main
from metarl.core import config as config_mod
from metarl.core.config import ConfigError
from metarl.core.policy import NUM_MINATAR_ACTIONS, ParamSpec, forward
from metarl.core.seeds import task_seed
from metarl.distributed.learner import initial_theta
from metarl.experiments import references
from metarl.experiments.finetune import FineTuneLearner, finetune
from metarl.experiments.references import COLUMNS, final_rate, load, measure, normalise, uniform_theta, write
from metarl.tasks import make_family

from conftest import CONFIGS

pytest.importorskip("minatar")

SMALL = {"env.num_envs": 4, "env.rollout_len": 8, "log.wandb_mode": "disabled"}


def minatar(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    for k, v in {**SMALL, **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def test_the_random_policy_is_uniform_and_does_not_learn():
    """From a theta whose every parameter (the policy head's bias too) is perturbed: every action's
    log-probability is -log 6 on real observations, the rest of the network is theta's, and playing
    it (learn=False) leaves the parameters as they were while recording the trace of the rollouts."""
    torch.set_num_threads(1)
    family = make_family(minatar())
    model = family.make_model()
    spec = ParamSpec.of(model)
    theta = initial_theta(family, 0) + np.random.default_rng(0).normal(0, 0.5, spec.numel).astype(np.float32)
    uniform = spec.unflatten(uniform_theta(family, theta))
    assert all(torch.equal(uniform[k], spec.unflatten(theta)[k]) for k in uniform if not k.startswith("pi."))
    task = family.make_task("seaquest", 1)
    with torch.no_grad():
        batch = task.sample(model, uniform)
        logits, _ = forward(model, uniform, batch.data["obs"].flatten(0, 1))
    expected = -math.log(NUM_MINATAR_ACTIONS)
    assert torch.allclose(torch.log_softmax(logits, -1), torch.full_like(logits, expected), atol=1e-6)
    assert torch.allclose(batch.data["logp"], torch.full_like(batch.data["logp"], expected), atol=1e-6)
    trace, after = finetune(family.make_task("seaquest", 1), model, uniform, FineTuneLearner("adam", 1.0), 96,
                            learn=False)
    assert all(torch.equal(after[k], uniform[k]) for k in uniform)
    assert trace["env_steps"] == [32, 64, 96] and all(math.isnan(x) for x in trace["loss"])
    replay = family.make_task("seaquest", 1)
    with torch.no_grad():
        assert trace["reward_sum"] == [float(replay.sample(model, uniform).reward_sum) for _ in range(3)]


def test_final_rate_is_the_score_per_step_of_the_last_quarter():
    trace = {"env_steps": [10 * i for i in range(1, 9)], "reward_sum": [float(i) for i in range(1, 9)]}
    assert final_rate(trace) == (7 + 8) / 20  # the rollouts from 60 of 80 env steps on
    assert final_rate({"env_steps": [10], "reward_sum": [5.0]}) == 0.5


# two fine-tuning steps of 10 env steps; with window 2: running returns [2, 3] (AUC 2.5, final 3)
RANDOM = {"env_steps": [10, 20], "frames": [10, 20], "reward_sum": [1.0, 3.0], "loss": [math.nan] * 2,
          "episodes": [[0, 2.0], [1, 4.0]], "diverged": False, "seconds": 0.1}
SCRATCH = {"env_steps": [10, 20], "frames": [10, 20], "reward_sum": [2.0, 6.0], "loss": [0.5] * 2,
           "episodes": [[0, 6.0], [1, 10.0]], "diverged": False, "seconds": 0.1}


def test_measure_starts_each_seed_from_its_own_network_and_scores_its_traces(monkeypatch):
    cfg = minatar()
    family = make_family(cfg)
    calls = []

    def fake(actor, thetas, jobs, method, args, *rest, done=None, **kw):
        calls.append((thetas, jobs, [args(j) for j in jobs]))
        for j in jobs:
            done(j, SCRATCH if j["policy"] == "scratch" else RANDOM)

    monkeypatch.setattr(references, "call_actors", fake)
    rows = measure(cfg, ("breakout", "asterix"), 20, (0, 1), local=True, window=2, log=lambda _: None)
    ((thetas, jobs, args),) = calls
    for s in (0, 1):
        assert np.array_equal(thetas[f"scratch-{s}"], initial_theta(family, s))
        assert np.array_equal(thetas[f"random-{s}"], uniform_theta(family, initial_theta(family, s)))
    assert not np.array_equal(thetas["scratch-0"], thetas["scratch-1"])
    assert sorted((j["policy"], j["init"], a) for j, a in zip(jobs, args)) == sorted(
        [("random", f"random-{s}", (20, False)) for s in (0, 1)] * 2 + [("scratch", f"scratch-{s}", (20, True))
                                                                        for s in (0, 1)] * 2)
    assert [(r["game"], r["seed"], r["env_seed"]) for r in rows] == [
        (g, s, task_seed(s, gi)) for gi, g in enumerate(("breakout", "asterix")) for s in (0, 1)]
    r = rows[0]
    assert (r["random_auc_return"], r["random_final_return"], r["random_reward_rate"]) == (2.5, 3.0, 4 / 20)
    assert (r["scratch_auc_return"], r["scratch_final_return"], r["scratch_reward_rate"]) == (7.0, 8.0, 8 / 20)
    assert r["scratch_final_rate"] == 6 / 10


REFS = {"pong": {"random_final_return": -20.0, "scratch_final_return": -10.0, "random_reward_rate": 0.01,
                 "scratch_final_rate": 0.03},
        "flat": {"random_final_return": 5.0, "scratch_final_return": 5.0, "random_reward_rate": 0.02,
                 "scratch_final_rate": math.nan}}


def test_normalise_maps_random_to_zero_and_the_scratch_final_point_to_one():
    assert normalise(-20.0, "pong", REFS) == 0.0 and normalise(-10.0, "pong", REFS) == 1.0
    assert normalise(-5.0, "pong", REFS, key="return") == 1.5
    assert normalise(0.01, "pong", REFS, key="rate") == 0.0 and normalise(0.03, "pong", REFS, key="rate") == 1.0
    with pytest.raises(ConfigError, match="flat: the scratch learner's final return .* is not above"):
        normalise(5.0, "flat", REFS)
    with pytest.raises(ConfigError, match="score per agent step .* is not above"):
        normalise(0.02, "flat", REFS, key="rate")  # NaN reference
    with pytest.raises(ConfigError, match="no references for breakout"):
        normalise(1.0, "breakout", REFS)
    with pytest.raises(ValueError, match="'return' or 'rate'"):
        normalise(1.0, "pong", REFS, key="auc")


def per_seed_rows() -> list[dict]:
    rows = []
    for game, base in (("breakout", 1.0), ("asterix", 2.0)):
        for seed in (0, 1, 2):
            rows.append({"game": game, "seed": seed, "budget": 64, "window": 10, "env_seed": 0,
                         "random_auc_return": base, "random_final_return": base, "random_reward_rate": 0.01,
                         "scratch_auc_return": base + seed, "scratch_final_return": 2 * base + seed,
                         "scratch_reward_rate": 0.02, "scratch_final_rate": 0.03 if seed else math.nan,
                         "scratch_diverged": seed == 2, "learner": "sgd lr 0.1"})
    return rows


def test_write_then_load_round_trips_the_means_and_load_refuses_faults(tmp_path):
    summary = write(tmp_path, per_seed_rows())
    refs = load(tmp_path, games=("breakout", "asterix"), budget=64, window=10)
    assert refs["asterix"]["scratch_final_return"] == 5.0 == summary[1]["scratch_final_return"]  # mean of 4, 5, 6
    assert refs["breakout"]["scratch_final_rate"] == 0.03 and refs["breakout"]["scratch_diverged"] == "1"
    assert normalise(3.0, "breakout", refs) == 1.0
    assert "| breakout | 3 |" in (tmp_path / "references.md").read_text()
    with open(tmp_path / "references_per_seed.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    with pytest.raises(ConfigError, match="no references file"):
        load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="has no references for seaquest, pong"):
        load(tmp_path / "references.csv", games=("breakout", "seaquest", "pong"))
    with pytest.raises(ConfigError, match="at budget 64, not 128"):
        load(tmp_path, games=("breakout",), budget=128)
    text = (tmp_path / "references.csv").read_text().replace("scratch_final_rate", "final_rate")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "references.csv").write_text(text)
    with pytest.raises(ConfigError, match="has no column scratch_final_rate"):
        load(tmp_path / "bad")


def test_the_command_writes_finite_references_and_refuses_a_used_out(tmp_path, capsys):
    out = tmp_path / "refs"
    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
    argv = ["references", "--config", str(CONFIGS / "minatar.yaml"), *sets, "--games", "breakout,space_invaders",
            "--steps", "96", "--seeds", "2", "--local"]
    assert main([*argv, "--out", str(out)]) == 0
    for name in ("references.csv", "references_per_seed.csv", "references.md", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "references.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["game"] for r in rows] == ["breakout", "space_invaders"]
    assert all(r["budget"] == "96" and r["seeds"] == "2" and r["window"] == "10" for r in rows)
    assert all(math.isfinite(float(r[c])) for r in rows for c in COLUMNS[3:] if "return" not in c)
    assert all(math.isfinite(float(r[c])) for r in rows for c in COLUMNS[3:] if r["game"] == "breakout")
    with open(out / "references_per_seed.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    capsys.readouterr()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "references.csv").write_text("earlier")
    assert main([*argv, "--out", str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already exists and is not empty" in err
    assert (tmp_path / "used" / "references.csv").read_text() == "earlier"
    assert main([*argv, "--games", "pong", "--out", str(tmp_path / "x")]) == 2
    assert "unknown MinAtar game 'pong'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*argv, "--seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "drop --seed" in capsys.readouterr().err and not (tmp_path / "x").exists()
