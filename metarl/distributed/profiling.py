"""`metarl fewshot cost`: seconds and peak tensor memory of one meta-iteration of each algorithm."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from metarl.core import config as config_mod, meta
from metarl.core.config import Config
from metarl.distributed.fleet import start_fleet
from metarl.distributed.iteration import meta_iteration


def peak_tensor_bytes(fn) -> int:
    """Peak tensor memory the CPU allocator holds during fn() above its level at the start (torch
    profiler allocation events, replayed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def cost(cfg: Config, iterations: int, log=print) -> list[dict[str, Any]]:
    """Seconds (median over `iterations`) and peak tensor memory of one meta-iteration of each
    algorithm, same family, tasks, skip and batch, all actors in this process (--local)."""
    rows = []
    for algo in ("maml", "fomaml", "reptile"):
        base = config_mod.override(cfg, "meta.outer", "adam") if algo == "reptile" else cfg  # no surrogate to constrain
        c = config_mod.override(base, "meta.algo", algo)
        fleet = start_fleet(c, local=True)
        rng = np.random.default_rng(c.meta.seed)
        step = lambda: meta_iteration(fleet, c.tasks.train, meta.make_groups(c.num_tasks, c.meta.skip, rng),  # noqa: E731
                               algo, c.ray.call_timeout_s, int(rng.integers(1 << 30)))
        step()  # warm-up
        secs = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            step()
            secs.append(time.perf_counter() - t0)
        peak = peak_tensor_bytes(step)
        rows.append({"algo": algo, "outer": c.meta.outer, "seconds": float(np.median(secs)), "peak_mb": peak / 2**20})
        log(f"{algo:>7} ({c.meta.outer}): {rows[-1]['seconds']:.3f} s/iteration (median of {iterations}), "
            f"peak tensor memory {rows[-1]['peak_mb']:.2f} MiB")
    maml_s = rows[0]["seconds"]
    for r in rows:
        r["vs_maml"] = r["seconds"] / maml_s
    return rows
