"""`ray job submit` of the smoke run to a real two-node Ray cluster, all on loopback.

This is the README's "Run on a cluster" command exercised for real: a head node and a worker node
started with `ray start`, the repository uploaded with `--working-dir`, `metarl run` as the job's
entrypoint, and the run directory and job logs checked afterwards.

How the cluster is kept to this test and to loopback:
- Ray rewrites 127.0.0.1 (and localhost) to the machine's routable address for multi-node use, so
  the nodes use 127.0.0.2 and 127.0.0.3: other loopback addresses, which Ray keeps as given.
- `--temp-dir` is a fresh directory per node, so no other `ray.init()` on this machine attaches to
  the cluster, and the two nodes keep separate runtime-env caches as two machines would.
- Token authentication is on (as it is by default from Ray 2.59 for local clusters): a token made
  here, passed with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to the nodes and to every `ray job`
  command. Without RAY_AUTH_MODE=token the CLI sends no token and the dashboard answers 401.
- Teardown stops exactly the processes this test started (each `ray start --block` and its
  descendants, by pid). It never runs `ray stop`, which kills every Ray process on the machine,
  including other test runs'.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment whose `ray` and `metarl` the nodes run
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
SMOKE = REPO / "configs" / "smoke.yaml"
# The two 1-CPU nodes hold the learner (1 CPU) on one node and the three task workers on the other
# only if the workers ask for at most 1/3 CPU each; see the report on plan_resources packing.
SMOKE_OVERRIDES = ["--set", "ray.cpus_per_worker=0.25"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# process bookkeeping: only the processes this test started, found by pid


def _children_by_parent() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table.setdefault(int(fields[1]), []).append(int(entry))
    return table


def _process_tree(root: int) -> list[int]:
    table, tree, stack = _children_by_parent(), [root], [root]
    while stack:
        for child in table.get(stack.pop(), []):
            tree.append(child)
            stack.append(child)
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_process_trees(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every process under each `ray start --block` we launched, SIGKILL what remains."""
    pids = [pid for p in procs for pid in _process_tree(p.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# ------------------------------------------------------------------------------------------
# the cluster


@dataclass
class Cluster:
    dashboard: str
    """http://127.0.0.1:<port>: what `ray job submit --address` takes"""
    gcs: str
    """<head ip>:<port>: what `ray start --address` takes"""
    env: dict[str, str]
    """environment for every `ray` command: PATH, token, no W&B"""
    token: str
    root: Path

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def get_json(self, path: str) -> dict:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def alive_node_ips(self) -> list[str]:
        rows = self.get_json("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return sorted(n["node_ip"] for n in rows if n["state"] == "ALIVE")


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_for(what: str, check, timeout: float, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                pytest.fail(f"`ray start` exited with {p.returncode} while waiting for {what}:\n{_log_tail(log)}")
        try:
            if check():
                return
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}:\n" + "\n".join(_log_tail(x) for x in logs))


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="mrl-job-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    (root / "auth_token").write_text(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(root / "auth_token"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "WANDB_MODE": "disabled",
    })
    gcs_port, dash_port = free_port(), free_port()
    c = Cluster(dashboard=f"http://127.0.0.1:{dash_port}", gcs=f"{HEAD_IP}:{gcs_port}", env=env, token=token,
                root=root)
    common = ["--block", "--num-cpus=1", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"]
    head_cmd = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}",
                f"--temp-dir={root / 'ray'}", *common]
    procs: list[subprocess.Popen] = []
    logs = [root / "head.log", root / "worker.log"]
    try:
        with open(logs[0], "w") as log:
            procs.append(subprocess.Popen(head_cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=root))
        _wait_for("the head's dashboard", lambda: c.get_json("/api/version") is not None, 600, procs, logs[:1])
        common[-1] = f"--dashboard-agent-listen-port={free_port()}"
        # The worker node gets its own temp dir, as a real second machine has its own disk. Sharing
        # the head's would let its runtime-env agent re-unpack the job's working_dir (rmtree, unzip)
        # in the very directory the head's job driver runs in, deleting the driver's cwd under it.
        worker_cmd = [str(BIN / "ray"), "start", f"--address={c.gcs}", f"--node-ip-address={WORKER_IP}",
                      f"--temp-dir={root / 'ray-w'}", *common]
        with open(logs[1], "w") as log:
            procs.append(subprocess.Popen(worker_cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=root))
        _wait_for("two alive nodes", lambda: c.alive_node_ips() == [HEAD_IP, WORKER_IP], 600, procs, logs)
        yield c
    finally:
        stop_process_trees(procs)
        shutil.rmtree(root, ignore_errors=True)


