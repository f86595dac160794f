"""`metarl export --rllib` and `metarl ppo`: the commands of metarl.rllib_module, kept apart so
that RLlib (seconds to import) loads only when one of them runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from metarl import config as config_mod
from metarl.finetune import initial_theta
from metarl.tasks import make_family

def cmd_export(args: argparse.Namespace) -> int:
    from metarl.rllib_module import export, load_theta, ray_version, require_empty

    out = Path(args.rllib)
    require_empty(out)
    path, state, cfg, theta = load_theta(Path(args.checkpoint))
    export(cfg.tasks.family, theta, out, {"checkpoint": str(path), "iteration": int(state["iteration"]),
                                          "ray": ray_version()})
    print(f"exported theta of {path} ({cfg.tasks.family}, iteration {int(state['iteration'])}) as an RLlib "
          f"RLModule to {out}; load it with ray.rllib.core.rl_module.RLModule.from_checkpoint('{out}')")
    return 0


def cmd_ppo(args: argparse.Namespace) -> int:
    from metarl.rllib_module import (PPOLearner, export, finetune_ppo, load_theta, ray_init, ray_version,
                                     require_empty)

    bad = [f"--{k} = {v}" for k, v in (("steps", args.steps), ("epochs", args.epochs), ("minibatches", args.minibatches))
           if v is not None and v < 1] + ([f"--lr = {args.lr}"] if args.lr is not None and args.lr <= 0 else [])
    if bad or (args.env_runners or 0) < 0:
        raise config_mod.ConfigError(f"{', '.join(bad) or f'--env-runners = {args.env_runners}'} out of range: "
                                     "steps, epochs and minibatches are at least 1, lr positive, env runners >= 0")
    out = Path(args.out)
    require_empty(out)
    path, state, cfg, theta = load_theta(Path(args.checkpoint))
    game = args.game
    cfg = config_mod.validate(config_mod.override(cfg, "tasks.heldout", game))  # validates the game name
    if args.init == "fresh":
        theta = initial_theta(make_family(cfg), cfg.meta.seed)
    given = {"lr": args.lr, "epochs": args.epochs, "minibatches": args.minibatches, "env_runners": args.env_runners}
    learner = PPOLearner(**{k: v for k, v in given.items() if v is not None})
    out.mkdir(parents=True, exist_ok=True)
    info = {"checkpoint": str(path), "iteration": int(state["iteration"]), "init": args.init, "ray": ray_version()}
    export(cfg.tasks.family, theta, out / "start_module", info)
    ray_init(args.address or cfg.ray.address)
    print(f"metarl ppo: {game} from {args.init} theta of {path}, {learner.label}, {args.steps:,} env steps -> {out}")
    trace = finetune_ppo(cfg, game, out / "start_module", learner, args.steps, args.seed, save_to=out / "rllib",
                         progress=lambda line: print(f"ppo {game}: {line}", flush=True))
    returns = [r for _, r in trace["episodes"]]
    summary = {**info, "game": game, "learner": asdict(learner), "env_steps": trace["env_steps"][-1],
               "seconds": trace["seconds"], "env_steps_per_s": trace["env_steps"][-1] / trace["seconds"],
               "episodes": len(returns), "trace": trace}
    (out / "ppo.json").write_text(json.dumps(summary, indent=2) + "\n")
    last = f"{np.mean(returns[-10:]):.2f}" if returns else "n/a (no episode ended)"
    print(f"done: {summary['env_steps']:,} env steps in {trace['seconds']:.1f}s "
          f"({summary['env_steps_per_s']:.0f} env steps/s), raw return of the last 10 episodes {last}; "
          f"RLlib checkpoint {out / 'rllib'}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint's theta as an RLlib RLModule checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (latest checkpoint)")
    p.add_argument("--rllib", required=True, metavar="DIR", help="new (or empty) directory for the RLModule checkpoint")
    p.set_defaults(func=cmd_export)

    q = subparsers.add_parser("ppo", help="RLlib PPO on one game, starting from a checkpoint's theta")
    q.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (latest checkpoint)")
    q.add_argument("--game", required=True, help="the game to train on (a held-out one)")
    q.add_argument("--steps", type=int, required=True, help="env steps to train for (whole iterations of T x B)")
    q.add_argument("--out", required=True, help="new directory: start_module/, rllib/ (RLlib checkpoint), ppo.json")
    q.add_argument("--init", choices=("meta", "fresh"), default="meta",
                   help="start from the checkpoint's theta (meta) or the run's initial network (fresh)")
    q.add_argument("--lr", type=float, help="PPO's Adam step size (default 2.5e-4)")
    q.add_argument("--epochs", type=int, help="passes over each rollout (default 4)")
    q.add_argument("--minibatches", type=int, help="minibatches per pass (default 4)")
    q.add_argument("--env-runners", type=int, help="RLlib env-runner actors (default 1; 0: in process)")
    q.add_argument("--seed", type=int, default=0, help="RLlib's and the emulators' seed")
    q.add_argument("--address", help="Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    q.set_defaults(func=cmd_ppo)
