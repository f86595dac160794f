"""`metarl probe`: what one inner step of size alpha does to the policy and to the value, beside one
update of the fine-tuning learner, on the same rollout.

MAML's inner loop is plain SGD: theta' = theta - alpha * grad L_i(theta). The actor-critic loss
couples a policy term and a value term through one shared trunk, so a single alpha sets how far both
move. This command measures it instead of guessing: for each game (and seed) it samples one
adaptation rollout at theta (a fresh network, or a checkpoint's theta), takes the inner gradient
exactly as a task worker does, and for each alpha reports, on that rollout's states:

- `kl`: mean KL(pi_theta || pi_theta'), how far the policy moved;
- `surrogate`: mean (pi_theta'(a|s) / pi_theta(a|s) - 1) * A (advantages normalised as in the loss),
  the first-order change of the policy objective: > 0 when the step favours the better actions;
- `dv`: mean |V_theta' - V_theta|, how far the value moved (returns of clipped rewards lie within
  about +-1 / (1 - gamma) but mostly within +-1);
- `dv_err`: change of the value's mean squared error to the GAE returns: < 0 when the value improved,
  > 0 when the step overshot;
- `rel_step`: |alpha * grad| / |theta|.

The same four numbers for one update of `finetune` (PPO's epochs x minibatches, or one step) on the
same rollout are the reference row, and `alpha_kl_match` is the alpha at which the inner step moves
the policy as far as that update (interpolated on log-log axes). Everything runs in this process:
the steps in float32, as training takes them; the comparisons in float64 (`compare`).

Outputs: probe.csv (every game, seed and alpha), probe_summary.md (mean and 95% t-interval over
seeds), probe.png (kl and dv against alpha, the update's values as horizontal lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.core import config as config_mod
from metarl.cliargs import add_config_args, add_out_arg, add_seeds_arg, claim_out, resolve_config
from metarl.core.config import ConfigError
from metarl.experiments.evaluate import checkpoint_theta, load_checkpoint
from metarl.experiments.finetune import FineTuneLearner, make_optimizer, ppo_updates, update
from metarl.distributed.learner import initial_theta
from metarl.core.meta import detached, sgd_step
from metarl.core.plots import Panel, Series, markdown_table, save_grid, write_csv
from metarl.core.policy import Params, ParamSpec, forward
from metarl.core.seeds import task_seed
from metarl.core.stats import ci95, pm
from metarl.tasks import make_family

METRICS = ("kl", "surrogate", "dv", "dv_err", "rel_step")


@torch.no_grad()
def compare(model: torch.nn.Module, before: Params, after: Params, batch: Any, adv: torch.Tensor,
            ret: torch.Tensor, norm_adv: bool) -> dict[str, float]:
    """The four changes from `before` to `after` on the rollout's T x B states (see module doc), in
    float64: a small step's KL is second order in the logits' change (~1e-9 at a fresh network), below
    what float32 log-probabilities resolve."""
    obs, actions = batch.data["obs"][:-1].flatten(0, 1), batch.data["actions"].flatten().long()
    a, r = adv.flatten().double(), ret.flatten().double()
    if norm_adv and a.numel() > 1:
        a = (a - a.mean()) / (a.std() + 1e-8)
    l0, v0 = (x.double() for x in forward(model, before, obs))
    l1, v1 = (x.double() for x in forward(model, after, obs))
    lp0, lp1 = torch.log_softmax(l0, -1), torch.log_softmax(l1, -1)
    ratio = (lp1 - lp0).gather(-1, actions.unsqueeze(-1)).squeeze(-1).exp()
    return {"kl": float((lp0.exp() * (lp0 - lp1)).sum(-1).mean()),
            "surrogate": float(((ratio - 1.0) * a).mean()),
            "dv": float((v1 - v0).abs().mean()),
            "dv_err": float((v1 - r).pow(2).mean() - (v0 - r).pow(2).mean())}


def norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def probe_task(task: Any, model: torch.nn.Module, theta: Params, alphas: list[float], learner: FineTuneLearner,
               norm_adv: bool, seed: int) -> list[dict[str, Any]]:
    """One rollout at theta; the inner step for each alpha and one fine-tuner update, compared."""
    batch = task.sample(model, detached(theta))
    grads, loss, _ = task.grad(model, detached(theta, requires_grad=True), batch)
    adv, ret = task.advantages(batch)
    size = norm(theta.values())
    gnorm = norm(grads)
    rows = []
    for alpha in alphas:
        after = detached(sgd_step(theta, grads, alpha))
        rows.append({"learner": "inner SGD step", "alpha": alpha, "rel_step": alpha * gnorm / size,
                     **compare(model, theta, after, batch, adv, ret, norm_adv)})
    params = detached(theta, requires_grad=True)  # a copy: theta itself stays as it was
    opt = make_optimizer(params, learner)
    if learner.ppo:
        ppo_updates(task, model, params, batch, learner, opt, learner.lr, torch.Generator().manual_seed(seed))
    else:
        update(params, task.grad(model, params, batch)[0], learner, opt)
    step = norm([p.detach() - t for p, t in zip(params.values(), theta.values())])
    rows.append({"learner": f"fine-tuner update ({learner.label})", "alpha": math.nan, "rel_step": step / size,
                 **compare(model, theta, detached(params), batch, adv, ret, norm_adv)})
    for r in rows:
        r.update(grad_norm=gnorm, inner_loss=loss, samples=batch.env_steps)
    return rows


def kl_match(alphas: list[float], kls: list[float], target: float) -> float:
    """The alpha whose inner step's KL equals `target`: log-log interpolation between the two
    probed alphas around it (nan if no probed pair brackets it)."""
    pts = [(a, k) for a, k in zip(alphas, kls) if k > 0 and math.isfinite(k)]
    for (a0, k0), (a1, k1) in zip(pts, pts[1:]):
        if min(k0, k1) <= target <= max(k0, k1) and k0 != k1:
            w = (math.log(target) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return math.exp(math.log(a0) + w * (math.log(a1) - math.log(a0)))
    return math.nan


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95% t-interval over seeds of each metric, per game and learner (and alpha)."""
    out = []
    for game in dict.fromkeys(r["game"] for r in rows):
        mine = [r for r in rows if r["game"] == game]
        # the update's rows have no alpha (nan, which equals nothing): keyed by None instead
        keys = list(dict.fromkeys((r["learner"], None if math.isnan(r["alpha"]) else r["alpha"]) for r in mine))
        ref = [r for r in mine if r["learner"] != "inner SGD step"]
        for learner, alpha in keys:
            sel = [r for r in mine if r["learner"] == learner and (alpha is None or r["alpha"] == alpha)]
            row: dict[str, Any] = {"game": game, "learner": learner, "alpha": math.nan if alpha is None else alpha,
                                   "seeds": len(sel)}
            for m in METRICS:
                vals = [r[m] for r in sel]
                row[m] = float(np.mean(vals))
                row[f"{m}_ci95"] = ci95(vals)
            out.append(row)
        inner = [r for r in out if r["game"] == game and r["learner"] == "inner SGD step"]
        target = float(np.mean([r["kl"] for r in ref]))
        match = kl_match([r["alpha"] for r in inner], [r["kl"] for r in inner], target)
        for r in out:
            if r["game"] == game:
                r["alpha_kl_match"] = match
    return out