def submit(c: Cluster, entrypoint: list[str], timeout: float) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit --working-dir <repo>`, waiting for the job (its logs are tailed to stdout).
    `timeout` (like _wait_for's) is a hang guard, not a speed check: generous, because a loaded
    2-core machine may take minutes to start nodes and actors."""
    job_id = f"metarl-test-{uuid.uuid4().hex[:8]}"
    cmd = ["job", "submit", "--address", c.dashboard, "--working-dir", str(REPO), "--submission-id", job_id,
           "--", *entrypoint]
    try:
        return job_id, c.ray(*cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        c.ray("job", "stop", "--address", c.dashboard, job_id, timeout=30)
        pytest.fail(f"job {job_id} ({' '.join(entrypoint)}) did not finish within {timeout:g}s")


# ------------------------------------------------------------------------------------------
# tests


def test_job_runs_the_uploaded_code_on_the_two_node_cluster(cluster):
    """The job's python imports metarl from the uploaded working directory (so the cluster runs the
    code that was submitted, not whatever is installed) and attaches to both nodes."""
    probe = ("import json, os, ray, metarl; ray.init(); "
             "print('PROBE ' + json.dumps({'metarl': metarl.__file__, 'cwd': os.getcwd(), "
             "'address': os.environ.get('RAY_ADDRESS'), "
             "'nodes': sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])}))")
    job_id, res = submit(cluster, ["python", "-c", probe], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next((x for x in res.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, f"no PROBE line in the tailed job logs:\n{res.stdout[-3000:]}"
    info = json.loads(line[len("PROBE "):])
    module = Path(info["metarl"])
    assert "_ray_pkg_" in str(module) and not module.is_relative_to(REPO), info
    assert Path(info["cwd"]) == module.parent.parent, info
    assert info["address"] == cluster.gcs
    assert info["nodes"] == [HEAD_IP, WORKER_IP]


def test_smoke_run_submitted_as_a_job_completes_with_progress_and_a_full_run_dir(cluster):
    """The README command: `ray job submit --working-dir . -- metarl run --config configs/smoke.yaml`.
    The job succeeds, its logs carry one progress line per iteration (stderr is not a terminal in a
    job, so `Progress` prints plain lines; `--no-progress` would suppress them), and the run
    directory holds the resolved config, one metrics row per iteration and the checkpoints."""
    iterations = yaml.safe_load(SMOKE.read_text())["meta"]["iterations"]
    every = yaml.safe_load(SMOKE.read_text())["meta"]["checkpoint_every"]
    out = cluster.root / "run"
    entry = ["metarl", "run", "--config", "configs/smoke.yaml", *SMOKE_OVERRIDES, "--out", str(out),
             "--wandb", "disabled"]
    job_id, res = submit(cluster, entry, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]

    status = cluster.ray("job", "status", "--address", cluster.dashboard, job_id)
    assert status.returncode == 0 and "succeeded" in (status.stdout + status.stderr), status.stdout + status.stderr
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard, job_id)
    assert logs.returncode == 0, logs.stderr
    progress = [int(m.group(1)) for m in re.finditer(rf"^iter (\d+)/{iterations} \| env steps [\d,]+ \|",
                                                      logs.stdout, flags=re.M)]
    assert progress == list(range(1, iterations + 1)), logs.stdout[-3000:]
    assert f"done: {iterations} iterations" in logs.stdout
    assert "workers (ray)" in logs.stdout  # attached to the cluster, not a `--local` run

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["meta"]["iterations"] == iterations and cfg["ray"]["cpus_per_worker"] == 0.25
    assert cfg["tasks"]["train"] == yaml.safe_load(SMOKE.read_text())["tasks"]["train"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))
    assert rows[-1]["env_steps/total"] > 0 and not rows[-1]["tasks_dropped"]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts == [f"ckpt_{i:06d}.pt" for i in range(every, iterations + 1, every)], ckpts
