"""The KL-constrained outer step (meta.outer = trpo): conjugate gradient and a backtracking line
search on flat float64 vectors, independent of where the products are computed.

With g the averaged meta-gradient of the members' surrogate loss and F the Hessian of their mean
KL (both in theta), the step is -sqrt(2 delta / s^T F s) s with s ~= F^-1 g from `cg_iters`
conjugate-gradient iterations (Schulman et al. 2015, TRPO, Appendix C), shrunk by `backtrack` until
the surrogate improves and the KL is within delta. Constants follow the TRPO/rllab defaults the MAML
paper's reference code used: 10 CG iterations, damping 1e-5, backtracking 0.8 up to 15 times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

Vector = np.ndarray
DAMPING, BACKTRACK, MAX_BACKTRACKS = 1e-5, 0.8, 15


def conjugate_gradient(fvp: Callable[[Vector], Vector], g: Vector, iters: int,
                       tol: float = 1e-10) -> tuple[Vector, float]:
    """x ~= F^-1 g for a symmetric positive-definite F given only as products; returns x and the
    residual norm |g - F x|. Stops once |r|^2 < tol (so |r| < sqrt(tol)) or after `iters`
    iterations; |r| is the recurrence's residual, which equals the true one up to float64 rounding."""
    x = np.zeros_like(g)
    r = g.copy()
    p = g.copy()
    rr = float(r @ r)
    for _ in range(iters):
        if rr < tol:
            break
        fp = fvp(p)
        step = rr / float(p @ fp)
        x += step * p
        r -= step * fp
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, math.sqrt(rr)


@dataclass
class StepResult:
    theta: Vector
    """theta after the step (the old theta when no candidate was accepted)."""
    accepted: bool
    fraction: float
    """Share of the full KL-sized step taken (0: rejected)."""
    surrogate_before: float
    surrogate_after: float
    kl: float
    """Mean KL(pi_old || pi_new) of the post-update policies at the accepted theta (0 when none was
    accepted: theta does not move)."""
    cg_residual: float
    full_step_norm: float


def trust_region_step(theta: Vector, g: Vector, fvp: Callable[[Vector], Vector],
                      objective: Callable[[Vector], tuple[float, float]], max_kl: float, cg_iters: int,
                      damping: float = DAMPING) -> StepResult:
    """One TRPO step minimising the surrogate. `objective(theta)` gives (mean surrogate loss, mean
    KL) at a candidate; `fvp(v)` the mean KL's Hessian times v at the current theta."""
    def damped(v: Vector) -> Vector:
        return fvp(v) + damping * v

    s, residual = conjugate_gradient(damped, g, cg_iters)
    shs = float(s @ damped(s))
    before, _ = objective(theta)
    if not (math.isfinite(shs) and shs > 0.0):
        return StepResult(theta, False, 0.0, before, before, 0.0, residual, 0.0)
    full = math.sqrt(2.0 * max_kl / shs) * s
    for k in range(MAX_BACKTRACKS):
        fraction = BACKTRACK ** k
        candidate = theta - fraction * full
        after, kl = objective(candidate)
        if math.isfinite(after) and after < before and kl <= max_kl:
            return StepResult(candidate, True, fraction, before, after, kl, residual, float(np.linalg.norm(full)))
    return StepResult(theta, False, 0.0, before, before, 0.0, residual, float(np.linalg.norm(full)))
