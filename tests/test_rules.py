"""One rule, one home: where two modules need the same answer, both get it from one place, and
these tests hold the callers to it (each against what the code really does, not against the rule
restated)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import smoke


# ---- rollouts per meta-iteration (metarl.algorithms) -------------------------------------------------


@pytest.mark.parametrize("algo", ["fomaml", "maml", "reptile"])
def test_sweep_and_bench_count_the_rollouts_an_iteration_takes(algo):
    """The env steps a local meta-iteration really samples, at skip 1, 2 and 3 with S = 2, are what
    the sweep budgets (iteration_env_steps), what the bench's expected skip ratio divides, and
    what the bench's sampling-only baseline samples at skip 1 (Reptile evaluates nothing)."""
    from metarl.bench import BenchLearner, BenchWorker, _sampling_only, expected_skip_ratio
    from metarl.fleet import start_fleet
    from metarl.iteration import meta_iteration
    from metarl.meta import make_groups
    from metarl.sweep import iteration_env_steps

    cfg = smoke(**{"meta.algo": algo, "meta.inner_steps": 2})
    fleet = start_fleet(cfg, True, None, BenchWorker, BenchLearner)
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        rec = meta_iteration(fleet, cfg.tasks.train, make_groups(cfg.num_tasks, k, rng), algo, timeout=120)
        assert not rec["tasks_dropped"], rec["drop_reasons"]
        assert rec["env_steps/adapt"] + rec["env_steps/eval"] == iteration_env_steps(cfg, k), (algo, k)
        assert expected_skip_ratio(cfg.num_tasks, k, 2, algo) == iteration_env_steps(cfg, k) / iteration_env_steps(cfg, 1)
    theta = fleet.backend.get(fleet.backend.call(fleet.learner, "get_theta"))
    assert _sampling_only(fleet, cfg, theta)[0] == iteration_env_steps(cfg, 1)
