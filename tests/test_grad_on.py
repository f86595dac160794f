"""Where evaluation gradients are computed (meta.grad_on): on the workers, or on the learner from
shipped batches. Both must feed the learner the same meta-gradient from the same rollouts, and
the choice `auto` makes must follow the cluster."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import smoke
from metarl.core import meta
from metarl.core.config import ConfigError
from metarl.distributed.fleet import resolve_grad_on, start_fleet
from metarl.distributed.iteration import meta_iteration
from metarl.distributed.learner import Learner


def one_iteration(grad_on: str, skip: int):
    cfg = smoke(**{"meta.grad_on": grad_on, "meta.skip": skip, "loss.grad_chunk": 16})
    fleet = start_fleet(cfg, local=True)
    b = fleet.backend
    theta0 = b.get(b.call(fleet.learner, Learner.get_theta))
    groups = meta.make_groups(cfg.num_tasks, skip, np.random.default_rng(5))
    rec = meta_iteration(fleet, cfg.tasks.train, groups, "fomaml", timeout=120)
    theta1 = b.get(b.call(fleet.learner, Learner.get_theta))
    for w in fleet.workers:
        w.close()
    return fleet.grad_on, rec, theta0, theta1


@pytest.mark.parametrize("skip", [1, 2])
def test_learner_side_gradients_equal_worker_side_gradients(skip):
    """Both runs are in this process: the same seeded init, emulators and policy draws, each member's
    gradient from the same meta.loss_grad on the same batch with the same kernels and thread count,
    summed in the same order. So theta agrees to the last bit on any CPU (determinism of one machine,
    not agreement between machines); atol=1e-7 (~3 float32 ulps of |theta| < 0.5) is no rounding
    budget: Adam's first step -lr g / (|g| + 1e-8) turns any change of a near-zero g into O(lr)."""
    on_w, rec_w, t0_w, t1_w = one_iteration("worker", skip)
    on_l, rec_l, t0_l, t1_l = one_iteration("learner", skip)
    assert (on_w, on_l) == ("worker", "learner")
    np.testing.assert_array_equal(t0_w, t0_l)
    for rec in (rec_w, rec_l):
        assert rec["tasks_dropped"] == [] and not rec["update_skipped"] and rec["evaluations_used"] == 3
    # the same rollouts (seeded emulators and policies) ...
    assert rec_w["env_steps/eval"] == rec_l["env_steps/eval"] > 0
    assert rec_w["reward_per_step/post"] == rec_l["reward_per_step/post"]
    # ... give the same averaged meta-gradient, loss and Adam step
    assert rec_l["grad/norm"] == pytest.approx(rec_w["grad/norm"], rel=1e-5)
    assert rec_l["loss/outer"] == pytest.approx(rec_w["loss/outer"], rel=1e-5)
    np.testing.assert_allclose(t1_l, t1_w, rtol=0, atol=1e-7)
    assert not np.array_equal(t1_l, t0_l)


def test_auto_puts_gradients_where_they_run_fastest():
    fomaml = smoke()
    assert resolve_grad_on(fomaml, learner_gpus=0.0) == "worker"  # CPU learner: workers measured faster
    assert resolve_grad_on(fomaml, learner_gpus=1.0) == "learner"  # GPU learner, CPU workers
    assert resolve_grad_on(smoke(**{"ray.gpus_per_worker": 0.25}), learner_gpus=1.0) == "worker"
    assert resolve_grad_on(smoke(**{"meta.algo": "maml"}), learner_gpus=1.0) == "worker"  # leaders correct
    assert resolve_grad_on(smoke(**{"meta.grad_on": "learner"}), learner_gpus=0.0) == "learner"
    with pytest.raises(ConfigError, match="grad_on = learner"):
        smoke(**{"meta.grad_on": "learner", "meta.algo": "maml"})
