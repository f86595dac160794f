"""Does an inner step adapt on fresh data? For a meta-trained MinAtar theta, per game and trial: one
adaptation rollout at theta, then the reward per step on fresh rollouts of theta and of theta' for
several inner steps (full network at alpha; policy head only at larger alphas; one PPO pass of the
fine-tuner on the same rollout), evaluated in a random order per trial, paired per trial.

    PYTHONPATH=. python docs/results/meta-learns/inner-step/head_probe.py RUN_DIR TRIALS EVAL_ROLLOUTS OUT.json
"""
import json
import sys

import numpy as np
import torch
from metarl.core import checkpoint, config as config_mod
from metarl.core.meta import detached, sgd_step
from metarl.experiments.finetune import FineTuneLearner, make_optimizer, ppo_updates
from metarl.core.stats import ci95
from metarl.core.policy import ParamSpec
from metarl.tasks import make_family

run, trials, evals = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
path, state, cfg = checkpoint.load_configured(run)
family = make_family(cfg)
model = family.make_model()
spec = ParamSpec.of(model)
theta = spec.unflatten(checkpoint.flat_theta(state, path, spec.numel))
learner = FineTuneLearner.of(cfg)
HEAD = {k for k in theta if k.startswith("pi.")}

def head_step(params, grads, alpha):
    return {k: (p - alpha * g if k in HEAD else p) for (k, p), g in zip(params.items(), grads)}

def rate(task, params, n):
    steps = rew = 0.0
    with torch.no_grad():
        for _ in range(n):
            b = task.sample(model, params)
            steps += b.env_steps; rew += float(b.reward_sum)
    return rew / steps

out = {}
rng = np.random.default_rng(0)
for gi, game in enumerate(cfg.tasks.train):
    task = family.make_task(game, 1000 + gi)
    d = {}
    for t in range(trials):
        batch = task.sample(model, detached(theta))
        grads, _, _ = task.grad(model, detached(theta, requires_grad=True), batch)
        cands = {"full a0.1": detached(sgd_step(theta, grads, 0.1))}
        for a in (0.3, 1.0, 3.0):
            cands[f"head a{a:g}"] = detached(head_step(theta, grads, a))
        p = detached(theta, requires_grad=True); opt = make_optimizer(p, learner)
        ppo_updates(task, model, p, batch, learner, opt, learner.lr, torch.Generator().manual_seed(t))
        cands["PPO pass (fine-tuner)"] = detached(p)
        # evaluate theta and every theta' in a random order per trial (the game's state drifts as it plays)
        order = ["theta", *cands]
        rng.shuffle(order)
        got = {name: rate(task, theta if name == "theta" else cands[name], evals) for name in order}
        for name in cands:
            d.setdefault(name, []).append(got[name] - got["theta"])
        d.setdefault("theta", []).append(got["theta"])
    out[game] = d
    line = ", ".join(f"{k}: {np.mean(v):+.4f}±{ci95(v):.4f}" for k, v in d.items())
    print(game, line, flush=True)
json.dump(out, open(sys.argv[4], "w"))
