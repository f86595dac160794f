"""`metarl bench --quick` runs and reports every figure as a finite positive number.

The measured figures' values are not judged here (they depend on the machine and its load); that
they are all measured, printed as `name: value` and written to JSON is, and the expected skip
ratios (no measurement: a closed form) are checked against the count of rollouts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import CONFIGS, REPO

SKIPS = (2, 3, 4, 6)
FIGURES = (
    "sampling_ratio", "sampling_cpu_ratio", "raw_env_steps_per_s", "raw_frames_per_s",
    "sampling_env_steps_per_s", "sampling_frames_per_s",
    "gradient_ratio", "grad_samples_per_s", "bare_grad_samples_per_s",
    "iteration_s_skip_1", *[f"skip_ratio_{k}{s}" for k in SKIPS for s in ("", "_expected")],
    "end_to_end_ratio", "end_to_end_compute_bound", "end_to_end_env_steps_per_s", "end_to_end_frames_per_s",
    "fleet_sampling_env_steps_per_s", "fleet_grad_samples_per_s",
    "grad_on_worker_s", "grad_on_learner_s", "batch_ship_s", "grad_on_learner_speedup", "batch_mb",
    "memory_worker_peak_mb", "memory_learner_peak_mb", "memory_total_peak_rss_mb", "memory_total_pss_mb",
)


def rollout_share(n: int, k: int, s: int) -> float:
    """Rollouts of a skip-k iteration over a skip-1 one, with equal cost per rollout: ceil(N/k)
    leaders adapt with S rollouts each, all N tasks evaluate with one (skip 1: N S + N)."""
    leaders = -(-n // k)
    return (leaders * s + n) / (n * s + n)


def test_expected_skip_ratio_is_the_share_of_rollouts_skip_k_keeps():
    """bench's closed form against the rollouts make_groups' groups actually take (leaders adapt,
    every member evaluates; Reptile's members do not), and against hand-worked values for atari12
    (N = 12, S = 1) and S = 3."""
    import numpy as np

    from metarl.tools.bench import expected_skip_ratio
    from metarl.core.meta import make_groups

    rng = np.random.default_rng(0)
    for n in (3, 6, 7, 12):
        for k in range(1, n + 1):
            for s in (1, 2, 3):
                groups = make_groups(n, k, rng)
                taken = len(groups) * s + sum(len(g.members) for g in groups)
                for algo in ("fomaml", "maml"):
                    assert expected_skip_ratio(n, k, s, algo) == taken / (n * s + n), (n, k, s, algo)
                assert expected_skip_ratio(n, k, s, "reptile") == len(groups) * s / (n * s), (n, k, s)
    assert [expected_skip_ratio(12, k, 1, "fomaml") for k in (2, 3, 4, 6)] == [18 / 24, 16 / 24, 15 / 24, 14 / 24]
    assert expected_skip_ratio(12, 4, 3, "fomaml") == (3 * 3 + 12) / (12 * 3 + 12)
    assert expected_skip_ratio(12, 4, 3, "reptile") == 3 / 12


def test_quick_bench_prints_every_figure(tmp_path):
    out = tmp_path / "bench"
    # Ray's socket paths must stay under 107 bytes: a short directory, not pytest's tmp_path
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    try:
        # --local: the fleet's actors in this process (the same classes and calls; Ray's own path is
        # what test_scale, test_run and test_faults drive), ~15 s instead of ~45 s in the suite
        p = subprocess.run([sys.executable, "-m", "metarl", "bench", "--quick", "--local", "--config",
                            str(CONFIGS / "atari12.yaml"), "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard, not a speed check
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stdout + p.stderr
    printed = {}
    for line in p.stdout.splitlines():
        if line.startswith("#") or ": " not in line:
            continue
        name, value = line.split(": ", 1)
        printed[name] = float(value)
    written = json.loads((out / "bench.json").read_text())
    for name in FIGURES:
        for where, figures in (("printed", printed), ("JSON", written["figures"])):
            assert name in figures, f"{name} not {where}:\n{p.stdout}"
            assert math.isfinite(figures[name]) and figures[name] > 0, f"{name} = {figures[name]} ({where})"
        # printed with 4 significant digits (:.4g): at most 5e-4 relative off the JSON value
        assert math.isclose(printed[name], written["figures"][name], rel_tol=1e-3)
    assert set(printed) == set(written["figures"])
    # the expected skip ratios are the closed form for the N tasks the skip ratios ran on (--quick:
    # the first 6 games of atari12.yaml) and its S = 1 inner step, computed here in the paper's terms
    n_tasks, inner_steps = written["context"]["tasks"], 1
    assert n_tasks == 6
    for k in SKIPS:
        expected = rollout_share(n_tasks, k, inner_steps)
        assert math.isclose(written["figures"][f"skip_ratio_{k}_expected"], expected, rel_tol=1e-12), k
    assert [round(rollout_share(6, k, 1), 4) for k in SKIPS] == [0.75, 0.6667, 0.6667, 0.5833]


def test_learner_bench_times_every_piece_of_work_and_refuses_a_missing_device(tmp_path, capsys):
    """`metarl bench --suite learner` on the CPU: every piece of work timed (positive, finite), the table
    printed, the JSON written; asking for a device torch does not see is one line and exit 2."""
    import torch

    from metarl.cli import main
    from metarl.tools.learner_bench import LABELS

    out = tmp_path / "learner"
    assert main(["bench", "--suite", "learner", "--devices", "cpu", "--evaluations", "1", "--min-seconds", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "learner.json").read_text())
    figures = result["devices"]["cpu"]
    assert set(figures) == set(LABELS)
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert all(label.format(n=1) in printed for label in LABELS.values())
    if not torch.cuda.is_available():
        assert main(["bench", "--suite", "learner", "--devices", "cpu,cuda", "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert "torch sees no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_compute_bound_counts_the_outer_and_inner_epochs():
    """The bench's compute bound charges each env step its gradient passes: one for the one-step
    loop (then it is the old G / (S + G)), the outer epochs for every evaluation sample and the inner
    epochs for every adaptation sample; the overhead is the iteration's time beyond that compute."""
    from metarl.core import config as config_mod
    from metarl.tools.bench import compute_bound, grad_passes

    one = config_mod.override(config_mod.override(config_mod.load(CONFIGS / "atari12.yaml"), "meta.outer_epochs", 1),
                              "meta.outer_minibatches", 1).meta
    ppo = config_mod.load(CONFIGS / "minatar.yaml").meta  # outer 4 x 4
    inner = config_mod.override(config_mod.load(CONFIGS / "minatar.yaml"), "meta.inner_epochs", 2).meta
    assert grad_passes(one, 100, 300) == 400
    assert grad_passes(ppo, 100, 300) == 100 + 4 * 300
    assert grad_passes(inner, 100, 300) == 2 * 100 + 4 * 300
    f = {"fleet_sampling_env_steps_per_s": 1000.0, "fleet_grad_samples_per_s": 3000.0, "iteration_env_steps": 400.0,
         "iteration_s": 1.0, "grad_passes_per_env_step": 1.0}
    assert compute_bound(f)["end_to_end_compute_bound"] == 3000 / (1000 + 3000)
    f["grad_passes_per_env_step"] = 3.25
    b = compute_bound(f)
    assert b["end_to_end_compute_bound"] == 3000 / (3000 + 1000 * 3.25)
    assert b["iteration_compute_s"] == 400 * (1 / 1000 + 3.25 / 3000)
    assert b["overhead_share"] == 1 - b["iteration_compute_s"] / 1.0


def test_pss_is_measured_even_when_the_block_is_shorter_than_one_poll():
    """The MinAtar bench's memory block lasts under a second: the sampler used to poll only after
    its first interval and reported 0 MB."""
    import os

    from metarl.tools.bench import PssSampler

    with PssSampler([os.getpid()], every_s=60.0) as pss:
        pass
    assert pss.peak_kb > 1024  # this Python process holds more than 1 MB


def test_compute_weighted_skip_ratio_charges_evaluations_their_outer_epochs():
    """With PPO's outer loop an evaluation rollout costs its sampling and 4 gradient passes, an
    adaptation rollout its sampling and one: skipping adaptations saves less than their share of
    rollouts. Hand-worked for N = 12, S = 1, sampling 1,000 and gradients 2,000 samples/s."""
    from metarl.core import config as config_mod
    from metarl.tools.bench import skip_compute_expected

    cfg = config_mod.load(CONFIGS / "atari12.yaml")  # 12 tasks, outer 4 x 4, one inner step
    f = {"fleet_sampling_env_steps_per_s": 1000.0, "fleet_grad_samples_per_s": 2000.0, "skip_ratio_2": 0.9,
         "skip_ratio_4": 0.8}
    out = skip_compute_expected(f, cfg)
    adapt, evaluate = 1 / 1000 + 1 / 2000, 1 / 1000 + 4 / 2000
    assert out == {"skip_ratio_2_compute_expected": pytest.approx((6 * adapt + 12 * evaluate) / (12 * adapt + 12 * evaluate)),
                   "skip_ratio_4_compute_expected": pytest.approx((3 * adapt + 12 * evaluate) / (12 * adapt + 12 * evaluate))}
    one = config_mod.override(config_mod.override(cfg, "meta.outer_epochs", 1), "meta.outer_minibatches", 1)
    assert skip_compute_expected(f, one)["skip_ratio_2_compute_expected"] == pytest.approx(18 / 24)  # equal costs
