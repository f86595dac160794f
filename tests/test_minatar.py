"""The MinAtar family: observations, actions, seeding and raw returns; a run through real Ray workers
with skip 2; the fine-tuning learner's update direction and its divergence count; and a two-fold
leave-one-game-out sweep that writes every output."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from metarl.core import config as config_mod
from metarl.cli import main
from metarl.core.families import MINATAR_GAMES
from metarl.experiments.evaluate import EvalSpec, assemble
from metarl.experiments.finetune import FineTuneLearner, finetune
from metarl.distributed.learner import initial_theta
from metarl.core.policy import MINATAR_CHANNELS, NUM_MINATAR_ACTIONS, init_params
from metarl.distributed.run import run
from metarl.tasks import make_family
from metarl.distributed.tracking import read_metrics

from conftest import CONFIGS, assert_png, one_update

pytest.importorskip("minatar")

# the family's tests take the one-step outer loop and fine-tuner (PPO's outer loop has its own
# tests in test_outer_loop.py; its 4 x 4 steps would only make these slower)
ONE_STEP = {"meta.outer_epochs": 1, "meta.outer_minibatches": 1, "meta.outer_clip": 0.0, "finetune.epochs": 1,
            "finetune.minibatches": 1}
ONE_STEP_SETS = [x for k, v in ONE_STEP.items() for x in ("--set", f"{k}={v}")]

CHANNELS = {"asterix": 4, "breakout": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}


def minatar(**overrides):
    """configs/minatar.yaml, small: 4 games per task x 8 steps, W&B off, no progress lines."""
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    small = {"env.num_envs": 4, "env.rollout_len": 8, "log.wandb_mode": "disabled", "log.progress": False,
             "ray.cpus_per_worker": 0.5, **ONE_STEP}
    for k, v in {**small, **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def test_observations_are_each_games_channels_zero_padded_to_ten():
    family = make_family(minatar())
    model = family.make_model()
    theta = init_params(model)
    for game in MINATAR_GAMES:
        task = family.make_task(game, 7)
        batch = task.sample(model, theta)
        obs = batch.data["obs"]
        assert obs.shape == (9, 4, MINATAR_CHANNELS, 10, 10) and obs.dtype == torch.uint8
        c = CHANNELS[game]
        assert task.games[0].state_shape() == [10, 10, c]
        assert int(obs[:, :, c:].sum()) == 0, game  # the padding stays empty
        assert int(obs[:, :, :c].sum()) > 0, game  # the game's own objects are there
        # the current observation is the game's state, channels first
        np.testing.assert_array_equal(task.obs[0, :c], task.games[0].state().transpose(2, 0, 1))
        logits, _ = model(obs[0])
        assert logits.shape == (4, NUM_MINATAR_ACTIONS)
        assert int(batch.data["actions"].max()) < NUM_MINATAR_ACTIONS


def test_a_task_is_determined_by_its_seed():
    family = make_family(minatar())
    model = family.make_model()
    theta = init_params(model)
    a, b, c = (family.make_task("seaquest", s) for s in (3, 3, 4))
    for _ in range(3):
        ba, bb, bc = (t.sample(model, theta) for t in (a, b, c))
        for k in ("obs", "actions", "rewards", "dones"):
            assert torch.equal(ba.data[k], bb.data[k]), k
    assert not torch.equal(ba.data["obs"], bc.data["obs"])


def test_episode_returns_are_the_raw_scores_of_finished_episodes():
    """Replaying rewards and dones game by game gives exactly the returns the task recorded."""
    cfg = minatar(**{"env.rollout_len": 200, "env.num_envs": 3})
    family = make_family(cfg)
    model = family.make_model()
    task = family.make_task("breakout", 0)
    batch = task.sample(model, init_params(model))
    rewards, dones = batch.data["rewards"].numpy(), batch.data["dones"].numpy()
    expected, acc = [], np.zeros(3)
    for t in range(rewards.shape[0]):
        for i in range(3):
            acc[i] += rewards[t, i]
            if dones[t, i]:
                expected.append(float(acc[i]))
                acc[i] = 0.0
    assert len(expected) >= 3  # random Breakout ends within a few dozen steps
    assert batch.episode_returns == expected
    assert batch.reward_sum == pytest.approx(float(rewards.sum()))
    assert batch.env_steps == batch.frames == 600


def test_unknown_minatar_game_is_one_line_exit_2(tmp_path, capsys):
    code = main(["run", "--config", str(CONFIGS / "minatar.yaml"), "--set", "tasks.train=[breakout,pong]",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "unknown MinAtar game 'pong'" in err and "space_invaders" in err
    assert not (tmp_path / "r").exists()
    code = main(["run", "--config", str(CONFIGS / "minatar.yaml"), "--algo", "maml", "--set", "meta.inner_steps=0",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "0 with algo fomaml" in capsys.readouterr().err


@pytest.mark.slow
def test_minatar_run_on_ray_workers_with_skip_2(ray_session, tmp_path):
    cfg = minatar(**{"tasks.train": ["asterix", "breakout", "freeway", "space_invaders"], "meta.skip": 2,
                     "meta.iterations": 2, "meta.checkpoint_every": 1})
    out = tmp_path / "run"
    summary = run(cfg, out, local=False, log=lambda _: None)
    rows = read_metrics(out / "metrics.jsonl")
    per_rollout = 4 * 8
    assert summary["iterations"] == 2 and len(rows) == 2
    for r in rows:
        assert (r["adaptations"], r["evaluations"], r["evaluations_used"]) == (2, 4, 4)
        assert r["env_steps/adapt"] == 2 * per_rollout and r["env_steps/eval"] == 4 * per_rollout
        assert sorted(r["group_sizes"]) == [2, 2] and not r["update_skipped"]
    assert (out / "checkpoints" / "ckpt_000002.pt").exists()


def test_joint_pretraining_takes_no_inner_step(tmp_path):
    """meta.inner_steps = 0: every task's gradient at theta itself; no adaptation rollouts."""
    cfg = minatar(**{"tasks.train": ["breakout", "asterix"], "meta.inner_steps": 0, "meta.iterations": 2})
    run(cfg, tmp_path / "joint", local=True, log=lambda _: None)
    rows = read_metrics(tmp_path / "joint" / "metrics.jsonl")
    assert [r["env_steps/adapt"] for r in rows] == [0, 0] and [r["adaptations"] for r in rows] == [0, 0]
    assert [r["env_steps/eval"] for r in rows] == [64, 64]
    assert all(r["grad/update_norm"] > 0 for r in rows)
    # no rollout with theta, so no "pre" figures (they read 0.0, which an adaptation gain took at face value)
    assert not [k for r in rows for k in r if k.startswith(("rate_pre/", "return_pre/", "episodes_pre/"))]
    assert all(r["reward_per_step/pre"] is None and r["rate_post/breakout"] >= 0 for r in rows)  # NaN: null in JSON


