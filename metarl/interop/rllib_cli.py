"""`metarl export` and `metarl ppo`: the commands of metarl.interop.rllib_module, kept apart so that RLlib
(seconds to import) loads only when one of them runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from metarl.core import config as config_mod
from metarl.cliargs import (add_cluster_args, add_config_args, add_finetune_args, add_out_arg, add_steps_arg, claim_out,
                            resolve_config, retire)
from metarl.distributed.learner import initial_theta
from metarl.tasks import make_family
from metarl.distributed.tracking import Tracker


def cmd_export(args: argparse.Namespace) -> int:
    out = claim_out(args.out)
    from metarl.interop.rllib_module import export, load_theta, ray_version

    path, state, cfg, theta = load_theta(Path(args.checkpoint))
    export(cfg.tasks.family, theta, out, {"checkpoint": str(path), "iteration": int(state["iteration"]),
                                          "ray": ray_version()})
    print(f"exported theta of {path} ({cfg.tasks.family}, iteration {int(state['iteration'])}) as an RLlib "
          f"RLModule to {out}; load it with ray.rllib.core.rl_module.RLModule.from_checkpoint('{out}')")
    return 0


def cmd_ppo(args: argparse.Namespace) -> int:
    if args.steps < 1 or (args.env_runners or 0) < 0:
        raise config_mod.ConfigError(f"--steps = {args.steps} must be at least 1 and --env-runners "
                                     f"= {args.env_runners} at least 0")
    if args.local and args.env_runners:
        raise config_mod.ConfigError("--local samples in this process (no env-runner actors); drop --env-runners")
    out = claim_out(args.out)
    from metarl.interop.rllib_module import PPOLearner, export, finetune_ppo, load_theta, ray_init, ray_version

    path, state, cfg, theta = load_theta(Path(args.checkpoint))
    cfg = resolve_config(args, base=cfg)
    game = args.game
    cfg = config_mod.validate(config_mod.override(cfg, "tasks.heldout", game))  # validates the game name
    learner = PPOLearner.of(cfg, env_runners=0 if args.local else (1 if args.env_runners is None else args.env_runners))
    if args.init == "fresh":
        theta = initial_theta(make_family(cfg), cfg.meta.seed)
    out.mkdir(parents=True, exist_ok=True)
    info = {"checkpoint": str(path), "iteration": int(state["iteration"]), "init": args.init, "ray": ray_version()}
    export(cfg.tasks.family, theta, out / "start_module", info)
    ray_init(cfg.ray.address, args.local)
    print(f"metarl ppo: {game} from {args.init} theta of {path}, {learner.label}, {args.steps:,} env steps -> {out}")
    trace = finetune_ppo(cfg.finetuning, game, out / "start_module", learner, args.steps, cfg.meta.seed,
                         save_to=out / "rllib", progress=lambda line: print(f"ppo {game}: {line}", flush=True))
    returns = [r for _, r in trace["episodes"]]
    summary = {**info, "game": game, "learner": asdict(learner), "seed": cfg.meta.seed,
               "env_steps": trace["env_steps"][-1], "frames": trace["frames"][-1], "seconds": trace["seconds"],
               "env_steps_per_s": trace["env_steps"][-1] / trace["seconds"], "episodes": len(returns), "trace": trace}
    log_trace(out, cfg, game, args.init, trace)
    (out / "ppo.json").write_text(json.dumps(summary, indent=2) + "\n")
    last = f"{np.mean(returns[-10:]):.2f}" if returns else "n/a (no episode ended)"
    print(f"done: {summary['env_steps']:,} env steps ({summary['frames']:,} frames) in {trace['seconds']:.1f}s "
          f"({summary['env_steps_per_s']:.0f} env steps/s), raw return of the last 10 episodes {last}; "
          f"RLlib checkpoint {out / 'rllib'}")
    return 0


def log_trace(out: Path, cfg: config_mod.Config, game: str, init: str, trace: dict[str, Any]) -> None:
    """One record per PPO iteration (x: frames, env steps beside), to ppo_metrics.jsonl and W&B."""
    tracker = Tracker(out, project=cfg.log.wandb_project, group=cfg.log.experiment, name=f"{cfg.run_name}-ppo-{game}",
                      config={**config_mod.to_dict(cfg), "game": game, "init": init}, mode=cfg.log.wandb_mode,
                      job_type="ppo", metrics_file="ppo_metrics.jsonl", step_key="frames")
    try:
        for i, (steps, frames) in enumerate(zip(trace["env_steps"], trace["frames"])):
            tracker.log({"frames": frames, "env_steps": steps, "ppo/raw_reward": trace["reward_sum"][i],
                         "ppo/loss": trace["loss"][i]})
    finally:
        tracker.finish()


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint's theta as an RLlib RLModule checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a checkpoint file, or a run directory (its latest checkpoint)")
    add_out_arg(p, "the RLModule checkpoint")
    retire(p, "--rllib", "now --out DIR (the RLlib RLModule checkpoint is the only export)")
    p.set_defaults(func=cmd_export)

    q = subparsers.add_parser("ppo", help="RLlib PPO (finetune.*) on one game, starting from a checkpoint's theta")
    add_config_args(q, source="checkpoint")
    q.add_argument("--game", required=True, help="the game to train on (a held-out one)")
    add_steps_arg(q, "env steps of fine-tuning (whole iterations of T x B)", required=True)
    add_out_arg(q, "start_module/, rllib/ (RLlib checkpoint), ppo.json, ppo_metrics.jsonl")
    q.add_argument("--init", choices=("meta", "fresh"), default="meta",
                   help="start from the checkpoint's theta (meta) or the run's initial network (fresh, meta.seed)")
    add_finetune_args(q, optimizer=False, workers=False)
    q.add_argument("--env-runners", type=int, help="RLlib env-runner actors (default 1; 0: in this process)")
    add_cluster_args(q, "a local Ray only, RLlib's env runner in this process (--env-runners 0)")
    q.set_defaults(func=cmd_ppo)
