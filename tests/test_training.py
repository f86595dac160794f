"""`metarl training`: the training games' returns and adaptation gains, read from a real run."""

from __future__ import annotations

import csv
import json
import math

import pytest

from metarl.cli import main

from conftest import CONFIGS, assert_png

pytest.importorskip("minatar")


def test_training_report_from_a_real_run(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "report"
    sets = {"tasks.train": "[breakout,space_invaders]", "env.num_envs": 4, "env.rollout_len": 8,
            "meta.outer_epochs": 2, "meta.outer_minibatches": 2, "log.wandb_mode": "disabled"}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main(["run", "--config", str(CONFIGS / "minatar.yaml"), "--local", "--iterations", "3", "--out", str(run_dir),
                 *args]) == 0
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for g in ("breakout", "space_invaders"):  # every task led and evaluated (skip 1): both rates exist
        assert math.isfinite(rec[f"rate_pre/{g}"]) and math.isfinite(rec[f"rate_post/{g}"])
    assert rec["outer/steps"] == 4
    from metarl.experiments import training
    run = training.read_run(run_dir)  # the last 40% of 3 iterations' steps: the last iteration only
    assert training.last_share_rate(run, "breakout", 0.4) == pytest.approx(rec["rate_post/breakout"])
    rates = [r["rate_post/space_invaders"] for r in run["rows"]]
    assert training.last_share_rate(run, "space_invaders", 1.0) == pytest.approx(sum(rates) / 3)
    assert main(["training", f"ppo={run_dir}", "--out", str(out), "--window", "1"]) == 0
    per_run = list(csv.DictReader(open(out / "training_ppo_seed0.csv")))
    assert len(per_run) == 3 * 2  # iterations x games
    assert {r["game"] for r in per_run} == {"breakout", "space_invaders"}
    steps = [float(r["env_steps_per_game"]) for r in per_run if r["game"] == "breakout"]
    assert steps == [2 * 4 * 8.0 * i for i in range(1, 4)]  # (adapt + eval) x 4 games x 8 steps per iteration, per game
    summary = list(csv.DictReader(open(out / "training_summary.csv")))
    assert [r["game"] for r in summary] == ["breakout", "space_invaders", "all games"]
    assert "(1 run)" in summary[-1]["adaptation_gain_rate"]
    assert_png(out / "training.png")
    capsys.readouterr()
    assert main(["training", f"ppo={run_dir}", "--out", str(out)]) == 2  # nothing overwritten
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["training", f"ppo={tmp_path}", "--out", str(tmp_path / "x")]) == 2