def test_one_finetuning_update_lowers_the_loss_and_favours_good_actions():
    """On the batch it was computed from, one small update of either learner lowers the
    actor-critic loss (first order: the step is against the gradient, lr small enough that the
    second-order term is orders smaller), and with the policy-gradient term alone it raises the
    advantage-weighted log-probability of the actions taken (recomputed here from GAE). Measured
    decreases: 4e-4 of a 0.065 loss, 7e-6 to 1.6e-5 for the policy term alone, against a float32
    rounding of the 512-sample mean below 2e-7: the outcome does not depend on the CPU."""
    from metarl.core.losses import gae

    for coefs in ({}, {"loss.vf_coef": 0.0, "loss.ent_coef": 0.0}):
        cfg = minatar(**{"env.num_envs": 16, "env.rollout_len": 32, **coefs})
        family = make_family(cfg)
        model = family.make_model()
        task = family.make_task("breakout", 1)
        theta0 = init_params(model)
        for _ in range(3):  # let a few episodes end so that the batch carries rewards
            batch = task.sample(model, theta0)
        assert float(batch.data["rewards"].sum()) > 0
        d = batch.data
        adv, _ = gae(d["rewards"], d["values"][:-1], d["dones"], d["values"][-1], cfg.loss.gamma, cfg.loss.gae_lambda)
        adv = ((adv - adv.mean()) / (adv.std() + 1e-8)).flatten()

        def weighted_logp(params):
            with torch.no_grad():
                logits, _ = torch.func.functional_call(model, params, (d["obs"][:-1].flatten(0, 1),))
                logp = torch.log_softmax(logits, -1).gather(1, d["actions"].reshape(-1, 1)).squeeze(1)
            return float((adv * logp).mean())

        for learner in (FineTuneLearner("adam", 1e-5, 0.5), FineTuneLearner("sgd", 1e-3)):
            loss0, loss1, params = one_update(task, model, theta0, batch, learner)
            assert loss1 < loss0, (learner, coefs)
            if coefs:
                assert weighted_logp(params) > weighted_logp(theta0), learner