def fmt(x: float, ci: float) -> str:
    return pm(x, ci, ".2e", ".1e")


def report(summary: list[dict[str, Any]]) -> str:
    table = [{"game": r["game"], "learner": r["learner"] if r["learner"] != "inner SGD step" else f"SGD, α = {r['alpha']:g}",
              **{m: fmt(r[m], r[f"{m}_ci95"]) for m in METRICS}, "seeds": r["seeds"]} for r in summary]
    md = markdown_table(table, {"game": "game", "learner": "step", "kl": "policy KL", "surrogate": "surrogate gain",
                                "dv": "mean |ΔV|", "dv_err": "Δ value MSE", "rel_step": "|Δθ| / |θ|", "seeds": "seeds"})
    matches = dict.fromkeys((r["game"], r["alpha_kl_match"]) for r in summary)
    lines = [f"- {g}: α moving the policy as far as one fine-tuner update: "
             + (f"{m:.3g}" if math.isfinite(m) else "outside the probed α") for g, m in matches]
    return md + "\n" + "\n".join(lines) + "\n"


def draw(out: Path, summary: list[dict[str, Any]]) -> Path:
    panels = []
    for metric, title in (("kl", "policy KL(θ ‖ θ′)"), ("dv", "mean |V(θ′) − V(θ)|")):
        series = []
        for n, game in enumerate(dict.fromkeys(r["game"] for r in summary)):
            inner = [r for r in summary if r["game"] == game and r["learner"] == "inner SGD step"]
            ref = [r for r in summary if r["game"] == game and r["learner"] != "inner SGD step"]
            xs = [r["alpha"] for r in inner]
            series.append(Series(f"{game}: SGD step of α", xs, [max(r[metric], 1e-12) for r in inner], color=f"C{n % 10}"))
            if ref:
                series.append(Series(f"{game}: one fine-tuner update", [min(xs), max(xs)], [max(ref[0][metric], 1e-12)] * 2,
                                     color=f"C{n % 10}", linestyle="--"))
        panels.append(Panel(f"{title} after one step", "α (inner SGD step)", metric, series, xscale="log", yscale="log"))
    return save_grid(out / "probe.png", panels, 2, title="one inner step on one rollout, beside one fine-tuner update")


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = sorted(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--alphas {text!r} must be step sizes separated by commas, e.g. 0.001,0.01,0.1") from None
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise ConfigError(f"--alphas {text!r}: every step size must be a positive number")
    return alphas


def cmd_probe(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    alphas = parse_alphas(args.alphas)
    if args.seeds < 1:
        raise ConfigError(f"--seeds = {args.seeds} must be at least 1")
    if args.checkpoint:
        if args.config:
            raise ConfigError("--checkpoint brings its run's config; drop --config and change keys with --set")
        if args.seed is not None:
            raise ConfigError("--seed sets meta.seed, the fresh network's seed; with --checkpoint theta is the "
                              "checkpoint's, so drop --seed (--seeds sets the rollouts' seeds)")
        path, state, cfg = load_checkpoint(Path(args.checkpoint))
        cfg = resolve_config(args, base=cfg)
    else:
        cfg = resolve_config(args)
    if cfg.tasks.family not in config_mod.GAME_FAMILIES:
        raise ConfigError(f"tasks.family is '{cfg.tasks.family}': `metarl probe` measures a policy and a value, "
                          f"which the {', '.join(config_mod.GAME_FAMILIES)} families have; use a config of one of them")
    games = list(cfg.tasks.train)
    if args.games:  # checked as held-out games are: known names, one clear line otherwise
        games = list(config_mod.validate(config_mod.override(cfg, "tasks.heldout", args.games)).tasks.heldout)
    family = make_family(cfg)
    torch.set_num_threads(max(1, args.threads))
    model = family.make_model()
    spec = ParamSpec.of(model)
    flat = checkpoint_theta(state, family, path) if args.checkpoint else initial_theta(family, cfg.meta.seed)
    theta = spec.unflatten(torch.from_numpy(flat))
    learner = dataclasses.replace(FineTuneLearner.of(cfg), bf16=False, gpus=0.0)  # float32, on this CPU
    source = f"checkpoint {path}" if args.checkpoint else f"a fresh network (meta.seed {cfg.meta.seed})"
    print(f"metarl probe: {', '.join(games)} at {source}; alphas {', '.join(f'{a:g}' for a in alphas)}; "
          f"{cfg.env.num_envs} x {cfg.env.rollout_len} rollouts; {args.seeds} seed(s) -> {out}", flush=True)
    rows = []
    t0 = time.perf_counter()
    for gi, game in enumerate(games):
        for s in range(args.seeds):
            task = family.make_task(game, task_seed(s, gi))
            try:
                for r in probe_task(task, model, theta, alphas, learner, cfg.loss.norm_adv, s):
                    rows.append({"game": game, "seed": s, **r})
            finally:
                task.close()
            print(f"  {game} seed {s}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "probe.csv", rows)
    summary = summarise(rows)
    text = report(summary)
    (out / "probe_summary.md").write_text(f"θ: {source}; {cfg.env.num_envs} x {cfg.env.rollout_len} rollouts\n\n{text}")
    draw(out, summary)
    print(text, end="")
    print(f"probe written to {out}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("probe", help="what one inner step of alpha does to the policy and the value, "
                                            "beside one fine-tuner update")
    add_config_args(p, source="either")
    p.add_argument("--games", help="games, comma separated (default: tasks.train of the config)")
    p.add_argument("--alphas", default="0.001,0.003,0.01,0.03,0.1,0.3,1",
                   help="inner step sizes, comma separated (default 0.001,0.003,0.01,0.03,0.1,0.3,1)")
    add_seeds_arg(p, "one probe rollout per game and seed (default 3)", default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_out_arg(p, "probe.csv, probe_summary.md and probe.png")
    p.set_defaults(func=cmd_probe)
