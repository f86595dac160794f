"""`metarl eval`: the scores against hand-computed values, the fine-tuner against the inner loop it
must be, and the command end to end on a real smoke checkpoint (files, PNGs, W&B records, errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from metarl.core import checkpoint, config as config_mod, meta
from metarl.cli import main
from metarl.experiments.evaluate import EvalSpec, curve, curve_steps, nan_stats, run_jobs, running_return, score
from metarl.experiments.finetune import FineTuneLearner, finetune
from metarl.distributed.learner import initial_theta
from metarl.core.policy import ParamSpec
from metarl.distributed.run import run
from metarl.tasks import make_family
from metarl.distributed.tracking import read_metrics

from conftest import PER_ROLLOUT, assert_png, one_update, smoke







# six fine-tuning steps of 10 env steps; episodes end during steps 1, 1, 3 and 5
TRACE = {"env_steps": [10, 20, 30, 40, 50, 60], "frames": [40, 80, 120, 160, 200, 240],
         "reward_sum": [1.0, 0.0, 2.0, 0.0, 3.0, 0.0], "loss": [0.0] * 6,
         "episodes": [[1, 2.0], [1, 4.0], [3, 6.0], [5, 10.0]]}


def test_running_return_is_the_mean_of_the_last_window_episodes():
    r = running_return(TRACE, window=2)
    assert math.isnan(r[0])
    assert r[1:].tolist() == [3.0, 3.0, 5.0, 5.0, 8.0]


def test_curve_reads_evenly_spaced_steps_and_windowed_score_rate():
    assert curve_steps(6, 3) == [1, 3, 5] and curve_steps(6, 10) == [0, 1, 2, 3, 4, 5] and curve_steps(7, 1) == [6]
    c = curve(TRACE, points=3, window=2)
    assert c["env_steps"] == [20, 40, 60] and c["frames"] == [80, 160, 240]
    assert c["return"] == [3.0, 5.0, 8.0]
    assert c["reward_rate"] == pytest.approx([1 / 20, 2 / 20, 3 / 20])
    assert c["episodes"] == [2, 3, 4]


def test_scores_auc_threshold_and_fixed_budgets():
    s = score(TRACE, window=2, threshold=5.0, at=(25, 60))
    assert s["auc_return"] == pytest.approx(np.mean([3, 3, 5, 5, 8]))
    assert s["auc_reward_rate"] == pytest.approx(6 / 60)
    assert s["final_return"] == 8.0
    assert s["return_at"] == {"25": 3.0, "60": 8.0}
    assert s["steps_to_threshold"] == 40 and s["frames_to_threshold"] == 160
    assert score(TRACE, 2, threshold=9.0, at=())["steps_to_threshold"] is None
    assert score(TRACE, 2, threshold=None, at=())["steps_to_threshold"] is None


def test_nan_stats_ignore_missing_values():
    mean, std, n = nan_stats([[1.0, math.nan], [3.0, math.nan]])
    assert mean[0] == 2.0 and std[0] == pytest.approx(math.sqrt(2.0)) and n.tolist() == [2, 0]
    assert math.isnan(mean[1])


def test_finetune_is_the_inner_loop_repeated():
    """Two fine-tuning steps from theta equal meta.adapt with S = 2 on the same seeded task, bit for
    bit on any CPU: the same float32 operations on the same rollouts, in this process (not a claim
    that two machines agree)."""
    cfg = smoke()
    family = make_family(cfg)
    model = family.make_model()
    spec = ParamSpec.of(model)
    theta = spec.unflatten(initial_theta(family, cfg.meta.seed))
    task_a, task_b = family.make_task("boxing", 123), family.make_task("boxing", 123)
    try:
        trace, theta_ft = finetune(task_a, model, theta, FineTuneLearner("sgd", cfg.meta.inner_lr), budget=2 * PER_ROLLOUT)
        reference = meta.adapt(task_b, model, theta, cfg.meta.inner_lr, 2).theta_prime
    finally:
        task_a.close(), task_b.close()
    assert trace["env_steps"] == [PER_ROLLOUT, 2 * PER_ROLLOUT]
    assert trace["frames"] == [4 * PER_ROLLOUT, 8 * PER_ROLLOUT]
    for k in theta:
        assert torch.equal(theta_ft[k], reference[k]), k
    assert any(not torch.equal(theta_ft[k], theta[k]) for k in theta)  # it did learn something


def test_fresh_init_is_the_learners_seeded_init():
    family = make_family(smoke())
    a, b, c = initial_theta(family, 0), initial_theta(family, 0), initial_theta(family, 1)  # same seed, same process
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    run(smoke(**{"meta.iterations": 1}), out, local=True, log=lambda _: None)
    return out


def test_eval_command_writes_curves_tables_pngs_and_records(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(trained_run), "--local", "--steps", str(3 * PER_ROLLOUT),
            "--seeds", "2", "--points", "2", "--out", str(out), "--wandb", "disabled"]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["iteration"] == 1 and result["checkpoint"].endswith("ckpt_000001.pt")
    jobs = result["jobs"]
    assert sorted((j["init"], j["seed"]) for j in jobs) == [("fresh", 0), ("fresh", 1), ("meta", 0), ("meta", 1)]
    for j in jobs:
        assert j["game"] == "boxing"
        assert j["curve"]["env_steps"] == [2 * PER_ROLLOUT, 3 * PER_ROLLOUT]  # 3 steps read at 2 points
        assert j["curve"]["frames"] == [8 * PER_ROLLOUT, 12 * PER_ROLLOUT]
        assert len(j["trace"]["env_steps"]) == 3
    # both inits of one seed play the same emulator and sampling seeds (common random numbers)
    env_seeds = {(j["init"], j["seed"]): j["env_seed"] for j in jobs}
    assert env_seeds[("meta", 0)] == env_seeds[("fresh", 0)] != env_seeds[("meta", 1)]
    assert len((out / "eval_curves.csv").read_text().strip().splitlines()) == 1 + 4 * 2
    summary = (out / "eval_summary.csv").read_text().strip().splitlines()
    assert summary[0].startswith("game,init,seeds,threshold,diverged,auc_return_mean") and len(summary) == 3
    assert_png(out / "curves_boxing.png")
    assert_png(out / "summary.png")
    records = read_metrics(out / "eval_metrics.jsonl")
    assert [r["frames"] for r in records] == [8 * PER_ROLLOUT, 12 * PER_ROLLOUT]
    assert {"eval/boxing/meta/reward_rate", "eval/boxing/fresh/return"} <= set(records[0])
    assert "eval written to" in capsys.readouterr().out

    before = (out / "eval.json").stat().st_mtime_ns
    assert main(args) == 2  # an evaluation is never overwritten
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "eval.json").stat().st_mtime_ns == before


def test_eval_flags_reach_the_finetuner(trained_run, tmp_path, monkeypatch):
    """--optimizer, --lr and --set finetune.* make the fine-tuner, --threshold the steps-to-threshold
    score, --workers the number of fine-tuning actors."""
    from metarl.experiments import evaluate as evaluate_mod

    seen, real = {}, evaluate_mod.run_jobs

    def spy(family, learner, thetas, spec, local, address="", workers=0, log=print):
        seen.update(learner=learner, workers=workers)
        return real(family, learner, thetas, spec, local, address, workers, log)

    monkeypatch.setattr(evaluate_mod, "run_jobs", spy)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(trained_run), "--local", "--steps", str(PER_ROLLOUT), "--seeds", "1",
                 "--points", "1", "--optimizer", "adam", "--lr", "0.003", "--set", "finetune.max_grad_norm=0.25",
                 "--threshold", "-7.5", "--workers", "3", "--wandb", "disabled", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["finetune"]["optimizer"], result["finetune"]["lr"], result["finetune"]["max_grad_norm"]) == \
        ("adam", 0.003, 0.25) and result["learner"] == "adam lr 0.003, grad clip 0.25"
    assert seen["learner"] == FineTuneLearner("adam", 0.003, 0.25) and seen["workers"] == 3
    assert [r["threshold"] for r in result["summary"]] == [-7.5, -7.5]  # meta and fresh; default: fresh's final


def test_eval_names_an_unknown_game(trained_run, capsys):
    assert main(["eval", "--checkpoint", str(trained_run), "--games", "boxing,boxxing", "--local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "boxxing" in err[0] and "valid games" in err[0]


def test_eval_sends_other_families_to_fewshot(tmp_path, capsys):
    cfg = config_mod.to_dict(smoke())
    cfg["tasks"] = {"family": "sinusoid", "train": ["sine-0000", "sine-0001"], "heldout": []}
    checkpoint.save(tmp_path / "run", {"theta": torch.zeros(3), "optimizer": {}, "iteration": 1, "config": cfg})
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--local"]) == 2
    err = capsys.readouterr().err
    assert "metarl fewshot" in err and "sinusoid" in err


def test_ray_actors_give_the_same_curves_as_local(own_ray):
    cfg = smoke()
    family = make_family(cfg)
    spec = EvalSpec(games=("boxing",), budget=2 * PER_ROLLOUT, seeds=(0, 1), points=2)
    thetas = {"fresh": initial_theta(family, 0)}
    quiet = lambda _: None  # noqa: E731
    on_ray = run_jobs(family, FineTuneLearner("sgd", cfg.meta.inner_lr), thetas, spec, local=False, log=quiet)
    local = run_jobs(family, FineTuneLearner("sgd", cfg.meta.inner_lr), thetas, spec, local=True, log=quiet)
    assert len(on_ray) == len(local) == 2
    for a, b in zip(on_ray, local):
        assert (a["game"], a["init"], a["seed"]) == (b["game"], b["init"], b["seed"])
        # exact equality: the actors and the local run execute the same code on the same inputs on this
        # machine, with one torch thread each (FineTuner sets it), so every float agrees to the last bit
        for key in ("env_steps", "reward_sum", "loss", "episodes"):
            assert a["trace"][key] == b["trace"][key], key


def test_fewshot_counts_diverged_tasks_from_their_first_bad_step():
    from metarl.experiments.fewshot import diverged

    c = np.array([[1.0, 0.5, 0.4], [2.0, 5000.0, 1.0], [1.0, math.nan, 0.3], [3.0, 2.0, math.inf]])
    assert diverged(c, "sinusoid").sum(0).tolist() == [0, 2, 3]
    assert diverged(c, "nav2d").sum(0).tolist() == [0, 1, 2]  # returns: only non-finite counts


def test_fewshot_pools_training_runs_with_a_t_interval_over_runs():
    from metarl.experiments.fewshot import over_training_runs

    rows = [{"init": f"m [{i}]", "K": None, "inner_lr": 0.5, "later_lr": [0.1], "later_from_step": 2, "tasks": 40,
             "mean": {0: v, 1: 2 * v}, "ci95": {0: 0.1, 1: 0.1}, "diverged": {0: 0, 1: i}}
            for i, v in enumerate((1.0, 2.0, 6.0))]
    (row,) = over_training_runs(rows, {"m": [r["init"] for r in rows]})
    assert row["runs"] == 3 and row["mean"][0] == pytest.approx(3.0) and row["median"][1] == 4.0  # no medians: means
    assert row["ci95"][0] == pytest.approx(4.303 * np.std([1.0, 2.0, 6.0], ddof=1) / np.sqrt(3))
    assert row["diverged"] == {0: 0, 1: 3} and row["later_lr"] == [0.1]


def test_atari_finetuning_update_lowers_the_loss_on_its_batch():
    """The Atari path of the fine-tuning learner (chunked gradient, both optimizers): a few hundred
    steps of fine-tuning run, and one small update lowers the actor-critic loss on the batch it was
    computed from (first order; lr small enough that the second-order term is orders smaller).
    Measured decreases 3.9e-5 (adam) and 7.9e-4 (sgd) of a 0.029 loss, against float32 rounding
    near 1e-8: the outcome does not depend on the CPU."""
    cfg = smoke(**{"loss.grad_chunk": 16})  # 4 envs x 16 steps: four chunks of 4 steps
    family = make_family(cfg)
    model = family.make_model()
    theta0 = ParamSpec.of(model).unflatten(initial_theta(family, 0))
    task = family.make_task("pong", 5)
    try:
        trace, _ = finetune(task, model, theta0, FineTuneLearner("adam", 1e-4, 0.5), budget=4 * PER_ROLLOUT)
        assert trace["env_steps"][-1] == 4 * PER_ROLLOUT and not trace["diverged"]
        batch = task.sample(model, theta0)
        for learner in (FineTuneLearner("adam", 1e-6, 0.5), FineTuneLearner("sgd", 1e-3)):
            loss0, loss1, _ = one_update(task, model, theta0, batch, learner)
            assert loss1 < loss0, (learner, loss0, loss1)
    finally:
        task.close()