def test_finetuning_runs_and_counts_divergence():
    cfg = minatar(**{"env.num_envs": 8, "env.rollout_len": 16})
    family = make_family(cfg)
    model = family.make_model()
    theta = init_params(model)
    task = family.make_task("space_invaders", 0)
    lines: list[str] = []
    trace, after = finetune(task, model, theta, FineTuneLearner("adam", 1e-3, 0.5), budget=384,
                            progress=lines.append, progress_every_s=0.0)
    assert trace["env_steps"] == [128, 256, 384] and not trace["diverged"]
    # with no interval, a progress line before each rollout: the env steps done so far
    assert [line.split("/")[0] for line in lines] == ["0", "128", "256"] and "/384 env steps" in lines[0]
    assert any(not torch.equal(after[k], theta[k]) for k in theta)
    exploded, _ = finetune(family.make_task("space_invaders", 0), model, theta, FineTuneLearner("sgd", 1e38), budget=12800)
    assert exploded["diverged"] and exploded["env_steps"][-1] < 12800
    spec = EvalSpec(games=("space_invaders",), budget=384, seeds=(0, 1), points=2, window=1)
    jobs = [{"game": "space_invaders", "init": "fresh", "seed": 0, "trace": trace},
            {"game": "space_invaders", "init": "fresh", "seed": 1, "trace": exploded}]
    row = assemble(jobs, spec)["summary"][0]
    assert row["diverged"] == 1 and "auc_return_median" in row and "auc_return_ci95" in row


REF_COLUMNS = ("game,budget,window,seeds,random_auc_return,random_final_return,random_reward_rate,scratch_auc_return,"
               "scratch_final_return,scratch_reward_rate,scratch_final_rate")


