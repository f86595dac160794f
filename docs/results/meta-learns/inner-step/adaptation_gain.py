"""Adaptation gain per game: raw reward per step with theta' minus with theta (rate_post - rate_pre),
over the second half of a run's iterations; 95% interval by batch means (10 consecutive blocks, df 9),
which allows for the correlation between neighbouring iterations."""
import json, sys, math
import numpy as np
from scipy import stats
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(f"{path}/metrics.jsonl")]
    half = rows[len(rows) // 2:]
    games = sorted(k.split("/", 1)[1] for k in rows[0] if k.startswith("rate_pre/"))
    print(f"{path}: iterations {len(rows)}, second half {len(half)}")
    for g in games + ["all"]:
        if g == "all":
            d = np.array([np.mean([r[f"rate_post/{x}"] - r[f"rate_pre/{x}"] for x in games]) for r in half])
            pre = np.array([np.mean([r[f"rate_pre/{x}"] for x in games]) for r in half])
        else:
            d = np.array([r[f"rate_post/{g}"] - r[f"rate_pre/{g}"] for r in half])
            pre = np.array([r[f"rate_pre/{g}"] for r in half])
        blocks = np.array([b.mean() for b in np.array_split(d, 10)])
        ci = stats.t.ppf(0.975, 9) * blocks.std(ddof=1) / math.sqrt(10)
        print(f"  {g:>15}: pre {pre.mean():.4f}  post-pre {d.mean():+.4f} ± {ci:.4f}  ({100 * d.mean() / max(pre.mean(), 1e-9):+.1f}% of pre)")
