"""metarl bench --scale at its smallest: a simulated two-node cluster on loopback, every figure printed."""

from __future__ import annotations

import json
import math

import pytest

from metarl.cli import main
from metarl.tools.scale import ATARI_TASK_S, cluster_arithmetic, theta_bytes

from conftest import assert_png

WORK_MS = 50.0  # sleep per fixture rollout: task work the figures must account for


@pytest.mark.slow
def test_scale_benchmark_prints_every_figure_and_reduction_bounds_the_learners_ingest(tmp_path, capsys):
    out = tmp_path / "scale"
    rc = main(["bench", "--suite", "scale", "--scale-sizes", "4", "--scale-workers", "2", "--scale-nodes", "2",
               "--scale-reduce", "task,worker,node", "--scale-iterations", "1", "--work-ms", str(WORK_MS),
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for header in ("iteration (s)", "task work (s)", "overhead (s)", "learner ingest (MB)", "messages to learner",
                   "driver calls", "overhead at Atari task cost", "# arithmetic"):
        assert header in printed
    rows = {(r["reduce"], r["tasks"]): r for r in json.loads((out / "scale.json").read_text())["results"]}
    b = theta_bytes()
    for n in (4,):  # one size: every figure and bound is checked per size; the trend is the README's
        assert rows[("task", n)]["learner_bytes"] == n * b  # every task's gradient reaches the learner
        assert rows[("worker", n)]["learner_bytes"] <= 2 * b  # at most one sum per worker
        assert rows[("node", n)]["learner_bytes"] <= rows[("worker", n)]["learner_bytes"]
        for mode in ("task", "worker", "node"):
            r = rows[(mode, n)]
            # skip 1: every task adapts (S = 1 rollout) and evaluates (1 rollout) on its worker, the
            # tasks dealt round-robin to the 2 workers: the busier one sleeps 2 ceil(N/2) rollouts
            # one after another (an actor runs one call at a time), a floor under the iteration
            rollouts = 2 * math.ceil(n / 2)
            work = rollouts * WORK_MS / 1000
            assert r["task_work_s"] == pytest.approx(work) and r["rollouts_per_worker"] == rollouts
            assert r["wall_s"] >= work and r["overhead_s"] == pytest.approx(r["wall_s"] - work)
            # the same overhead beside Atari's measured task cost per task (an adapt and an evaluate)
            atari = math.ceil(n / 2) * ATARI_TASK_S
            assert r["overhead_share_at_atari_cost"] == pytest.approx(r["overhead_s"] / (r["overhead_s"] + atari))
            assert r["driver_calls"] >= 2 * n  # an adapt and an evaluate per task, at least
    assert (out / "scale.md").read_text().count("\n") == 2 + 3  # header, rule, one row per reduce mode
    assert_png(out / "scale.png")


def test_cluster_arithmetic_is_the_link_time_of_what_the_learner_receives():
    a = cluster_arithmetic(tasks=1000, nodes=32, workers_per_node=16, link_gbit=10.0, atari_task_s=4.5)
    assert a["ingest_s_task"] == pytest.approx(1000 * theta_bytes() / 1.25e9)
    assert a["ingest_s_worker"] == pytest.approx(512 * theta_bytes() / 1.25e9)
    assert a["ingest_s_node"] == pytest.approx(32 * theta_bytes() / 1.25e9)
    assert a["compute_s"] == pytest.approx(2 * 4.5)
