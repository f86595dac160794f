"""`metarl probe`: one inner SGD step of alpha against one fine-tuner update, on a real MinAtar rollout."""

from __future__ import annotations

import csv
import math

import pytest

from conftest import CONFIGS
from metarl.cli import main
from metarl.experiments.probe import kl_match

pytest.importorskip("minatar")


def test_kl_match_interpolates_on_log_log_axes():
    alphas = [0.001, 0.01, 0.1]
    kls = [a * a for a in alphas]  # the small-step regime: KL grows as alpha^2
    assert math.isclose(kl_match(alphas, kls, 1e-4), 0.01, rel_tol=1e-9)
    assert math.isclose(kl_match(alphas, kls, 1e-3), math.sqrt(1e-3), rel_tol=1e-9)
    assert math.isnan(kl_match(alphas, kls, 1.0))  # beyond the probed alphas: not extrapolated


def test_probe_measures_the_inner_step_and_the_finetuner_update(tmp_path, capsys):
    out = tmp_path / "probe"
    rc = main(["probe", "--config", str(CONFIGS / "minatar.yaml"), "--games", "breakout", "--seeds", "2",
               "--alphas", "0.001,0.01,0.1,1", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader((out / "probe.csv").open()))
    for seed in ("0", "1"):
        inner = [r for r in rows if r["seed"] == seed and r["learner"] == "inner SGD step"]
        assert [float(r["alpha"]) for r in inner] == [0.001, 0.01, 0.1, 1.0]
        kl = [float(r["kl"]) for r in inner]
        assert all(a < b for a, b in zip(kl, kl[1:])), kl  # a longer step moves the policy further
        # a small step is in the quadratic regime of the KL: 10x the step, ~100x the KL
        assert 30 < kl[1] / kl[0] < 300, kl
        step = [float(r["rel_step"]) for r in inner]
        assert math.isclose(step[1] / step[0], 10.0, rel_tol=1e-6)  # |alpha g| / |theta| is linear in alpha
        dv = [float(r["dv"]) for r in inner]
        assert dv[-1] > dv[0] > 0
        ref = [r for r in rows if r["seed"] == seed and r["learner"].startswith("fine-tuner update")]
        assert len(ref) == 1 and float(ref[0]["kl"]) > 0 and float(ref[0]["rel_step"]) > 0
    assert (out / "probe.png").stat().st_size > 0
    summary = (out / "probe_summary.md").read_text()
    assert "SGD, α = 0.01" in summary and "fine-tuner update" in summary
    assert "α moving the policy as far as one fine-tuner update" in capsys.readouterr().out


def test_probe_refuses_bad_input_and_keeps_an_earlier_probe(tmp_path, capsys):
    cfg = str(CONFIGS / "minatar.yaml")
    assert main(["probe", "--config", cfg, "--alphas", "0.1,-1", "--out", str(tmp_path / "a")]) == 2
    assert "positive" in capsys.readouterr().err
    assert main(["probe", "--config", cfg, "--alphas", "0.1,x", "--out", str(tmp_path / "a")]) == 2
    assert main(["probe", "--config", cfg, "--games", "breakot", "--out", str(tmp_path / "a")]) == 2
    assert "breakot" in capsys.readouterr().err
    assert main(["probe", "--config", str(CONFIGS / "sinusoid.yaml"), "--out", str(tmp_path / "a")]) == 2
    assert "policy and a value" in capsys.readouterr().err
    assert main(["probe", "--config", cfg, "--checkpoint", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "--set" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "probe.csv").write_text("earlier")
    assert main(["probe", "--config", cfg, "--out", str(kept)]) == 2
    assert (kept / "probe.csv").read_text() == "earlier"
