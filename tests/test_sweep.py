"""`metarl sweep`: budget matching, a smoke sweep end to end (table, plots, curves), and a resumed
sweep that leaves finished configurations alone and continues the partial ones."""

from __future__ import annotations

import csv
import json

import pytest

from metarl.core import checkpoint, config as config_mod
from metarl.cli import main
from metarl.experiments.sweep import PROBE_ITERATIONS, iteration_env_steps, side_by_side, target_iterations, train_for_seconds
from metarl.distributed.tracking import read_metrics

from conftest import CONFIGS, smoke, assert_png, PER_ROLLOUT







def mtimes(*paths) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def test_env_step_budgets_follow_the_rollout_count():
    cfg = config_mod.load(CONFIGS / "atari12.yaml")  # N = 12, S = 1, T x B = 1,024
    per_rollout = 16 * 64
    assert [iteration_env_steps(cfg, k) // per_rollout for k in (1, 2, 3, 4, 6)] == [24, 18, 16, 15, 14]
    budget = 100 * 24 * per_rollout  # what skip 1 spends in 100 iterations
    assert [target_iterations(cfg, k, "env_steps", budget) for k in (1, 2, 3, 4, 6)] == [100, 133, 150, 160, 171]
    assert target_iterations(cfg, 4, "iterations", 7) == 7 and target_iterations(cfg, 4, "seconds", 60) is None


def test_one_machine_runs_configurations_one_after_another(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = smoke()
    assert side_by_side(cfg, 3, local=True)[0] is False
    assert side_by_side(cfg, 3, local=False) == (False, "configurations run one after another (one machine)")


SWEEP = ["sweep", "--config", str(CONFIGS / "smoke.yaml"), "--skips", "1,3", "--set", "meta.iterations=2",
         "--set", "meta.checkpoint_every=1", "--set", "log.wandb_mode=disabled", "--no-progress",
         "--steps", str(2 * PER_ROLLOUT), "--seeds", "2", "--points", "2", "--local"]


def test_smoke_sweep_then_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main([*SWEEP, "--out", str(out)]) == 0
    cfg = smoke()

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["config"] for r in rows] == ["skip1", "skip3", "baseline"]
    assert {"skip", "iterations", "env_steps", "frames", "adaptations", "evaluations", "wall_s", "game",
            "auc_return_mean", "auc_return_std", "auc_reward_rate_mean", "auc_reward_rate_std",
            "steps_to_threshold_mean", "steps_to_threshold_std", "reached", "threshold"} <= set(rows[0])
    assert [int(r["iterations"]) for r in rows] == [2, 2, 0]
    assert [int(r["env_steps"]) for r in rows] == [2 * iteration_env_steps(cfg, 1), 2 * iteration_env_steps(cfg, 3), 0]
    assert [int(r["adaptations"]) for r in rows] == [2 * 3, 2 * 1, 0]  # ceil(N/k) per iteration
    assert [int(r["evaluations"]) for r in rows] == [2 * 3, 2 * 3, 0]  # N per iteration
    assert float(rows[0]["wall_s"]) > 0 and all(r["game"] == "boxing" and r["seeds"] == "2" for r in rows)
    assert all(float(r["auc_reward_rate_mean"]) == float(r["auc_reward_rate_mean"]) for r in rows)  # not NaN
    md = (out / "summary.md").read_text().splitlines()
    table = [ln for ln in md if ln.startswith("| ")]
    assert len(table) == 2 + 3 and "steps to threshold" in table[0] and table[2].startswith("| skip1 | 1 | 2 |")
    assert_png(out / "comparison.png")
    for label, init in (("skip1", "meta"), ("skip3", "meta"), ("baseline", "fresh")):
        assert_png(out / label / "eval" / "curves_boxing.png")
        result = json.loads((out / label / "eval" / "eval.json").read_text())
        assert [j["init"] for j in result["jobs"]] == [init, init]
        assert all(j["curve"]["env_steps"] == [PER_ROLLOUT, 2 * PER_ROLLOUT] for j in result["jobs"])
    assert json.loads((out / "skip3" / "eval" / "eval.json").read_text())["skip"] == 3

    # interrupt: skip3 lost its last checkpoint and its evaluation; the baseline lost its evaluation
    ckpt1, ckpt2 = (out / "skip3" / "checkpoints" / f"ckpt_00000{i}.pt" for i in (1, 2))
    ckpt2.unlink()
    (out / "skip3" / "eval" / "eval.json").unlink()
    (out / "baseline" / "eval" / "eval.json").unlink()
    finished = [checkpoint.latest(out / "skip1"), out / "skip1" / "eval" / "eval.json", out / "skip1" / "metrics.jsonl"]
    finished_before, ckpt1_before = mtimes(*finished), mtimes(ckpt1)
    capsys.readouterr()

    assert main(["sweep", "--resume", "--out", str(out), "--local"]) == 0
    log = capsys.readouterr().out
    assert "skip1 is finished; not re-run" in log and "resuming" in log and "at iteration 1" in log
    assert mtimes(*finished) == finished_before  # the finished configuration was not touched
    assert mtimes(ckpt1) == ckpt1_before and ckpt2.exists()  # skip3 resumed from its checkpoint
    assert [r["iteration"] for r in read_metrics(out / "skip3" / "metrics.jsonl")] == [1, 2]
    assert [r["iteration"] for r in read_metrics(out / "skip3" / "metrics.discarded.jsonl")] == [2]
    assert (out / "baseline" / "eval" / "eval.json").exists()
    assert [r["config"] for r in csv.DictReader(open(out / "summary.csv"))] == ["skip1", "skip3", "baseline"]


def test_sweep_matches_seconds_from_the_command_line(tmp_path, monkeypatch):
    """--match seconds --train-budget S: each configuration trains for S seconds of meta-iterations
    (train_for_seconds; here less than its measuring chunk of PROBE_ITERATIONS), then is evaluated."""
    from metarl.experiments import sweep as sweep_mod

    budgets, real = [], sweep_mod.train_for_seconds
    monkeypatch.setattr(sweep_mod, "train_for_seconds",
                        lambda cfg, run_dir, seconds, *a, **kw: (budgets.append(seconds), real(cfg, run_dir, seconds, *a, **kw)))
    out = tmp_path / "sweep"
    assert main([*SWEEP[:4], "1", *SWEEP[5:], "--seeds", "1", "--no-baseline", "--match", "seconds",
                 "--train-budget", "0.001", "--out", str(out)]) == 0
    assert budgets == [0.001]
    spec = json.loads((out / "sweep.json").read_text())["spec"]
    assert (spec["match"], spec["budget"]) == ("seconds", 0.001)
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["config"], int(r["iterations"])) for r in rows] == [("skip1", PROBE_ITERATIONS)]


