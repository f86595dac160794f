"""One rule, one home: where two modules need the same answer, both get it from one place, and
these tests hold the callers to it (each against what the code really does, not against the rule
restated)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONFIGS, smoke


# ---- rollouts per meta-iteration (metarl.core.algorithms) -------------------------------------------------


@pytest.mark.parametrize("algo", ["fomaml", "maml", "reptile"])
def test_sweep_and_bench_count_the_rollouts_an_iteration_takes(algo):
    """The env steps a local meta-iteration really samples, at skip 1, 2 and 3 with S = 2, are what
    the sweep budgets (iteration_env_steps), what the bench's expected skip ratio divides, and
    what the bench's sampling-only baseline samples at skip 1 (Reptile evaluates nothing)."""
    from metarl.tools.bench import BenchLearner, BenchWorker, _sampling_only, expected_skip_ratio
    from metarl.distributed.fleet import start_fleet
    from metarl.distributed.iteration import meta_iteration
    from metarl.core.meta import make_groups
    from metarl.experiments.sweep import iteration_env_steps

    cfg = smoke(**{"meta.algo": algo, "meta.inner_steps": 2})
    fleet = start_fleet(cfg, True, None, BenchWorker, BenchLearner)
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        rec = meta_iteration(fleet, cfg.tasks.train, make_groups(cfg.num_tasks, k, rng), algo, timeout=120)
        assert not rec["tasks_dropped"], rec["drop_reasons"]
        assert rec["env_steps/adapt"] + rec["env_steps/eval"] == iteration_env_steps(cfg, k), (algo, k)
        share = iteration_env_steps(cfg, k) / iteration_env_steps(cfg, 1)
        assert expected_skip_ratio(cfg.num_tasks, k, 2, algo) == share, (algo, k)
    theta = fleet.backend.get(fleet.backend.call(fleet.learner, BenchLearner.get_theta))
    assert _sampling_only(fleet, cfg, theta)[0] == iteration_env_steps(cfg, 1)
    for w in fleet.workers:
        w.close()


# ---- stacked tasks and learner-side gradients (Config.stacked, Config.grads_can_ship) ------------------

FAMILY_TASKS = {"sinusoid": "[sine-0, sine-1, sine-2]", "nav2d": "[goal-0, goal-1, goal-2]"}


def family_config(family: str, **overrides):
    """A validated config of `family` with three tasks (raises ConfigError where validation refuses)."""
    from metarl.core import config as config_mod

    if family == "atari":
        return smoke(**overrides)
    cfg = config_mod.load(CONFIGS / f"{family}.yaml")
    sets = {"tasks.train": FAMILY_TASKS[family], "tasks.resample": False, "meta.outer": "adam", "meta.skip": 1,
            "ray.workers": 0, "nav2d.episodes": 2, "nav2d.horizon": 5, "log.wandb_mode": "disabled", **overrides}
    for key, value in sets.items():
        cfg = config_mod.override(cfg, key, value)
    return config_mod.validate(cfg)


STACKED = {("sinusoid", "auto"): True, ("sinusoid", "stacked"): True, ("sinusoid", "per_task"): False,
           ("nav2d", "auto"): True, ("nav2d", "stacked"): True, ("nav2d", "per_task"): False,
           ("atari", "auto"): False, ("atari", "stacked"): None, ("atari", "per_task"): False}
"""family, meta.task_batching -> whether the run is stacked (None: validation refuses it)."""


@pytest.mark.parametrize("family,batching", list(STACKED))
def test_validation_and_the_fleet_agree_on_stacking(family, batching):
    """What validation assumes of a run's stacking (tasks.resample needs it) is what the fleet
    starts: every worker holding every task, whole groups in one call."""
    from metarl.core.config import ConfigError
    from metarl.distributed.fleet import start_fleet

    if STACKED[family, batching] is None:
        with pytest.raises(ConfigError, match="task_batching = stacked"):
            family_config(family, **{"meta.task_batching": batching})
        return
    cfg = family_config(family, **{"meta.task_batching": batching})
    fleet = start_fleet(cfg, local=True)
    holds_all = [set(w.tasks) == set(cfg.tasks.train) for w in fleet.workers]
    assert cfg.stacked == fleet.stacked == all(holds_all) == STACKED[family, batching]
    for w in fleet.workers:
        w.close()
    resample = {"meta.task_batching": batching, "tasks.resample": True}
    if STACKED[family, batching]:
        assert family_config(family, **resample).tasks.resample
    else:
        with pytest.raises(ConfigError, match="tasks.resample"):
            family_config(family, **resample)