@pytest.mark.slow
def test_replicated_leave_one_game_out_sweep_in_two_shards_writes_every_output(tmp_path, capsys):
    """Two folds x two meta-training replicates = four units, run by two shards sharing one directory;
    joint also matched to skip 1 by outer updates; fast adaptation; normalised by given references."""
    refs = tmp_path / "references.csv"
    refs.write_text(REF_COLUMNS + "\n" + "".join(f"{g},256,10,2,0.0,0.5,0.01,1.0,2.0,0.02,0.03\n"
                                                  for g in ("breakout", "asterix")))
    out = tmp_path / "loo"
    args = ["sweep", "--config", str(CONFIGS / "minatar.yaml"), "--set", "tasks.train=[breakout,asterix]",
            "--set", "env.num_envs=4", "--set", "env.rollout_len=8", "--set", "log.wandb_mode=disabled",
            "--skips", "1", "--joint", "--folds", "loo", "--match", "env_steps", "--train-budget", "320",
            "--match-updates", "--replicates", "2", "--fast", "1,2", "--fast-rollouts", "1",
            "--references", str(refs), "--steps", "256", "--seeds", "2", *ONE_STEP_SETS]
    assert main([*args, "--local", "--no-progress", "--shard", "0/2", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "2 of 4 units finished" in log and not (out / "summary.md").exists()
    # units replicate by replicate: breakout/seed0, asterix/seed0, breakout/seed1, asterix/seed1
    assert (out / "fold-breakout" / "seed1" / "baseline" / "eval" / "eval.json").exists()
    assert not (out / "fold-asterix" / "seed0").exists()  # shard 1's unit
    assert main(["sweep", "--resume", "--local", "--shard", "1/2", "--out", str(out)]) == 0
    for name in ("summary.md", "summary.csv", "summary_folds.csv", "per_seed.csv", "per_unit.csv", "training.csv"):
        assert (out / name).stat().st_size > 0, name
    assert_png(out / "curves.png")
    assert_png(out / "auc_vs_compute.png")
    labels = ("skip1", "joint", "joint-updates")
    assert sorted(p.name for p in (out / "training").iterdir()) == sorted(
        f"{g}_seed{s}_{label}.csv" for g in ("breakout", "asterix") for s in (0, 1) for label in labels)
    for game in ("breakout", "asterix"):
        for seed in (0, 1):
            unit = out / f"fold-{game}" / f"seed{seed}"
            trained = config_mod.load(unit / "skip1" / "config.yaml")
            assert trained.meta.seed == seed and trained.tasks.heldout == (game,)
            its = {label: json.loads((unit / label / "eval" / "eval.json").read_text())["iteration"] for label in labels}
            assert its["joint-updates"] == its["skip1"] < its["joint"]  # same outer updates; joint's budget buys more
            fast = json.loads((unit / "skip1" / "eval" / "fast.json").read_text())
            assert fast["updates"] == [0, 1, 2] and len(fast["jobs"]) == 2
            ft_seeds = [j["seed"] for j in json.loads((unit / "baseline" / "eval" / "eval.json").read_text())["jobs"]]
            assert ft_seeds == [2 * seed, 2 * seed + 1]  # fine-tuning seeds nested in, and distinct across, units
    fresh = [initial_theta(make_family(minatar()), s) for s in (0, 1)]
    assert not np.array_equal(*fresh)  # each replicate's fresh network is its own theta0
    with open(out / "per_seed.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == 2 * 2 * 4 * 2  # folds x replicates x inits x fine-tuning seeds
    assert {r["meta_seed"] for r in per_seed} == {"0", "1"}
    assert all(r["fast_rate_2"] != "" and r["n_auc"] != "" and r["fast_diverged"] == "False" for r in per_seed)
    with open(out / "per_unit.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 4
    pooled = {r["config"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert pooled["skip1"]["units"] == "4" and pooled["baseline"]["units"] == "4"
    text = (out / "summary.md").read_text()
    assert "Pooled over 4 units" in text and "det." in text and "Fast adaptation" in text
    assert "Meta-training on its own games" in text and "joint-updates" in text
    assert "folds fixed" in text and "detectable at 0.15" in text

    # extend to a third replicate: only the new units run, the summary is rewritten over all six
    finished = [out / "fold-breakout" / "seed0" / "skip1" / "eval" / "eval.json", out / "fold-asterix" / "seed1" / "training"]
    before = {f: f.stat().st_mtime_ns for f in finished if f.exists()}
    capsys.readouterr()
    assert main(["sweep", "--resume", "--local", "--replicates", "1", "--out", str(out)]) == 2
    assert "can only add replicates" in capsys.readouterr().err
    assert main(["sweep", "--resume", "--local", "--no-progress", "--replicates", "3", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "extended from 2 to 3" in log and "unit 6/6" in log and "meta-seed 2" in log
    assert json.loads((out / "sweep.json").read_text())["spec"]["replicates"] == 3
    assert {f: f.stat().st_mtime_ns for f in before} == before  # finished units untouched
    assert (out / "fold-asterix" / "seed2" / "baseline" / "eval" / "eval.json").exists()
    pooled = {r["config"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert pooled["skip1"]["units"] == "6" and "Pooled over 6 units" in (out / "summary.md").read_text()


def test_fresh_init_of_the_family_is_seeded():
    family = make_family(minatar())
    a, b = initial_theta(family, 0), initial_theta(family, 0)
    assert np.array_equal(a, b) and a.size == sum(p.numel() for p in family.make_model().parameters())


def test_a_skip_that_does_not_fit_a_fold_is_one_line_exit_2(tmp_path, capsys):
    """Five games: a fold trains on four, so skip 5 fits the config but not a fold."""
    out = tmp_path / "loo"
    code = main(["sweep", "--config", str(CONFIGS / "minatar.yaml"), "--skips", "1,5", "--folds", "loo",
                 "--local", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "meta.skip = 5 does not fit the 4 training games of a fold" in err
    assert not out.exists()


def test_learn_refuses_unknown_games_and_a_finished_directory(tmp_path, capsys):
    base = ["learn", "--config", str(CONFIGS / "minatar.yaml"), "--set", "log.wandb_mode=disabled"]
    assert main([*base, "--games", "pong", "--out", str(tmp_path / "a")]) == 2
    assert "unknown MinAtar game 'pong'" in capsys.readouterr().err and not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval.json").write_text("{}")
    assert main([*base, "--games", "breakout", "--out", str(tmp_path / "b")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "b" / "eval.json").read_text() == "{}"  # nothing overwritten


def test_learn_takes_the_finetuners_own_rollout_length(tmp_path, capsys):
    """finetune.rollout_len: one update per num_envs x T steps with T the fine-tuner's own."""
    import csv

    out = tmp_path / "l"
    assert main(["learn", "--config", str(CONFIGS / "minatar.yaml"), "--set", "log.wandb_mode=disabled",
                 "--set", "env.num_envs=4", "--set", "finetune.rollout_len=8", "--games", "breakout",
                 "--steps", "96", "--seeds", "1", "--points", "3", "--local", "--out", str(out)]) == 0
    steps = [int(r["env_steps"]) for r in csv.DictReader(open(out / "eval_curves.csv"))]
    assert steps == [32, 64, 96]  # 4 envs x 8 steps per update, not env.rollout_len
    assert main(["learn", "--config", str(CONFIGS / "minatar.yaml"), "--set", "finetune.rollout_len=-1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "finetune.rollout_len = -1" in capsys.readouterr().err
