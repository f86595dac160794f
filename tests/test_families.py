"""The sinusoid and 2D-navigation families: their definitions, a short meta-training run that must
adapt clearly better than a jointly pre-trained network, real Ray actors with skip 2, and the
`metarl fewshot` outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO, assert_png
from metarl.core import config as config_mod
from metarl.experiments import fewshot, fewshot_cli, pretrain
from metarl.distributed import profiling
from metarl.core.config import Config, ConfigError, LossConfig, MetaConfig, Nav2dConfig, SinusoidConfig, TasksConfig
from metarl.core.losses import gae
from metarl.core.meta import make_groups
from metarl.core.policy import init_params
from metarl.distributed.run import run
from metarl.tasks.nav2d import Nav2dFamily, advantages, discounted, goal_of
from metarl.tasks.sinusoid import SinusoidFamily, curve, task_names
from metarl.distributed.tracking import read_metrics

# ---- definitions ---------------------------------------------------------------------------------------


def test_a_sine_name_fixes_the_curve_and_the_seed_only_the_points():
    cfg = SinusoidConfig(k_shot=7)
    fam = SinusoidFamily(cfg)
    a, b, other = fam.make_task("sine-0017", 1), fam.make_task("sine-17", 2), fam.make_task("sine-0018", 1)
    assert (a.amplitude, a.phase) == (b.amplitude, b.phase) == curve(17, cfg)
    assert (a.amplitude, a.phase) != (other.amplitude, other.phase)
    ba, bb = a.draw(7), b.draw(7)
    assert not torch.equal(ba.data["x"], bb.data["x"])  # different seeds, different points
    assert torch.equal(fam.make_task("sine-0017", 1).draw(7).data["x"], ba.data["x"])
    torch.testing.assert_close(ba.data["y"], a.amplitude * torch.sin(ba.data["x"] - a.phase))
    curves = np.array([curve(i, cfg) for i in range(2000)])
    assert curves[:, 0].min() >= 0.1 and curves[:, 0].max() <= 5.0 and curves[:, 0].std() > 1.2
    assert curves[:, 1].min() >= 0.0 and curves[:, 1].max() <= np.pi
    model = fam.make_model()
    batch = a.sample(model, init_params(model))
    assert batch.env_steps == 7 and batch.data["x"].shape == (7, 1)
    assert batch.mean_return == pytest.approx(-float(a.loss(model, init_params(model), batch)[0]), rel=1e-5)
    with pytest.raises(ConfigError, match="sine-<index>"):
        fam.make_task("pong", 0)


def test_nav2d_moves_are_clipped_rewards_are_minus_distance_and_episodes_end_at_the_goal():
    cfg = Nav2dConfig(episodes=6, horizon=30, init_log_std=0.5)  # many actions saturate
    fam = Nav2dFamily(cfg, LossConfig())
    task = fam.make_task("goal-0003", 0)
    torch.manual_seed(0)  # the network's draw decides whether an episode reaches the goal early (fewer rows)
    model = fam.make_model()
    batch = task.sample(model, init_params(model))
    obs, actions = batch.data["obs"].reshape(30, 6, 2), batch.data["actions"].reshape(30, 6, 2)
    moves = obs[1:] - obs[:-1]
    torch.testing.assert_close(moves, 0.1 * actions[:-1].clamp(-1, 1))
    assert (actions.abs() > 1).float().mean() > 0.2
    assert (obs[0] == 0).all() and moves.abs().max() <= 0.1 + 1e-6
    last = obs[-1] + 0.1 * actions[-1].clamp(-1, 1)
    expected = -(torch.cat([obs[1:], last[None]]) - task.goal.float()).norm(dim=-1).sum(0)
    np.testing.assert_allclose(batch.episode_returns, expected.numpy(), rtol=1e-4)
    gx, gy = goal_of(3, cfg)
    assert -0.5 <= gx <= 0.5 and -0.5 <= gy <= 0.5 and (gx, gy) != goal_of(4, cfg)
    # a huge tolerance ends every episode at its first step
    short = Nav2dFamily(dataclasses.replace(cfg, goal_tolerance=10.0), LossConfig()).make_task("goal-0003", 0)
    assert short.sample(model, init_params(model)).env_steps == 6


def test_nav2d_advantages_are_gae_with_frozen_episodes():
    rng = np.random.default_rng(0)
    T, B = 12, 5
    rewards, values = torch.tensor(rng.normal(size=(T, B))), torch.tensor(rng.normal(size=(T, B)))
    ends = torch.tensor([3, 12, 7, 1, 12])  # steps each episode lasted
    alive = (torch.arange(T)[:, None] < ends[None, :]).double()
    rewards = rewards * alive
    dones = torch.zeros(T, B, dtype=torch.float64)
    dones[ends - 1, torch.arange(B)] = 1.0
    for gamma, lam in ((0.99, 1.0), (0.9, 0.95)):
        expected, _ = gae(rewards, values * alive, dones, torch.zeros(B, dtype=torch.float64), gamma, lam)
        torch.testing.assert_close(advantages(rewards, values, alive, gamma, lam), expected * alive)
    x = torch.tensor(rng.normal(size=(T, B)))
    slow = torch.stack([sum(0.7 ** (l - t) * x[l] for l in range(t, T)) for t in range(T)])
    torch.testing.assert_close(discounted(x, 0.7), slow)


def test_config_rejects_names_of_another_family():
    cfg = config_mod.load(CONFIGS / "sinusoid.yaml")
    with pytest.raises(ConfigError, match="sine-<index>"):
        config_mod.validate(config_mod.override(cfg, "tasks.train", "[sine-1, goal-2]"))
    with pytest.raises(ConfigError, match="amp_range"):
        config_mod.validate(config_mod.override(cfg, "sinusoid.amp_range", "[5, 0.1]"))


# ---- meta-training adapts: a reduced version of the paper's sinusoid experiment --------------------------


@pytest.fixture(scope="module")
def sine_runs(tmp_path_factory):
    """MAML meta-training through the real run loop (local actors) and the joint pre-training baseline."""
    root = tmp_path_factory.mktemp("sine")
    cfg = config_mod.validate(Config(
        tasks=TasksConfig(family="sinusoid", train=task_names(0, 25)),
        sinusoid=SinusoidConfig(k_shot=10),
        meta=MetaConfig(algo="maml", inner_lr=0.01, outer_lr=0.01, max_grad_norm=10.0, iterations=250,
                        checkpoint_every=250, seed=0),
        ray=dataclasses.replace(Config().ray, workers=1),
        log=dataclasses.replace(Config().log, wandb_mode="disabled", progress=False),
    ))
    run(cfg, root / "maml", local=True, log=lambda *_: None)
    pretrain.pretrain(cfg, root / "pretrained", iterations=150, lr=0.01, log=lambda *_: None)
    return root


def test_meta_trained_init_adapts_far_better_than_pretrained(sine_runs):
    maml = fewshot.load_init("maml", str(sine_runs / "maml"))
    pre = fewshot.load_init("pre-trained", str(sine_runs / "pretrained"))
    names = fewshot.heldout_names(maml.cfg, fewshot.HELDOUT_FIRST, 40)
    ours = fewshot.sine_curves(maml, names, shots=10, lrs=(maml.inner_lr,) * 5, query=100, seed=1).mean(0)
    base = fewshot.sine_curves(pre, names, shots=10, lrs=(0.01,) * 5, query=100, seed=1).mean(0)
    assert ours[1] < 0.6 * ours[0], ours  # one step on 10 points removes most of the error
    assert ours[5] < 0.5 * ours[0], ours
    assert ours[5] < 0.6 * base[5], (ours, base)  # and beats joint pre-training by a wide margin
    rand = fewshot.sine_curves(fewshot.random_init(maml.cfg), names, shots=10, lrs=(), query=100,
                               seed=1).mean(0)
    assert base[0] < rand[0], (base, rand)  # the baseline did learn: the mean curve beats a random net
    rows = read_metrics(sine_runs / "maml" / "metrics.jsonl")
    assert len(rows) == 250 and all(r["adaptations"] == 25 and r["evaluations"] == 25 for r in rows)
    assert np.mean([r["loss/outer"] for r in rows[-25:]]) < 0.6 * np.mean([r["loss/outer"] for r in rows[:25]])


def test_fewshot_eval_writes_table_json_and_plot(sine_runs, tmp_path):
    out = tmp_path / "fs"
    code = fewshot_eval(sine_runs, out, "--pretrained", str(sine_runs / "pretrained"), "--sgd-steps", "0,1")
    assert code == 0
    result = json.loads((out / "fewshot.json").read_text())
    assert [r["init"] for r in result["rows"]] == ["maml", "pre-trained", "random init"]
    assert result["rows"][1]["inner_lr"] in fewshot.LR_GRID  # tuned on validation tasks
    assert "| maml | 5 | 0.01 |" in (out / "fewshot.md").read_text()
    assert_png(out / "fewshot.png")
    with pytest.raises(ConfigError, match="--episodes 1"):
        fewshot_eval(sine_runs, tmp_path / "e", "--no-random", "--sgd-steps", "0", "--episodes", "1")
    for later in ("tune", "0.003"):  # a step size after the trained steps: tuned on validation tasks, or given
        out = tmp_path / f"later-{later}"
        fewshot_eval(sine_runs, out, "--no-random", "--sgd-steps", "0,2", "--later-lr", later)
        row = json.loads((out / "fewshot.json").read_text())["rows"][0]
        assert row["inner_lr"] == 0.01 and row["later_from_step"] == 2
        if later == "tune":  # one step (step 2) after the trained one: one tuned size
            assert len(row["later_lr"]) == 1 and row["later_lr"][0] in [0.01 / 2 ** k for k in range(8)]
        else:
            assert row["later_lr"] == [0.003]
    assert "then 0.003 from step 2" in (out / "fewshot.md").read_text()
    assert fewshot.schedule(0.5, (0.1,), 1, 3) == (0.5, 0.1, 0.1) and fewshot.schedule(0.5, (0.1,), 2, 3) == (0.5, 0.5, 0.1)
    assert fewshot.schedule(0.5, (0.2, 0.1), 1, 4) == (0.5, 0.2, 0.1, 0.1)
    with pytest.raises(ConfigError, match="--later-lr"):
        fewshot_eval(sine_runs, tmp_path / "f", "--no-random", "--sgd-steps", "0", "--later-lr", "fast")
    with pytest.raises(ConfigError, match="LABEL="):
        fewshot_eval(sine_runs, tmp_path / "g", "--no-random", "--checkpoint", "nonsense")


def fewshot_eval(sine_runs, out, *flags: str) -> int:
    """`metarl fewshot eval --checkpoint maml=RUN` on 4 tasks, K = 5, 20 query points, and `flags`,
    as the CLI parses them."""
    from metarl.cli import build_parser

    args = build_parser().parse_args(["fewshot", "eval", "--checkpoint", f"maml={sine_runs / 'maml'}", "--tasks", "4",
                                      "--shots", "5", "--query", "20", *flags, "--out", str(out)])
    return fewshot_cli.cmd_eval(args)


def test_fewshot_cost_reports_every_algorithm():
    cfg = config_mod.validate(Config(tasks=TasksConfig(family="sinusoid", train=task_names(0, 4)),
                                     meta=MetaConfig(skip=2, inner_steps=2)))
    rows = profiling.cost(cfg, iterations=2, log=lambda *_: None)
    assert [r["algo"] for r in rows] == ["maml", "fomaml", "reptile"]
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in rows)
    # each algorithm's time relative to maml's (the first row): checked on the rows where it is not
    # 1 by construction, and against the seconds each row reports
    maml_s = rows[0]["seconds"]
    for r in rows[1:]:
        assert r["vs_maml"] == pytest.approx(r["seconds"] / maml_s, rel=1e-12), r


def test_fewshot_cost_times_the_trust_region_step_on_nav2d():
    """configs/nav2d.yaml (meta.outer = trpo): maml and fomaml are timed with the KL-constrained step
    they train with; reptile, which has no surrogate to constrain, with Adam."""
    cfg = config_mod.load(CONFIGS / "nav2d.yaml")
    for key, value in (("tasks.train", "[goal-0, goal-1, goal-2]"), ("nav2d.episodes", 3), ("nav2d.horizon", 6)):
        cfg = config_mod.override(cfg, key, value)
    rows = profiling.cost(config_mod.validate(cfg), iterations=1, log=lambda *_: None)
    assert [(r["algo"], r["outer"]) for r in rows] == [("maml", "trpo"), ("fomaml", "trpo"), ("reptile", "adam")]
    assert all(r["seconds"] > 0 for r in rows)


def test_fewshot_cli_bad_input_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "metarl", "fewshot", "eval", "--checkpoint", f"maml={tmp_path}",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().startswith("metarl: error:") and "no checkpoint" in p.stderr


# ---- real Ray actors, skip 2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family,batching", [("sinusoid", "stacked"), ("nav2d", "stacked"), ("nav2d", "per_task")])
def test_family_runs_through_ray_actors_with_skip_2(family, batching, ray_session, tmp_path):
    base = config_mod.load(CONFIGS / f"{family}.yaml")
    prefix = "sine" if family == "sinusoid" else "goal"
    cfg = dataclasses.replace(
        base,
        tasks=dataclasses.replace(base.tasks, train=tuple(f"{prefix}-{i}" for i in range(4)), heldout=(),
                                  resample=batching == "stacked"),
        meta=dataclasses.replace(base.meta, algo="maml", skip=2, iterations=2, checkpoint_every=2, task_batching=batching,
                                 outer="adam" if batching == "per_task" else base.meta.outer),
        nav2d=dataclasses.replace(base.nav2d, episodes=4, horizon=20),
        ray=dataclasses.replace(base.ray, workers=2, num_cpus=2),
        log=dataclasses.replace(base.log, wandb_mode="disabled", progress=False, every=1),
    )
    summary = run(config_mod.validate(cfg), tmp_path / "run", local=False, log=lambda *_: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and summary["iterations"] == 2
    for r in rows:
        assert r["adaptations"] == 2 and r["evaluations"] == 4 and r["evaluations_used"] == 4
        assert r["tasks_dropped"] == [] and not r["update_skipped"] and r["grad/update_norm"] > 0
        if cfg.meta.outer == "trpo":  # configs/nav2d.yaml: the KL-constrained step, searched over both workers
            assert 0 < r["trust/kl"] <= cfg.meta.max_kl and 0 < r["trust/step_fraction"] <= 1
    assert (family == "nav2d" and batching == "stacked") == (cfg.meta.outer == "trpo")
    assert (tmp_path / "run" / "checkpoints" / "ckpt_000002.pt").exists()


# ---- stacked mode: logging windows, dealing groups, a failing worker ---------------------------------------


def _tiny_sine(**meta) -> Config:
    return config_mod.validate(Config(
        tasks=TasksConfig(family="sinusoid", train=task_names(0, 6), resample=True),
        sinusoid=SinusoidConfig(k_shot=5, hidden=(8, 8)),
        meta=MetaConfig(**{"algo": "maml", "skip": 2, "iterations": 7, "checkpoint_every": 7, **meta}),
        ray=dataclasses.replace(Config().ray, workers=2),
        log=dataclasses.replace(Config().log, wandb_mode="disabled", progress=False, every=3),
    ))


def test_log_every_writes_one_averaged_row_per_window(tmp_path):
    run(_tiny_sine(), tmp_path / "r", local=True, log=lambda *_: None)
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [3, 6, 7]
    assert [r["iterations_in_row"] for r in rows[:2]] == [3, 3] and "iterations_in_row" not in rows[2]
    assert rows[-1]["env_steps/total"] == 7 * (3 * 5 + 6 * 5)  # counters stay cumulative, not averaged
    assert all(r["updates_skipped"] == 0 and r["adaptations"] == 3 for r in rows[:2])


def test_deal_groups_balances_whole_groups():
    from metarl.distributed.iteration import deal_groups

    groups = make_groups(10, 3, np.random.default_rng(0))  # sizes 3, 3, 3, 1
    shares = deal_groups(groups, 2)
    assert sorted(g.members for s in shares for g in s) == sorted(g.members for g in groups)
    loads = [sum(len(g.members) + 1 for g in s) for s in shares]
    assert max(loads) - min(loads) <= 4


def test_a_failing_stacked_worker_drops_its_groups_and_the_rest_updates(tmp_path):
    from metarl.distributed.fleet import start_fleet
    from metarl.distributed.iteration import meta_iteration
    from metarl.distributed.worker import TaskWorker

    class Flaky(TaskWorker):
        calls = 0

        def groups_step(self, *args):
            Flaky.calls += 1
            if Flaky.calls == 2:  # the second worker of the first iteration
                raise RuntimeError("injected fault")
            return super().groups_step(*args)

    cfg = _tiny_sine()
    fleet = start_fleet(cfg, local=True, worker_cls=Flaky)
    groups = make_groups(6, 2, np.random.default_rng(1))
    theta0 = fleet.learner.get_theta()
    rec = meta_iteration(fleet, cfg.tasks.train, groups, "maml", timeout=60, iteration=0)
    assert len(rec["tasks_dropped"]) in (2, 4) and rec["evaluations_used"] == 6 - len(rec["tasks_dropped"])
    assert all("injected fault" in why for why in rec["drop_reasons"].values())
    assert not rec["update_skipped"] and np.abs(fleet.learner.get_theta() - theta0).max() > 0


def test_stacked_run_resumed_midway_ends_where_an_uninterrupted_one_does(tmp_path):
    """Each task's data come from (task seed, iteration) and the grouping RNG, theta and Adam are
    checkpointed, so stopping after 3 iterations and resuming to 6 gives the uninterrupted theta.
    Bit for bit on any CPU: both runs are in this process (local actors, called in a fixed order), the
    checkpoint stores float32 theta and Adam's state losslessly, and so the resumed run repeats the
    same float operations on the same inputs with the same kernels. (Two machines need not agree.)"""
    from metarl.core import checkpoint

    whole = dataclasses.replace(_tiny_sine(), meta=dataclasses.replace(_tiny_sine().meta, iterations=6, checkpoint_every=3))
    run(whole, tmp_path / "whole", local=True, log=lambda *_: None)
    first = dataclasses.replace(whole, meta=dataclasses.replace(whole.meta, iterations=3))
    run(first, tmp_path / "split", local=True, log=lambda *_: None)
    run(whole, tmp_path / "split", resume=True, local=True, log=lambda *_: None)
    a = checkpoint.load(checkpoint.latest(tmp_path / "whole"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    assert a["iteration"] == b["iteration"] == 6
    assert torch.equal(a["theta"], b["theta"])
    fresh = checkpoint.load(sorted((tmp_path / "whole" / "checkpoints").glob("*.pt"))[0])
    assert not torch.equal(fresh["theta"], a["theta"])  # it did move between the checkpoints


def test_trust_region_run_resumed_midway_ends_where_an_uninterrupted_one_does(tmp_path):
    """meta.outer = trpo keeps no optimiser state beyond theta, and its curvature subsample comes from
    the iteration: a nav2d TRPO run stopped after 2 iterations and resumed to 4 ends at the same theta,
    bit for bit on any CPU for the reasons above (one process, fixed order, lossless checkpoint; the
    driver's CG and line search are deterministic float64 code)."""
    from metarl.core import checkpoint

    cfg = config_mod.load(CONFIGS / "nav2d.yaml")
    for key, value in (("tasks.train", "[goal-0, goal-1, goal-2, goal-3]"), ("nav2d.episodes", 3),
                       ("nav2d.horizon", 8), ("meta.iterations", 4), ("meta.checkpoint_every", 2),
                       ("ray.workers", 2), ("log.wandb_mode", "disabled"), ("log.every", 1)):
        cfg = config_mod.override(cfg, key, value)
    whole = config_mod.validate(cfg)
    run(whole, tmp_path / "whole", local=True, log=lambda *_: None)
    run(config_mod.override(whole, "meta.iterations", 2), tmp_path / "split", local=True, log=lambda *_: None)
    run(whole, tmp_path / "split", resume=True, local=True, log=lambda *_: None)
    a = checkpoint.load(checkpoint.latest(tmp_path / "whole"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    assert a["iteration"] == b["iteration"] == 4
    assert torch.equal(a["theta"], b["theta"])
    rows = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert len(rows) == 4 and all(0 <= r["trust/kl"] <= whole.meta.max_kl for r in rows)
    assert sum(not r["update_skipped"] for r in rows) >= 3  # the line search accepts (almost) every step