@pytest.mark.parametrize("family", ["atari", "nav2d"])
@pytest.mark.parametrize("algo", ["fomaml", "maml", "reptile"])
def test_validation_and_auto_agree_on_where_gradients_can_go(algo, family):
    """meta.grad_on = learner is accepted exactly where auto would put the gradients on a GPU
    learner (first-order game batches, fomaml on atari), and the algorithm trait the meta-iteration
    asks before shipping (Algorithm.ships) says the same of the algorithm."""
    from metarl.core.algorithms import ALGORITHMS
    from metarl.core.config import ConfigError
    from metarl.distributed.fleet import resolve_grad_on

    cfg = family_config(family, **{"meta.algo": algo})
    try:
        family_config(family, **{"meta.algo": algo, "meta.grad_on": "learner"})
        accepted = True
    except ConfigError:
        accepted = False
    expected = (algo, family) == ("fomaml", "atari")
    assert accepted == (resolve_grad_on(cfg, learner_gpus=1.0) == "learner") == expected
    assert ALGORITHMS[algo].ships == (algo == "fomaml")  # what the meta-iteration asks before shipping


# ---- CPUs and GPUs a run asks for (metarl.distributed.fleet: run_cpus, run_gpus) ---------------------------------


@pytest.mark.parametrize("learner_gpus,gpus_per_worker", [("auto", 0.0), ("0", 0.25), ("1", 0.0), ("auto", 0.25)])
def test_sweep_runs_configurations_side_by_side_only_where_each_keeps_its_shares(monkeypatch, learner_gpus,
                                                                                 gpus_per_worker):
    """The sweep runs n configurations at once exactly where a 1/n slice of the cluster holds one
    run as the fleet plans it: the CPUs without shrinking any share, and the GPUs it would take."""
    import ray

    from metarl.distributed.fleet import LEARNER_CPUS, plan_resources
    from metarl.experiments.sweep import side_by_side

    cfg = smoke(**{"ray.address": "ray://head:10001", "ray.learner_gpus": learner_gpus,
                   "ray.gpus_per_worker": gpus_per_worker, "ray.cpus_per_worker": 0.5})
    n = 3
    for cpus in (6.0, 7.0, 7.5, 8.0, 12.0):
        for gpus in (0.0, 1.0, 3.0, 6.0):
            monkeypatch.setattr(ray, "is_initialized", lambda: True)
            monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})
            cpw, lcpu, lgpu, notes = plan_resources(cfg, cpus / n, gpus > 0)
            keeps_cpus = (cpw, lcpu, notes) == (cfg.ray.cpus_per_worker, LEARNER_CPUS, [])
            fits_gpus = cfg.num_workers * cfg.ray.gpus_per_worker + lgpu <= gpus / n
            assert side_by_side(cfg, n, local=False)[0] == (keeps_cpus and fits_gpus), (cpus, gpus)


# ---- the fresh network (metarl.distributed.learner.initial_params) ------------------------------------------------


