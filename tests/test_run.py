"""End to end: real Ray actors on real ALE games, metrics, checkpoints, resume; and --local."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metarl.core import checkpoint, config as config_mod
from metarl.core.policy import NatureCNN, ParamSpec
from metarl.distributed.run import run
from metarl.distributed.tracking import read_metrics

from conftest import PER_ROLLOUT, smoke





def test_smoke_run_on_ray_with_skip_then_resume(ray_session, tmp_path):
    out = tmp_path / "run"
    notes: list[str] = []
    cfg = smoke(**{"meta.skip": 2, "meta.iterations": 4, "meta.checkpoint_every": 2})
    summary = run(cfg, out, log=notes.append)
    assert any("does not divide 3 tasks" in n and "[2, 1]" in n for n in notes), notes

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["skip"] == 2 and r["groups"] == 2 and r["group_sizes"] == [2, 1]
        assert r["adaptations"] == 2 and r["evaluations"] == 3  # N/k leaders adapt, all N evaluate
        assert r["env_steps/adapt"] == 2 * PER_ROLLOUT and r["env_steps/eval"] == 3 * PER_ROLLOUT
        assert r["frames/adapt"] == 4 * r["env_steps/adapt"]
        assert r["update_skipped"] is False and r["tasks_dropped"] == []
        assert r["grad/norm"] > 0 and r["time/iteration_s"] > 0
        assert {f"return_post/{g}" for g in ("pong", "breakout", "freeway")} <= set(r)
        assert sum(1 for k in r if k.startswith("return_pre/")) == 2
        for phase in ("pre", "post"):  # the episodes themselves, for `metarl curve`
            for key in (k for k in r if k.startswith(f"episodes_{phase}/")):
                game = key.split("/")[1]
                eps = r[key]
                assert r[f"return_{phase}/{game}"] == (pytest.approx(np.mean(eps)) if eps else None)
        assert sum(1 for k in r if k.startswith("episodes_post/")) == 3
    assert rows[-1]["env_steps/total"] == 4 * 5 * PER_ROLLOUT == summary["env_steps"]

    # checkpoints: atomic files with theta, Adam state, iteration, RNG state; no temp files left
    ckpts = checkpoint.list_checkpoints(out)
    assert [p.name for p in ckpts] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    state = checkpoint.load(ckpts[-1])
    numel = ParamSpec.of(NatureCNN()).numel
    assert state["iteration"] == 4 and state["theta"].shape == (numel,)
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (numel,)
    assert int(state["optimizer"]["state"][0]["step"]) == 4
    assert state["rng"]["bit_generator"] == "PCG64"
    assert state["config"]["meta"]["skip"] == 2
    assert (out / "config.yaml").exists() and config_mod.load(out / "config.yaml") == cfg
    theta2 = checkpoint.load(ckpts[0])["theta"]
    assert not torch.equal(theta2, state["theta"])  # theta moved between checkpoints

    # resume to 6 iterations: the count, theta and the grouping RNG carry on
    cfg6 = config_mod.override(cfg, "meta.iterations", 6)
    run(cfg6, out, resume=True, log=notes.append)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["env_steps/total"] == 6 * 5 * PER_ROLLOUT
    final = checkpoint.load(checkpoint.latest(out))
    assert final["iteration"] == 6 and int(final["optimizer"]["state"][0]["step"]) == 6
    assert any("resuming" in n and "iteration 4" in n for n in notes)


def test_resume_discards_rows_after_checkpoint_without_losing_them(tmp_path):
    out = tmp_path / "run"
    cfg = smoke(**{"meta.iterations": 2, "meta.checkpoint_every": 1})
    run(cfg, out, local=True)
    # simulate a driver that died after logging iteration 3 but before its checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "marker": "orphan"}) + "\n")
    run(config_mod.override(cfg, "meta.iterations", 3), out, resume=True, local=True)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3] and "marker" not in rows[-1]
    assert read_metrics(out / "metrics.discarded.jsonl")[0]["marker"] == "orphan"


def test_resume_refuses_changed_skip(tmp_path):
    out = tmp_path / "run"
    cfg = smoke(**{"meta.iterations": 1})
    run(cfg, out, local=True)
    from metarl.distributed.run import RunDirError

    with pytest.raises(RunDirError, match="meta.skip"):
        run(config_mod.override(cfg, "meta.skip", 3), out, resume=True, local=True)


def test_local_mode_matches_grouping_and_counts(tmp_path):
    cfg = smoke(**{"meta.skip": 3, "meta.iterations": 2, "meta.algo": "fomaml"})
    run(cfg, tmp_path / "r", local=True)
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert all(r["adaptations"] == 1 and r["evaluations"] == 3 for r in rows)
    assert np.isfinite(rows[-1]["grad/norm"])
