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


from metarl import checkpoint, config as config_mod
from metarl.run import run
from metarl.tracking import read_metrics

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
    every iteration completes."""
    out = tmp_path / "run"
    p = start_driver(out, "--iterations", "14", "--set", "ray.call_timeout_s=6", "--set", "meta.checkpoint_every=50")
    try:
        wait_for(lambda: (out / "actors.json").exists() and len(rows(out)) >= 2, 120, "two iterations")
        workers = json.loads((out / "actors.json").read_text())["workers"]
        victim = next(w for w in workers if "pong" in w["tasks"])
        os.kill(victim["pid"], signal.SIGKILL)
        n_kill = len(rows(out))
        wait_for(lambda: len(rows(out)) >= n_kill + 3, 120, "iterations after the kill")
        hung = next(w for w in workers if "breakout" in w["tasks"])
        os.kill(hung["pid"], signal.SIGSTOP)
        output, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, output
    rs = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rs] == list(range(1, 15))  # every iteration ran
    dropped = [r for r in rs if r["tasks_dropped"]]
    assert any("pong" in r["tasks_dropped"] for r in dropped), output
    assert any("breakout" in r["tasks_dropped"] and "no answer" in r["drop_reasons"]["breakout"] for r in dropped), output
    # failures carry a kind: the killed worker's task died, the stopped one's timed out
    assert any(r["drop_kinds"].get("pong") == "died" for r in dropped), output
    assert any(r["drop_kinds"].get("breakout") == "timed_out" for r in dropped), output
    for r in dropped:  # partial iterations say so, and use only the evaluations that completed
        assert r["evaluations_used"] < 3 or r["update_skipped"]
    assert all(r["tasks_dropped"] == [] for r in rs[-2:]), "restarted workers serve again"
    assert "warning: iteration" in output and "dropped" in output
    assert checkpoint.load(checkpoint.latest(out))["iteration"] == 14


INTERRUPTED_SAVE = """
import io, sys, time
import torch
from metarl import checkpoint

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
        wait_for(lambda: len(checkpoint.list_checkpoints(out)) >= 2 and len(rows(out)) >= 5, 180, "checkpoints")
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


def test_lost_node_is_survived(tmp_path):
    """Workers on a second node; the node is removed mid-run; Ray restarts them on the head."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    fast_detection = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                      "health_check_timeout_ms": 500}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.2",
                                                            "_system_config": fast_detection})
    node = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.3")
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    out = tmp_path / "run"
    cfg = smoke(**{"meta.iterations": 10, "ray.call_timeout_s": 20, "ray.cpus_per_worker": 0.3,
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
        wait_for(lambda: len(rows(out)) >= 2, 120, "two iterations")
        hosts_before = json.loads((out / "actors.json").read_text())["workers"]
        cluster.remove_node(node, allow_graceful=False)
        t.join(timeout=240)
        assert not t.is_alive(), "run did not finish after losing a node"
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not err, err
    rs = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rs] == list(range(1, 11))
    assert len(hosts_before) == 3
    assert any(r["tasks_dropped"] for r in rs), "removing the node should have cost some evaluations"
    assert rs[-1]["tasks_dropped"] == []
