"""ray.grad_reduce: gradients summed on their workers (or nodes) before the learner. Same theta as
shipping every task's gradient, the learner's ingest counted, and the fault rule unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metarl.core import checkpoint, config as config_mod
from metarl.core.config import Config, MetaConfig, SinusoidConfig, TasksConfig
from metarl.core.meta import make_groups
from metarl.distributed.fleet import start_fleet
from metarl.distributed.iteration import meta_iteration
from metarl.distributed.run import run
from metarl.tasks.sinusoid import task_names
from metarl.distributed.tracking import read_metrics
from metarl.distributed.worker import TaskWorker


def final_theta(out) -> np.ndarray:
    return checkpoint.load(checkpoint.latest(out))["theta"].numpy()


def sine(reduce: str, algo: str, batching: str = "per_task", workers: int = 2) -> Config:
    return config_mod.validate(Config(
        tasks=TasksConfig(family="sinusoid", train=task_names(0, 6), resample=batching == "stacked"),
        sinusoid=SinusoidConfig(k_shot=5, hidden=(8, 8)),
        meta=MetaConfig(algo=algo, skip=2, iterations=4, checkpoint_every=4, task_batching=batching),
        ray=dataclasses.replace(Config().ray, workers=workers, grad_reduce=reduce),
        log=dataclasses.replace(Config().log, wandb_mode="disabled", progress=False),
    ))


@pytest.mark.parametrize("algo", ["fomaml", "maml", "reptile"])
def test_theta_is_the_same_with_and_without_the_reduction(tmp_path, algo):
    thetas, rows = {}, {}
    for reduce in ("task", "worker", "node"):
        out = tmp_path / reduce
        run(sine(reduce, algo), out, local=True, log=lambda *_: None)
        thetas[reduce], rows[reduce] = final_theta(out), read_metrics(out / "metrics.jsonl")
    scale = np.abs(thetas["task"]).max()
    for reduce in ("worker", "node"):
        # float32 sums taken in another order: equal to a few ulps of theta's scale over 4 steps
        np.testing.assert_allclose(thetas[reduce], thetas["task"], rtol=0, atol=1e-6 * scale)
        assert [r["evaluations_used"] for r in rows[reduce]] == [r["evaluations_used"] for r in rows["task"]]
    per_task = [r["learner/ingest_messages"] for r in rows["task"]]
    # task: one message per used gradient (per evaluation; MAML one per group; Reptile one per leader)
    assert per_task == [{"fomaml": 6, "maml": 3, "reptile": 3}[algo]] * 4
    # worker: at most one per worker; node (all workers in this process): one
    assert all(r["learner/ingest_messages"] <= 2 for r in rows["worker"])
    assert all(r["learner/ingest_messages"] == 1 for r in rows["node"])
    assert rows["node"][0]["learner/ingest_bytes"] * per_task[0] == rows["task"][0]["learner/ingest_bytes"]


def test_stacked_runs_reduce_per_node_to_the_same_theta(tmp_path):
    run(sine("worker", "maml", "stacked"), tmp_path / "w", local=True, log=lambda *_: None)
    run(sine("node", "maml", "stacked"), tmp_path / "n", local=True, log=lambda *_: None)
    a, b = final_theta(tmp_path / "w"), final_theta(tmp_path / "n")
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())
    rows = read_metrics(tmp_path / "n" / "metrics.jsonl")
    assert all(r["learner/ingest_messages"] == 1 and r["evaluations_used"] == 6 for r in rows)


def test_a_failed_sum_drops_exactly_its_tasks_and_the_rest_still_update():
    class FailingSum(TaskWorker):
        def reduce(self, *grads):
            if "sine-0000" in self.tasks:  # the worker holding tasks 0, 2, 4
                raise RuntimeError("injected reduce fault")
            return super().reduce(*grads)

    cfg = sine("worker", "fomaml")
    fleet = start_fleet(cfg, local=True, worker_cls=FailingSum)
    assert fleet.reduce == "worker"
    theta0 = fleet.learner.get_theta()
    groups = make_groups(6, 2, np.random.default_rng(0))
    rec = meta_iteration(fleet, cfg.tasks.train, groups, "fomaml", timeout=60)
    names = list(cfg.tasks.train)
    assert rec["tasks_dropped"] == sorted(names[i] for i in (0, 2, 4))
    assert all("reduce (worker)" in why and "injected reduce fault" in why for why in rec["drop_reasons"].values())
    assert set(rec["drop_kinds"].values()) == {"raised"}
    assert rec["evaluations_used"] == 3 and rec["learner/ingest_messages"] == 1
    assert not rec["update_skipped"] and np.abs(fleet.learner.get_theta() - theta0).max() > 0