def test_sweep_refuses_to_reuse_or_reshape(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "note.txt").write_text("x")
    assert main([*SWEEP, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["sweep", "--resume", "--out", str(out)]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    assert main(["sweep", "--resume", "--out", str(out), "--skips", "1"]) == 2
    assert "drop --skips" in capsys.readouterr().err
    assert main([*SWEEP[:4], "1,4", "--out", str(tmp_path / "new")]) == 2  # smoke has 3 tasks
    assert "meta.skip" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_seconds_budget_measures_then_extends(tmp_path):
    """Real training: a budget below the measuring chunk stops after it; a budget of 2.6 x the
    chunk's wall time extends the run by at least floor(1.6 / 0.5) = 3 iterations at the rate the
    chunk measured, whatever the machine's speed (the rate is measured, not assumed)."""
    cfg = smoke(**{"meta.skip": 3})
    run_dir = tmp_path / "skip3"
    train_for_seconds(cfg, run_dir, 1e-3, local=True, log=lambda _: None)  # only the measuring chunk
    state = checkpoint.load(checkpoint.latest(run_dir))
    assert state["iteration"] == PROBE_ITERATIONS
    wall = state["counters"]["wall_s"]
    train_for_seconds(cfg, run_dir, 2.6 * wall, local=True, log=lambda _: None)
    state = checkpoint.load(checkpoint.latest(run_dir))
    assert state["iteration"] >= PROBE_ITERATIONS + 3
    assert state["counters"]["wall_s"] > wall


@pytest.mark.parametrize("per_iteration, budget, expected", [
    (1.25, 10.0, 8),   # 8 x 1.25 = 10 fits exactly; a 9th would not
    (0.75, 10.0, 13),  # 13 x 0.75 = 9.75; 14 would need 10.5
    (3.0, 10.0, 3),    # one chunk past the probe: 3 x 3 = 9
    (6.0, 10.0, 2),    # the probe alone (12 s) is already over: nothing more
])
def test_seconds_budget_stops_at_the_last_iteration_that_fits(tmp_path, monkeypatch, per_iteration, budget, expected):
    """With a clock where every iteration costs the same, training for `budget` seconds ends at the
    largest iteration count whose time fits the budget (never less than the measuring chunk)."""
    import torch

    from metarl.experiments import sweep

    chunks = []

    def fake_train_to(cfg, run_dir, local, log, label=""):
        n = cfg.meta.iterations
        chunks.append(n)
        checkpoint.save(run_dir, {"theta": torch.zeros(1), "optimizer": {}, "iteration": n,
                                  "counters": {"wall_s": n * per_iteration}})

    monkeypatch.setattr(sweep, "train_to", fake_train_to)
    train_for_seconds(smoke(), tmp_path / "run", budget, local=True, log=lambda _: None)
    done = checkpoint.load(checkpoint.latest(tmp_path / "run"))["iteration"]
    assert done == expected == max(PROBE_ITERATIONS, int(budget // per_iteration))
    assert chunks[0] == PROBE_ITERATIONS and chunks == sorted(set(chunks))  # measure first, never repeat
