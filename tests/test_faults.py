"""Faults a long cluster run meets: a worker killed or hung mid-run, a lost node, a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


from metarl.core import checkpoint, config as config_mod
from metarl.distributed.run import run
from metarl.distributed.tracking import read_metrics

from conftest import CONFIGS, REPO, smoke




def wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def rows(out: Path) -> list[dict]:
    try:
        return read_metrics(out / "metrics.jsonl")
    except json.JSONDecodeError:  # a line being written right now
        return []


def start_driver(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "metarl", "run", "--config", str(CONFIGS / "smoke.yaml"),
                             "--out", str(out), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_and_hung_workers_do_not_fail_the_run(tmp_path):
    """SIGKILL one worker, later SIGSTOP another: the run drops their tasks for that iteration by
    the stated rule, Ray restarts the workers, theta is only updated from finite gradients, and
    every iteration completes; once the restarted workers serve a whole iteration again the test
    stops the run with SIGTERM (it keeps the work: exit 143, a checkpoint of the last iteration).

    The call timeout (20 s) is ~20x a smoke call's time even on a loaded 2-core machine, so the
    one call that times out is the stopped worker's, which never answers. How soon Ray's restarted
    actor answers again depends on the load (3 iterations on a quiet machine, more beside other
    work), so the test waits for it rather than presuming it; the waits are hang guards only."""
    out = tmp_path / "run"
    p = start_driver(out, "--iterations", "60", "--set", "ray.call_timeout_s=20", "--set", "meta.checkpoint_every=50")
    try:
        wait_for(lambda: (out / "actors.json").exists() and len(rows(out)) >= 2, 900, "two iterations")
        workers = json.loads((out / "actors.json").read_text())["workers"]
        victim = next(w for w in workers if "pong" in w["tasks"])
        os.kill(victim["pid"], signal.SIGKILL)
        n_kill = len(rows(out))
        wait_for(lambda: len(rows(out)) >= n_kill + 3, 900, "iterations after the kill")
        hung = next(w for w in workers if "breakout" in w["tasks"])
        assert hung["pid"] != victim["pid"]
        os.kill(hung["pid"], signal.SIGSTOP)

        def whole_again() -> bool:  # an iteration with nothing dropped after the stopped worker's timeout
            rs = rows(out)
            t = next((i for i, r in enumerate(rs) if "timed_out" in r["drop_kinds"].values()), None)
            return t is not None and any(not r["tasks_dropped"] for r in rs[t + 1:])
        wait_for(whole_again, 900, "the restarted workers to serve a whole iteration")
        n_stop = len(rows(out))
        assert n_stop < 55, "the run should still have iterations to go when it is stopped"
        p.send_signal(signal.SIGTERM)
        output, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, output
    rs = read_metrics(out / "metrics.jsonl")
    last = rs[-1]["iteration"]
    assert last >= n_stop and [r["iteration"] for r in rs] == list(range(1, last + 1))  # every iteration ran
    dropped = [r for r in rs if r["tasks_dropped"]]
    assert any("pong" in r["tasks_dropped"] for r in dropped), output
    assert any("breakout" in r["tasks_dropped"] and "no answer" in r["drop_reasons"]["breakout"] for r in dropped), output
    # failures carry a kind: the killed worker's task died, the stopped one's timed out
    assert any(r["drop_kinds"].get("pong") == "died" for r in dropped), output
    assert any(r["drop_kinds"].get("breakout") == "timed_out" for r in dropped), output
    # only the stopped worker's call timed out, and only once: Ray restarted it after the driver killed it
    timed_out = [(r["iteration"], t) for r in rs for t, kind in r["drop_kinds"].items() if kind == "timed_out"]
    assert len(timed_out) == 1 and timed_out[0][1] == "breakout" and timed_out[0][0] > n_kill + 3, timed_out
    for r in dropped:  # partial iterations say so, and use only the evaluations that completed
        assert r["evaluations_used"] < 3 or r["update_skipped"]
    # restarted workers serve again: after the timeout every task answers in a whole iteration
    assert any(not r["tasks_dropped"] and r["evaluations_used"] == 3 for r in rs if r["iteration"] > timed_out[0][0])
    assert "warning: iteration" in output and "dropped" in output and "stopped by SIGTERM" in output
    assert checkpoint.load(checkpoint.latest(out))["iteration"] == last


INTERRUPTED_SAVE = """
import io, sys, time
import torch
from metarl.core import checkpoint

