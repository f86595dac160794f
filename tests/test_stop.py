"""A stopped run keeps its work (metarl.distributed.stopping): SIGTERM or Ctrl-C finishes or abandons the
iteration in flight, writes a checkpoint of the last finished iteration, prints the resume command
and exits non-zero; the resumed run's metrics have no gap and no duplicate. Real signals sent to this
process while it drives the run (on Ray actors or in-process), real MinAtar rollouts."""

from __future__ import annotations

import os
import re
import contextlib
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from metarl.core import checkpoint, config as config_mod
from metarl.cli import main
from metarl.distributed.learner import Learner
from metarl.distributed.run import run
from metarl.tasks import make_family
from metarl.distributed.stopping import Stopped, StopRequest, resume_command
from metarl.distributed.tracking import read_metrics

from conftest import CONFIGS

pytest.importorskip("minatar")

SETS = {"tasks.train": "[breakout,space_invaders]", "env.num_envs": 4, "env.rollout_len": 16,
        "ray.cpus_per_worker": 0.5, "ray.num_cpus": 2, "log.wandb_mode": "disabled", "log.progress": False}


def tiny(**overrides):
    cfg = config_mod.load(CONFIGS / "minatar.yaml")
    for k, v in {**SETS, **overrides}.items():
        cfg = config_mod.override(cfg, k, v)
    return config_mod.validate(cfg)


def iterations_logged(out: Path) -> list[int]:
    return [r["iteration"] for r in read_metrics(out / "metrics.jsonl")]


def test_abandoned_iteration_leaves_no_trace_in_the_checkpoint(tmp_path, monkeypatch):
    """SIGTERM in the middle of iteration 3's outer steps, with ray.stop_grace_s = 0: two of its
    16 Adam steps have moved theta, yet the checkpoint holds exactly theta and Adam's state after
    iteration 2 (the same as an uninterrupted run's), and the RNG and counters of then."""
    ref = tmp_path / "ref"
    run(tiny(**{"meta.iterations": 2, "meta.checkpoint_every": 1}), ref, local=True, log=lambda m: None)
    want = checkpoint.load(checkpoint.latest(ref))

    real = Learner.round_step

    def round_step(self, n, r, total, *grads):
        if self.iteration == 2 and r == 2:  # iteration 3, after two of its outer steps
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, n, r, total, *grads)

    monkeypatch.setattr(Learner, "round_step", round_step)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped"
    with pytest.raises(Stopped) as stop:
        run(tiny(**{"meta.iterations": 10, "meta.checkpoint_every": 100, "ray.stop_grace_s": 0}), out,
            local=True, log=lambda m: None)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert "after iteration 2 of 10 (abandoned the iteration in flight)" in str(stop.value)
    got = checkpoint.load(checkpoint.latest(out))
    assert got["iteration"] == 2 and iterations_logged(out) == [1, 2]
    assert torch.equal(got["theta"], want["theta"])
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(got["optimizer"]["state"][0][name], want["optimizer"]["state"][0][name]), name
    assert got["rng"] == want["rng"]
    assert {k: v for k, v in got["counters"].items() if k != "wall_s"} == \
        {k: v for k, v in want["counters"].items() if k != "wall_s"}
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the caller's again


def test_state_after_a_partial_iteration_is_refused_for_an_older_one():
    """The learner keeps one snapshot: the state the iteration under way started from."""
    learner = Learner(make_family(tiny()), 0, 1e-3, 0.5)
    g = (learner.get_theta() * 0 + 1e-3,)
    learner.round_step(1, 0, 2, *g)
    assert learner.iteration == 0 and not torch.equal(learner.state()["theta"], learner.state(0)["theta"])
    learner.round_step(1, 1, 2, *g)
    assert learner.iteration == 1 and torch.equal(learner.state(1)["theta"], learner.state()["theta"])
    learner.step(1, *g)
    with pytest.raises(RuntimeError, match="no longer kept"):
        learner.state(0)


