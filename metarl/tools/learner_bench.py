"""`metarl bench --suite learner`: the learner's work timed on each device, CPU beside GPU.

Four pieces of work, each on synthetic Atari-shaped data (the Nature CNN, 18 actions, 4 x 84 x 84
uint8 observations), so no emulator, Ray or network is needed and the same command runs on any
machine with torch (also as `python -m metarl.tools.learner_bench`):

- outer step: the learner averaging N evaluation gradients (flat numpy arrays, as workers ship
  them), clipping and taking Adam's step on theta (`Learner.step`);
- learner-side gradients: meta.grad_on = learner, N first-order gradients on shipped 16 x 128
  rollouts (`Learner.step_on_batches`);
- fine-tuning update: one PPO update of `metarl eval`'s fine-tuner (4 epochs x 4 minibatches of
  a 16 x 64 rollout), float32 and bf16 autocast;
- acting: the policy's forward pass on the 8 emulators of half a task, float32 and bf16.

Each is timed after warm-up calls, repeated for at least `min_s` seconds (CUDA synchronised), and
reported in milliseconds with the CPU / GPU ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from metarl.core import config as config_mod
from metarl.experiments.finetune import FineTuneLearner, make_optimizer, ppo_updates
from metarl.distributed.learner import Learner
from metarl.core.policy import NUM_ATARI_ACTIONS, ParamSpec
from metarl.tasks import make_family
from metarl.tasks.base import Batch, batch_to_wire


def synthetic_batch(T: int, B: int, seed: int, device: str = "cpu") -> Batch:
    """A T x B Atari-shaped rollout of random observations and actions (shapes and dtypes as AtariTask's)."""
    g = torch.Generator().manual_seed(seed)
    data = {"obs": torch.randint(0, 256, (T + 1, B, 4, 84, 84), dtype=torch.uint8, generator=g),
            "actions": torch.randint(0, NUM_ATARI_ACTIONS, (T, B), generator=g),
            "rewards": torch.randint(-1, 2, (T, B), generator=g).float(),
            "dones": (torch.rand(T, B, generator=g) < 0.002).float(),
            "values": torch.randn(T + 1, B, generator=g) * 0.1,
            "logp": torch.full((T, B), -float(np.log(NUM_ATARI_ACTIONS)))}
    return Batch({k: v.to(device) for k, v in data.items()}, env_steps=T * B, frames=4 * T * B)


def timed(fn: Callable[[], Any], device: str, min_s: float, warmup: int = 2, max_reps: int = 1000) -> float:
    """Mean seconds per call of fn after `warmup` calls, over at least min_s seconds."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < max_reps and (reps == 0 or time.perf_counter() - t0 < min_s):
        fn()
        reps += 1
        sync()
    return (time.perf_counter() - t0) / reps


def bench_device(device: str, evaluations: int, min_s: float, seed: int = 0) -> dict[str, float]:
    """Milliseconds of each piece of work on `device`."""
    cfg = config_mod.load(None)  # the default Atari family: Nature CNN, 16 x 128 rollouts (no game names needed)
    family = make_family(cfg)
    learner = Learner(family, seed, outer_lr=1e-4, max_grad_norm=1.0, device=device,
                      torch_threads=torch.get_num_threads())
    theta = learner.get_theta()
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(theta.size, dtype=np.float32) * 1e-3 for _ in range(evaluations)]
    out = {"outer_step_ms": 1e3 * timed(lambda: learner.step(evaluations, *grads), device, min_s)}

    wire = batch_to_wire(synthetic_batch(cfg.env.rollout_len, cfg.env.num_envs, seed))
    pairs = [x for _ in range(evaluations) for x in (theta, wire)]
    out["learner_grads_ms"] = 1e3 * timed(lambda: learner.step_on_batches(evaluations, *pairs), device, min_s,
                                          warmup=1)

    model = family.make_model().to(device)
    spec = ParamSpec.of(model)
    scorer = family.make_scorer()
    rollout = synthetic_batch(64, cfg.env.num_envs, seed + 1, device)
    obs8 = rollout.data["obs"][0, :8]
    for precision in ("fp32", "bf16"):
        ft = FineTuneLearner("adam", 2.5e-4, 0.5, epochs=4, minibatches=4, clip=0.1)
        params = spec.unflatten(theta, device=device, requires_grad=True)
        opt = make_optimizer(params, ft)
        gen = torch.Generator().manual_seed(seed)
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16",
                                  cache_enabled=False)

        def update() -> None:
            with autocast:
                ppo_updates(scorer, model, params, rollout, ft, opt, ft.lr, gen)

        def act() -> None:
            with torch.no_grad(), autocast:
                model(obs8)

        out[f"ppo_update_{precision}_ms"] = 1e3 * timed(update, device, min_s)
        out[f"act_b8_{precision}_ms"] = 1e3 * timed(act, device, min_s, warmup=5)
    return out


LABELS = {
    "outer_step_ms": "outer step: average {n} gradients, clip, Adam on theta",
    "learner_grads_ms": "learner-side gradients: {n} rollouts of 16 x 128, then the step",
    "ppo_update_fp32_ms": "fine-tuning PPO update (4 x 4 minibatches of 256), fp32",
    "ppo_update_bf16_ms": "fine-tuning PPO update (4 x 4 minibatches of 256), bf16",
    "act_b8_fp32_ms": "acting forward, 8 observations, fp32",
    "act_b8_bf16_ms": "acting forward, 8 observations, bf16",
}


def run(devices: list[str], evaluations: int, min_s: float, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                              "cpu_threads": threads, "evaluations": evaluations, "devices": {}}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    for device in devices:
        result["devices"][device] = bench_device(device, evaluations, min_s)
    return result


def table(result: dict[str, Any]) -> str:
    devices = list(result["devices"])
    head = "| work | " + " | ".join(f"{d} ms" for d in devices) + (" | cpu / " + devices[1] if len(devices) > 1 else "") + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for key, label in LABELS.items():
        row = [result["devices"][d][key] for d in devices]
        ratio = f" | {row[0] / row[1]:.1f}x" if len(row) > 1 else ""
        lines.append(f"| {label.format(n=result['evaluations'])} | " + " | ".join(f"{x:.2f}" for x in row) + ratio + " |")
    return "\n".join(lines)


def add_args(p: Any, json_flag: bool = True) -> None:
    p.add_argument("--devices", default="", help="comma-separated torch devices (default: cpu, and cuda when there is one)")
    p.add_argument("--evaluations", type=int, default=12, help="evaluation gradients per outer step (N; default 12)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each piece of work at least this long")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: a worker's share)")
    if json_flag:
        p.add_argument("--out", help="also write the figures to this JSON file")


def main_args(args: argparse.Namespace, out: Path | None = None) -> dict[str, float]:
    """Time every piece of work, print the table, write the figures to `out` (a JSON file) or to
    --out where this module runs alone; the figures by device, flat."""
    devices = [d for d in args.devices.split(",") if d] or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.evaluations < 1:
        raise config_mod.ConfigError(f"--evaluations must be >= 1, got {args.evaluations}")
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise config_mod.ConfigError(f"--devices names {d}, but torch sees no CUDA device here; use cpu")
    result = run(devices, args.evaluations, args.min_seconds, args.threads)
    print(f"torch {result['torch']}, CPU {result['cpu']} ({args.threads} thread(s))"
          + (f", GPU {result['gpu']}" if "gpu" in result else ""))
    print(table(result))
    out = out or getattr(args, "out", None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return {f"{device}/{k}": v for device, figures in result["devices"].items() for k, v in figures.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m metarl.tools.learner_bench", description=__doc__.splitlines()[0])
    add_args(parser)
    main_args(parser.parse_args())