run_dir = sys.argv[1]
real_save = torch.save

def slow_save(obj, f):  # the real bytes, half of them written, then the process hangs mid-write
    buf = io.BytesIO()
    real_save(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

checkpoint.save(run_dir, {"theta": torch.arange(4.0), "optimizer": {}, "iteration": 2})
checkpoint.torch.save = slow_save
checkpoint.save(run_dir, {"theta": torch.full((4,), 7.0), "optimizer": {}, "iteration": int(sys.argv[2])})
"""


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_loadable(tmp_path):
    """checkpoint.save run for real in a process SIGKILLed while it writes the new checkpoint: the
    previous checkpoint is still the latest and loads unchanged, whether the new one was for a later
    iteration or rewrote the same one; only a temporary file is left behind."""
    for new_iteration in (3, 2):
        run_dir = tmp_path / f"run{new_iteration}"
        p = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SAVE, str(run_dir), str(new_iteration)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = p.stdout.readline()  # the child prints once it is half-way through the new file
            assert line.strip() == "writing", line + p.stdout.read()
            p.kill()
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
        assert checkpoint.latest(run_dir) == checkpoint.checkpoint_dir(run_dir) / "ckpt_000002.pt"
        assert [c.name for c in checkpoint.list_checkpoints(run_dir)] == ["ckpt_000002.pt"]
        state = checkpoint.load(checkpoint.latest(run_dir))
        assert state["iteration"] == 2 and state["theta"].equal(torch.arange(4.0))
        leftovers = [f.name for f in checkpoint.checkpoint_dir(run_dir).iterdir() if f.name != "ckpt_000002.pt"]
        assert len(leftovers) == 1 and leftovers[0].startswith(f".ckpt_{new_iteration:06d}.pt.tmp"), leftovers


def test_killed_driver_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = start_driver(out, "--iterations", "30", "--set", "meta.checkpoint_every=2", "--local")
    try:
        wait_for(lambda: len(checkpoint.list_checkpoints(out)) >= 2 and len(rows(out)) >= 5, 900, "checkpoints")  # hang guard
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    last = checkpoint.latest(out)
    it = checkpoint.load(last)["iteration"]
    # a stray temp file of an interrupted write (test_a_checkpoint_write_killed_midway_...) is ignored
    (out / "checkpoints" / f".ckpt_{it + 2:06d}.pt.tmp-99999").write_bytes(b"partial")
    logged = len(rows(out))
    assert logged >= it
    before_theta = checkpoint.load(last)["theta"]
    cfg = config_mod.override(smoke(), "meta.iterations", it + 3)
    cfg = config_mod.override(cfg, "log.progress", False)
    notes: list[str] = []
    run(cfg, out, resume=True, local=True, log=notes.append)
    rs = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rs] == list(range(1, it + 4))
    final = checkpoint.load(checkpoint.latest(out))
    assert final["iteration"] == it + 3
    assert int(final["optimizer"]["state"][0]["step"]) == it + 3  # Adam state carried on
    assert not before_theta.equal(final["theta"])
    assert any(f"iteration {it}" in n for n in notes)


def test_lost_node_is_survived(tmp_path, monkeypatch):
    """A worker on a second node; the node is removed mid-run; Ray restarts it on the head.

    The head's CPUs could hold every actor, so the pong worker is pinned to the second node (soft
    node affinity: placed there while it lives, anywhere once it is gone) and the learner to the
    head; the test checks the removed node held that worker and that its task was dropped."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from metarl.distributed.backend import RayBackend

    if ray.is_initialized():
        ray.shutdown()
    fast_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                      "health_check_timeout_ms": 500}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.2",
                                                            "_system_config": fast_detection})
    node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.3")
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    head_id, doomed_id = cluster.head_node.node_id, node.node_id

    class Pinned:
        """ray, with one scheduling strategy added to the actor options of the next remote class."""

        def __init__(self, node_id):
            self.strategy = NodeAffinitySchedulingStrategy(node_id, soft=True)

        def __getattr__(self, name):
            return getattr(ray, name)

        def remote(self, cls):
            remote_cls, strategy = ray.remote(cls), self.strategy

            class Opts:
                def options(self, **opts):
                    return remote_cls.options(**opts, scheduling_strategy=strategy)

            return Opts()

    real_actor, pinned = RayBackend.actor, []

    def actor(self, cls, *args, **kw):
        target = None
        if cls.__name__ == "Learner":
            target = head_id
        elif cls.__name__ == "TaskWorker" and not pinned:  # the first worker: tasks[0], pong
            target = doomed_id
            pinned.append(cls)
        if target is None:
            return real_actor(self, cls, *args, **kw)
        self.ray = Pinned(target)
        try:
            return real_actor(self, cls, *args, **kw)
        finally:
            self.ray = ray

    monkeypatch.setattr(RayBackend, "actor", actor)
    out = tmp_path / "run"
    cfg = smoke(**{"meta.iterations": 10, "ray.call_timeout_s": 120, "ray.cpus_per_worker": 0.3,
                   "log.progress": False, "meta.checkpoint_every": 50})
    err: list[BaseException] = []

    def driver():
        try:
            run(cfg, out)
        except BaseException as e:  # surfaced below
            err.append(e)

    t = threading.Thread(target=driver)
    t.start()
    try:
        wait_for(lambda: len(rows(out)) >= 2, 900, "two iterations")
        actors = json.loads((out / "actors.json").read_text())
        n_removed = len(rows(out))
        cluster.remove_node(node, allow_graceful=False)
        t.join(timeout=1800)
        assert not t.is_alive(), "run did not finish after losing a node"
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not err, err
    rs = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rs] == list(range(1, 11))
    workers = actors["workers"]
    assert len(workers) == 3 and len(pinned) == 1
    lost_tasks = {t for w in workers if w["node"] == doomed_id for t in w["tasks"]}
    assert "pong" in lost_tasks, workers  # the removed node held (at least) the pinned worker
    for task in lost_tasks:  # each task of the removed node was dropped, and only once it was gone
        lost = [r["iteration"] for r in rs if task in r["tasks_dropped"]]
        assert lost and min(lost) > n_removed, (task, lost, n_removed)
    assert rs[-1]["tasks_dropped"] == []