@pytest.mark.parametrize("family", ["sinusoid", "nav2d", "atari"])
def test_every_fresh_network_is_the_learners_init_bit_for_bit(family):
    """theta at meta-iteration 0 as the Learner holds it is the fresh network of `metarl eval` and the
    sweep's baseline (initial_theta), of fewshot's random init, and where joint pre-training starts,
    whatever the global RNG did before."""
    import torch

    from metarl.experiments import fewshot
    from metarl.distributed.learner import Learner, initial_params, initial_theta
    from metarl.core.policy import ParamSpec
    from metarl.tasks import make_family

    for seed in (0, 3):
        cfg = family_config(family, **{"meta.seed": seed})
        fam = make_family(cfg)
        torch.rand(7)  # a disturbed global RNG must not matter
        learner = Learner(fam, seed, outer_lr=1e-3, max_grad_norm=1.0, device="cpu").get_theta()
        torch.rand(3)
        fresh = initial_theta(fam, seed)
        random_init = fewshot.random_init(cfg).theta
        model, params = initial_params(fam, seed)
        pretrain_start = ParamSpec.of(model).flatten(params)
        for other in (fresh, random_init, pretrain_start):
            assert other.dtype == learner.dtype and np.array_equal(other, learner)
    assert not np.array_equal(initial_theta(fam, 0), initial_theta(fam, 3))


# ---- opening a trained theta (checkpoint.load_configured, flat_theta) ---------------------------------


def _readers(family: str):
    """Every reader of a trained theta for `family`: name -> path -> (config, flat theta)."""
    from pathlib import Path

    from metarl.experiments import evaluate, fewshot
    from metarl.tasks import make_family

    def eval_reader(path):
        p, state, cfg = evaluate.load_checkpoint(Path(path))
        return cfg, evaluate.checkpoint_theta(state, make_family(cfg), p)

    def rllib_reader(path):
        from metarl.interop.rllib_module import load_theta

        _, _, cfg, theta = load_theta(Path(path))
        return cfg, theta

    def fewshot_reader(path):
        init = fewshot.load_init("maml", str(path))
        return init.cfg, init.theta

    return {"eval": eval_reader, "rllib": rllib_reader} if family == "atari" else {"fewshot": fewshot_reader}


@pytest.mark.parametrize("family", ["atari", "sinusoid"])
def test_every_reader_opens_a_checkpoint_alike_and_refuses_the_same_faults(family, tmp_path):
    """`metarl eval` (and sweep, probe), the RLlib export and `fewshot` read a run directory's latest
    checkpoint as the same validated config and float32 theta, and refuse an empty run directory, a
    checkpoint without its config and one whose theta does not fit the network, each with the same line."""
    import torch

    from metarl.core import checkpoint, config as config_mod
    from metarl.distributed.learner import initial_theta
    from metarl.tasks import make_family

    if family == "atari":
        pytest.importorskip("ray.rllib")
    cfg = family_config(family)
    theta = initial_theta(make_family(cfg), 0)
    ok, no_config, too_short, empty = (tmp_path / n for n in ("ok", "no-config", "short", "empty"))
    state = {"theta": torch.from_numpy(theta).double(), "optimizer": {}, "iteration": 4,
             "config": config_mod.to_dict(cfg)}
    checkpoint.save(ok, {**state, "iteration": 2})
    checkpoint.save(ok, state)
    checkpoint.save(no_config, {k: v for k, v in state.items() if k != "config"})
    checkpoint.save(too_short, {**state, "theta": state["theta"][:-1]})
    empty.mkdir()
    for name, read in _readers(family).items():
        got_cfg, got = read(ok)
        assert got_cfg == cfg and got.dtype == np.float32 and np.array_equal(got, theta), name
        for path, match in ((empty, "holds no checkpoint"), (no_config, "carries no config"),
                            (too_short, f"has {theta.size - 1} parameters, the network {theta.size}")):
            with pytest.raises(checkpoint.CheckpointError, match=match):
                read(path)


# ---- means and 95% intervals (metarl.core.stats) -----------------------------------------------------------


def test_the_t_quantiles_are_students():
    from scipy import stats as scipy_stats

    from metarl.core.stats import t95

    for df in range(1, 30):
        assert t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4), df
    assert t95(30) == t95(1000) == 1.96


