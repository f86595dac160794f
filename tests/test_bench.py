"""`metarl bench --quick` runs and reports every figure as a finite positive number.

The figures' values are not judged here (they depend on the machine and its load); that they are
all measured, printed as `name: value` and written to JSON is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

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


def test_quick_bench_prints_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    # Ray's socket paths must stay under 107 bytes: a short directory, not pytest's tmp_path
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "metarl", "bench", "--quick", "--config",
                            str(CONFIGS / "atari12.yaml"), "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    seconds = time.time() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    printed = {}
    for line in p.stdout.splitlines():
        if line.startswith("#") or ": " not in line:
            continue
        name, value = line.split(": ", 1)
        printed[name] = float(value)
    written = json.loads(out.read_text())
    for name in FIGURES:
        for where, figures in (("printed", printed), ("JSON", written["figures"])):
            assert name in figures, f"{name} not {where}:\n{p.stdout}"
            assert math.isfinite(figures[name]) and figures[name] > 0, f"{name} = {figures[name]} ({where})"
        # printed with 4 significant digits (:.4g): at most 5e-4 relative off the JSON value
        assert math.isclose(printed[name], written["figures"][name], rel_tol=1e-3)
    assert set(printed) == set(written["figures"])
    # about a minute on an idle 2-core machine; generous here because other suites may share it
    assert seconds < 180, f"metarl bench --quick took {seconds:.0f}s"


def test_learner_bench_times_every_piece_of_work_and_refuses_a_missing_device(tmp_path, capsys):
    """`metarl bench --learner` on the CPU: every piece of work timed (positive, finite), the table
    printed, the JSON written; asking for a device torch does not see is one line and exit 2."""
    import torch

    from metarl.cli import main
    from metarl.learner_bench import LABELS

    out = tmp_path / "learner.json"
    assert main(["bench", "--learner", "--devices", "cpu", "--evaluations", "1", "--min-seconds", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    figures = result["devices"]["cpu"]
    assert set(figures) == set(LABELS)
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert all(label.format(n=1) in printed for label in LABELS.values())
    if not torch.cuda.is_available():
        assert main(["bench", "--learner", "--devices", "cpu,cuda"]) == 2
        err = capsys.readouterr().err
        assert "torch sees no CUDA device" in err and len(err.strip().splitlines()) == 1
