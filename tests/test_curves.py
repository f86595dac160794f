"""`metarl curve`: running means against env steps (frames beside) from learn and run outputs, beside
references."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from metarl.cli import main
from metarl.experiments.curves import Episodes


def test_running_mean_and_value_at_frames():
    e = Episodes("x", "pong", 0, env_steps=np.array([10.0, 20.0, 30.0, 40.0]), frames=np.array([40.0, 80.0, 120.0, 160.0]),
                 returns=np.array([1.0, 3.0, 5.0, 7.0]))
    assert e.running(2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert e.running(10).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert e.at(25, 2) == 2.0  # episodes ended by frame 25: 1, 3
    assert e.at(40, 3) == 5.0
    assert math.isnan(e.at(5, 2))  # none ended yet
    assert math.isnan(e.at(100, 2))  # the learner never got that far


def write_learn(path, rows):
    path.mkdir()
    with open(path / "episodes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["game", "init", "seed", "env_steps", "frames", "return"])
        w.writeheader()
        w.writerows(rows)


def test_curve_reads_learn_and_run_outputs_and_tabulates_with_references(tmp_path, capsys):
    learn = tmp_path / "learn"
    write_learn(learn, [{"game": "pong", "init": "fresh", "seed": s, "env_steps": k * 250, "frames": k * 1000,
                         "return": -21 + k + s} for s in (0, 1) for k in range(1, 11)])
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for it in range(1, 6):
            f.write(json.dumps({"iteration": it, "env_steps/total": it * 500, "frames/total": it * 2000, "episodes_pre/pong": [-20.0 + it],
                                "episodes_post/pong": [-19.0 + it] if it % 2 else [],
                                "return_pre/pong": -20.0 + it}) + "\n")
    refs = tmp_path / "refs.csv"
    refs.write_text("game,source,frames,value,protocol\npong,PPO (paper),10000,-5,no sticky actions\n"
                    "pong,PPO (paper),5000,-12,no sticky actions\n")
    out = tmp_path / "out"
    rc = main(["curve", f"A2C={learn}", f"meta={run}", "--out", str(out), "--window", "3",
               "--at-steps", "1250,2500", "--references", str(refs)])
    assert rc == 0
    assert (out / "curve_pong.png").stat().st_size > 0
    points = list(csv.DictReader(open(out / "curve_points.csv")))
    by = {(p["source"], p["seed"], int(p["env_steps"])): float(p["running_return"]) for p in points}
    assert {(int(p["env_steps"]), int(p["frames"])) for p in points} == {(1250, 5000), (2500, 10000)}
    # learn, seed 1, at 1250 env steps: episodes k = 3, 4, 5 -> returns -21 + k + 1
    assert by[("A2C", "1", 1250)] == pytest.approx(np.mean([-17, -16, -15]))
    # run at 2500 env steps (iteration 5): the last 3 episodes are post(it 3), pre(it 4)... in order
    run_eps = [r for it in range(1, 6) for r in ([-20.0 + it] + ([-19.0 + it] if it % 2 else []))]
    assert by[("meta", "0", 2500)] == pytest.approx(np.mean(run_eps[-3:]))
    table = (out / "curve_summary.md").read_text()
    assert "(2 seeds)" in table and table.count("reference: PPO (paper)") == 1 and "| -12 | -5 |" in table
    assert "1,250 env steps (0.005M frames)" in table  # env steps, frames beside them
    assert table in capsys.readouterr().out


def test_curve_refuses_a_directory_without_episodes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["curve", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds neither episodes.csv" in err and len(err.strip().splitlines()) == 1
    assert main(["curve", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--at-steps", "1M"]) == 2
    assert "--at-steps" in capsys.readouterr().err