def test_every_report_gives_the_same_interval():
    """Three seeds (or runs, or tasks) scoring 1, 2 and 4 (and a missing one where a report skips
    those): every report's mean and interval is t(0.975, 2) s / sqrt(3) around 7/3, computed here
    from scipy's quantile, and every table prints it the same way."""
    import math

    from scipy import stats as scipy_stats

    from metarl.experiments import curves, evaluate, fewshot, folds, probe, training

    vals = [1.0, 2.0, 4.0]
    mean, half = 7 / 3, scipy_stats.t.ppf(0.975, 2) * float(np.std(vals, ddof=1)) / math.sqrt(3)
    text = f"{mean:.2f} ± {half:.2f} (3 runs)"

    scored = [{"game": "pong", "init": "meta", "trace": {}, "score": {
        "auc_return": v, "auc_reward_rate": v, "final_return": v, "return_at": {}, "threshold": None,
        "steps_to_threshold": None}} for v in vals + [math.nan]]
    row = evaluate.aggregate(scored)[0]
    got = {"eval": (row["auc_return_mean"], row["auc_return_ci95"])}
    s = folds._stats(vals + [math.nan])
    got["folds"] = (s["mean"], s["ci95"])
    runs = fewshot.over_training_runs([{"init": f"run{i}", "K": 5, "inner_lr": 0.1, "later_lr": [0.1],
                                        "later_from_step": 2, "tasks": 10, "mean": {1: v}} for i, v in enumerate(vals)],
                                      {"maml": ["run0", "run1", "run2"]})[0]
    got["fewshot runs"] = (runs["mean"][1], runs["ci95"][1])
    rows = [{"game": "pong", "learner": learner, "alpha": alpha, **{m: v for m in probe.METRICS}}
            for v in vals for learner, alpha in (("update", math.nan), ("inner SGD step", 0.1))]
    got["probe"] = next((r["kl"], r["kl_ci95"]) for r in probe.summarise(rows) if r["learner"] == "update")
    for report, (m, h) in got.items():
        assert (m, h) == (pytest.approx(mean), pytest.approx(half, rel=1e-3)), report
    assert training.mean_ci(vals + [math.nan]) == text
    assert folds._pm(s, ".2f") == text[:-len(" (3 runs)")]
    ep = [curves.Episodes("fine-tuner", "pong", seed, np.array([10, 20]), np.array([10, 20]), np.array([v, v]))
          for seed, v in enumerate(vals)]
    assert curves.summary_rows(ep, (20,), window=1)[1][0]["20"] == f"{mean:.1f} ± {half:.1f} (3 seeds)"


# ---- seeds (metarl.core.seeds) -------------------------------------------------------------------------------


def test_joint_pre_training_draws_the_tasks_the_meta_learners_draw(tmp_path, monkeypatch):
    """With tasks.resample, joint pre-training's tasks at iteration t are the curves a stacked
    worker's tasks are redrawn to at meta-iteration t: the same seed for task i in both, the same
    seed for (task, iteration)."""
    from metarl.experiments import pretrain as pretrain_mod
    from metarl.distributed.fleet import start_fleet
    from metarl.distributed.iteration import meta_iteration
    from metarl.core.meta import make_groups
    from metarl.tasks import make_family

    class Recording:
        def __init__(self, family):
            self.family, self.seeds, self.tasks = family, {}, {}

        def make_model(self):
            return self.family.make_model()

        def make_task(self, name, seed):
            self.seeds[name], self.tasks[name] = seed, self.family.make_task(name, seed)
            return self.tasks[name]

    cfg = family_config("sinusoid", **{"tasks.resample": True, "ray.workers": 1, "meta.seed": 5})
    recorded = Recording(make_family(cfg))
    monkeypatch.setattr(pretrain_mod, "make_family", lambda _: recorded)
    pretrain_mod.pretrain(cfg, tmp_path / "pre", iterations=3, lr=1e-3, log=lambda *_: None)
    fleet = start_fleet(cfg, local=True)
    (worker,) = fleet.workers
    assert worker.seeds == recorded.seeds
    meta_iteration(fleet, cfg.tasks.train, make_groups(cfg.num_tasks, 1, np.random.default_rng(0)), "fomaml",
                   timeout=60, iteration=2)  # pre-training's last iteration drew iteration 2's curves
    for name, task in recorded.tasks.items():
        assert (task.amplitude, task.phase) == (worker.tasks[name].amplitude, worker.tasks[name].phase), name
    meta_iteration(fleet, cfg.tasks.train, make_groups(cfg.num_tasks, 1, np.random.default_rng(0)), "fomaml",
                   timeout=60, iteration=3)
    assert all(worker.tasks[n].amplitude != t.amplitude for n, t in recorded.tasks.items())