def test_grace_time_is_checked_and_resume_command_replaces_out():
    with pytest.raises(config_mod.ConfigError, match="ray.stop_grace_s"):
        tiny(**{"ray.stop_grace_s": -1})
    cmd = resume_command("runs/b", ["run", "--config", "c.yaml", "--out", "runs/a", "--resume", "--set", "x=a b"])
    assert cmd == "metarl run --config c.yaml --set 'x=a b' --resume --out runs/b"
    with StopRequest(5.0) as stop:  # no signal: nothing requested, nothing raised
        with stop.iteration():
            pass
    assert not stop.requested and not stop.abandoned


@contextlib.contextmanager
def sigterm_when(ready, timeout: float = 300.0):
    """Send this process a real SIGTERM once ready() holds (a watcher thread); a SIGTERM that
    arrives after the command under test returned is ignored, never fatal to pytest."""
    done = threading.Event()

    def watch():
        t0 = time.monotonic()
        while not done.is_set() and time.monotonic() - t0 < timeout:
            if ready():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    old = signal.signal(signal.SIGTERM, lambda *a: None)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGTERM, old)


def test_sigterm_to_a_ray_driver_checkpoints_and_the_resumed_run_has_no_gap(ray_session, tmp_path, capsys):
    """`metarl run` on Ray actors (the shared local Ray) gets SIGTERM after its third row: the
    default grace lets the iteration in flight finish; exit 143, a checkpoint of the last logged
    iteration, the resume command; that command, run to two more iterations, logs no gap or
    duplicate."""
    out = tmp_path / "run"
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    args = ["run", "--config", str(CONFIGS / "minatar.yaml"), *sets, "--set", "meta.checkpoint_every=1000",
            "--iterations", "400", "--out", str(out)]
    with sigterm_when(lambda: len(iterations_logged(out)) >= 3):
        code = main(args)
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert "finished the iteration in flight" in err and "Traceback" not in err, err
    resume = re.search(r"resume with: (.+)", err).group(1)
    assert resume == resume_command(str(out), args), resume
    done = checkpoint.load(checkpoint.latest(out))["iteration"]
    assert done >= 3 and iterations_logged(out) == list(range(1, done + 1))

    assert main([*shlex.split(resume)[1:], "--local", "--iterations", str(done + 2)]) == 0
    assert iterations_logged(out) == list(range(1, done + 3))  # no gap, no duplicate


def test_sigterm_to_a_sweep_checkpoints_its_configuration(tmp_path, capsys):
    """`metarl sweep` stopped while meta-training its first configuration: that run checkpoints
    and the sweep prints its own resume command."""
    out = tmp_path / "sweep"
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    args = ["sweep", "--config", str(CONFIGS / "minatar.yaml"), *sets, "--set", "tasks.heldout=[asterix]",
            "--skips", "1", "--match", "env_steps", "--train-budget", "1000000", "--steps", "256",
            "--seeds", "1", "--set", "meta.checkpoint_every=1000", "--local", "--out", str(out)]
    with sigterm_when(lambda: len(iterations_logged(out / "skip1")) >= 2):
        code = main(args)
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert f"resume with: metarl sweep --resume --out {out} --local" in err, err
    done = checkpoint.load(checkpoint.latest(out / "skip1"))["iteration"]
    assert done >= 2 and iterations_logged(out / "skip1") == list(range(1, done + 1))


def test_a_stop_that_came_between_iterations_abandons_the_next_one_at_once():
    """Grace 0 and a SIGTERM while the driver is outside an iteration (logging, checkpointing):
    nothing is cut there, and the next iteration is not started."""
    with StopRequest(0.0, log=lambda m: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            with stop.iteration():
                raise AssertionError("the iteration ran")
    assert stop.requested and stop.abandoned and stop.exit_code == 128 + signal.SIGTERM