def _minatar(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    sets = {"tasks.train": "[breakout,space_invaders]", "env.num_envs": 4, "env.rollout_len": 16,
            "meta.task_batching": "per_task", "log.wandb_mode": "disabled", "log.progress": False, **overrides}
    for k, v in sets.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def test_a_task_down_longer_than_task_downtime_s_stops_the_run(tmp_path, monkeypatch):
    """Breakout's adaptation raises in every iteration: the run goes on without it until it has been
    down for ray.task_downtime_s, then stops with one message that names it and how to resume."""
    import pytest

    from metarl.distributed.worker import TaskWorker

    real = TaskWorker.adapt

    def adapt(self, task_name, theta):
        if task_name == "breakout":
            raise RuntimeError("emulator lost")
        return real(self, task_name, theta)

    monkeypatch.setattr(TaskWorker, "adapt", adapt)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"task\(s\) breakout failed every iteration for over 0.2s .*emulator lost.*"
                                           r"Resume with --resume --out"):
        run(_minatar(**{"meta.iterations": 50, "ray.task_downtime_s": 0.2}), out, local=True, log=lambda m: None)
    rows = read_metrics(out / "metrics.jsonl")
    assert 2 <= len(rows) < 50 and all(r["tasks_dropped"] == ["breakout"] for r in rows)


def test_a_learner_gpu_the_cluster_lacks_is_refused_before_the_run_dir_is_written(ray_session, tmp_path):
    import pytest

    out = tmp_path / "run"
    with pytest.raises(config_mod.ConfigError, match="ray.learner_gpus = 1 but the Ray cluster has no GPU"):
        run(_minatar(**{"ray.learner_gpus": "1", "ray.cpus_per_worker": 0.25}), out)
    assert not out.exists()
    assert ray_session.is_initialized()  # the shared Ray is left to the next test