# ---- actor calls name their methods (backend.call) --------------------------------------------------------

ACTOR_CLASSES = ("TaskWorker", "Learner", "BenchWorker", "BenchLearner", "FineTuner", "FastAdapter")
PASS_THROUGH = {"method"}
"""Variables a call may forward its method in (a wrapper's parameter, typed Callable)."""
REFUSAL_TEST = "test_a_method_named_by_a_string_is_refused_and_subclasses_answer_for_themselves"


def _sources():
    from pathlib import Path

    import metarl

    package = Path(metarl.__file__).parent
    return sorted([*package.rglob("*.py"), *Path(__file__).parent.glob("*.py")])


def _actor_classes() -> dict[str, type]:
    from metarl.tools import bench
    from metarl.experiments import fastadapt, finetune
    from metarl.distributed import learner, worker

    return {name: getattr(m, name) for m in (worker, learner, bench, finetune, fastadapt) for name in ACTOR_CLASSES
            if hasattr(m, name)}


def test_every_actor_call_names_a_method_its_class_has():
    """Every `<backend>.call(actor, method, ...)` in the package and its tests passes the method itself
    (Class.method), never its name as a string, and every Class.method written anywhere exists: a
    misspelt method fails here, not as a task dropped at run time."""
    import ast

    classes = _actor_classes()
    assert sorted(classes) == sorted(ACTOR_CLASSES)
    calls = references = 0
    for path in _sources():
        tree = ast.parse(path.read_text())
        refusal = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == REFUSAL_TEST
                   for n in ast.walk(f)}  # the test below calls with a string on purpose
        for node in ast.walk(tree):
            if id(node) in refusal:
                continue
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call" \
                    and len(node.args) >= 2:
                m = node.args[1]
                assert not isinstance(m, (ast.Constant, ast.JoinedStr)), f"{where}: names its method by a string"
                typed = isinstance(m, ast.Attribute) and isinstance(m.value, ast.Name) and m.value.id in classes
                forwarded = isinstance(m, ast.Name) and m.id in PASS_THROUGH
                chosen = isinstance(m, ast.Subscript) and isinstance(m.value, ast.Name) and m.value.id == "LEADER_CALL"
                assert typed or forwarded or chosen, f"{where}: the method {ast.unparse(m)} is not Class.method"
                calls += 1
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in classes:
                assert callable(getattr(classes[node.value.id], node.attr, None)), \
                    f"{where}: {node.value.id} has no method {node.attr}"
                references += 1
    assert calls >= 40 and references >= calls


def test_a_method_named_by_a_string_is_refused_and_subclasses_answer_for_themselves():
    from metarl.distributed.backend import LocalBackend
    from metarl.tools.bench import BenchLearner
    from metarl.distributed.iteration import LEADER_CALL
    from metarl.distributed.learner import Learner
    from metarl.distributed.worker import TaskWorker

    assert LEADER_CALL == {"fomaml": TaskWorker.adapt, "maml": TaskWorker.adapt, "reptile": TaskWorker.reptile}

    class Answer:
        def info(self):
            return "base"

    class Override(Answer):
        def info(self):
            return "override"

    b = LocalBackend()
    with pytest.raises(TypeError, match="method itself"):
        b.call(Answer(), "info")
    assert b.get(b.call(Override(), Answer.info)) == "override"
    with pytest.raises(AttributeError):  # an actor without the method fails at the call, not at its result
        b.call(Answer(), BenchLearner.receive)
    assert Learner.info.__name__ == "info"
