"""Learner: holds theta, the Adam state and the iteration counter; applies meta-gradients.

theta lives as one flat tensor on the learner's device (a GPU when the actor was given one; the
same code on CPU). Adam and global-norm clipping on the flat vector are exactly the per-tensor
versions. Gradients arrive as flat float32 numpy arrays; theta leaves as one.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

import numpy as np
import torch

from metarl.core.config import LR_DECAYS
from metarl.core.policy import Params, ParamSpec, init_params
from metarl.core import meta, outer
from metarl.core.ppo import mean_stats
from metarl.tasks.base import TaskFamily, batch_from_wire


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def lr_factor(decay: str, iteration: int, total: int) -> float:
    """The outer step size's multiplier at `iteration` of `total`: 1 throughout (constant), or
    falling from 1 to 0 at the last iteration along a line or a half cosine."""
    if decay == "constant" or total <= 0:
        return 1.0
    frac = min(max(iteration / total, 0.0), 1.0)
    if decay == "linear":
        return 1.0 - frac
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown outer-lr decay {decay!r}; allowed: {', '.join(LR_DECAYS)}")


def initial_params(family: TaskFamily, seed: int) -> tuple[torch.nn.Module, Params]:
    """theta before meta-iteration 1: the family's network built right after torch.manual_seed(seed),
    and its parameters (detached copies). The Learner starts from it, and so does every fresh
    network (`metarl eval`'s and the sweep's baseline, fewshot's random init, joint pre-training)."""
    torch.manual_seed(seed)
    model = family.make_model()
    return model, init_params(model)


def initial_theta(family: TaskFamily, seed: int) -> np.ndarray:
    """`initial_params`, flat (the layout theta travels in)."""
    model, params = initial_params(family, seed)
    return ParamSpec.of(model).flatten(params)


class Learner:
    def __init__(self, family: TaskFamily, seed: int, outer_lr: float, max_grad_norm: float,
                 device: str = "auto", torch_threads: int = 1, lr_decay: str = "constant",
                 total_iterations: int = 0):
        torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        model, params = initial_params(family, seed)
        self.spec = ParamSpec.of(model)
        flat = torch.from_numpy(self.spec.flatten(params))
        self.theta = torch.nn.Parameter(flat.to(self.device))
        self.opt = torch.optim.Adam([self.theta], lr=outer_lr)
        self.max_grad_norm = max_grad_norm
        self.outer_lr, self.lr_decay, self.total_iterations = outer_lr, lr_decay, total_iterations
        self.family, self.model, self.scorer = family, None, None  # built on the first shipped batch
        lr_factor(lr_decay, 0, total_iterations)  # an unknown decay fails here, not mid-run
        self.iteration = 0
        self._theta_start = self.theta.detach().clone()  # where this iteration's outer steps started
        self._snapshot: dict[str, Any] | None = None  # the state before the iteration now under way

    def current_lr(self) -> float:
        """beta at this iteration (the schedule follows the restored iteration after a resume)."""
        return self.outer_lr * lr_factor(self.lr_decay, self.iteration, self.total_iterations)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "num_params": self.spec.numel, "iteration": self.iteration,
                "cuda": torch.cuda.is_available(), "pid": os.getpid(), "host": socket.gethostname()}

    def get_theta(self) -> np.ndarray:
        return self.theta.detach().to("cpu").numpy().copy()

    def _begin(self) -> None:
        """Called first by every call that changes theta: on the iteration's first change, keep
        the state it starts from, so that a stopped run can checkpoint the last finished
        iteration even when this one was abandoned part-way (metarl.distributed.stopping)."""
        if self._snapshot is None or self._snapshot["iteration"] != self.iteration:
            self._snapshot = None
            self._snapshot = self._copy_state()

    def step(self, n_evaluations: int, *grads: np.ndarray) -> dict[str, Any]:
        """theta <- Adam(theta, clip(sum(grads) / n_evaluations)); skipped if not finite."""
        self._begin()
        t0 = time.perf_counter()
        return {**self._apply(self._summed(grads), n_evaluations), "seconds": time.perf_counter() - t0,
                "ingest_messages": len(grads), "ingest_bytes": int(sum(np.asarray(x).nbytes for x in grads))}

    def _summed(self, grads: tuple[np.ndarray, ...]) -> torch.Tensor:
        """The flat gradients that arrived (numpy, float32 on the wire), summed on theta's device."""
        g = torch.zeros_like(self.theta)
        for x in grads:
            g += torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).to(self.device)
        return g

    def _apply(self, g: torch.Tensor, n_evaluations: int) -> dict[str, Any]:
        """Average the summed gradient g, skip if not finite, clip, take the Adam step; the
        iteration is done."""
        out = self._adam(g, n_evaluations)
        self.iteration += 1
        return out

    def round_step(self, n_evaluations: int, r: int, total: int, *grads: np.ndarray) -> dict[str, Any]:
        """Outer step r of `total` in PPO's outer loop, its gradients computed by the workers:
        `step`'s guard, clip and Adam step; the iteration counts as done after the last one, whose
        update_norm is theta's whole displacement over the iteration's steps."""
        self._begin()
        t0 = time.perf_counter()
        if r == 0:
            self._theta_start = self.theta.detach().clone()
        out = self._adam(self._summed(grads), n_evaluations)
        if r == total - 1:
            self.iteration += 1
            out["update_norm"] = float((self.theta.detach() - self._theta_start).norm())
        return {**out, "seconds": time.perf_counter() - t0, "ingest_messages": len(grads),
                "ingest_bytes": int(sum(np.asarray(x).nbytes for x in grads))}

    def finish_iteration(self) -> dict[str, Any]:
        """Count the iteration as done (its outer steps stopped before the last one)."""
        self._begin()
        self.iteration += 1
        return {"update_norm": float((self.theta.detach() - self._theta_start).norm())}

    def step_rounds(self, plan: outer.Plan, iteration: int, member_groups: list[int], n_groups: int,
                    *items: Any) -> dict[str, Any]:
        """meta.grad_on = learner with PPO's outer loop (metarl.core.outer): every outer step of the
        iteration here, no round trip. `items`: each group's theta'_0 (flat), then with the exact
        rule each leader's adaptation batches (a list, shipped), then each member's rollout
        (shipped); member_groups[m] is member m's group. The steps stop at the first non-finite
        member gradient (the steps before it stay); its position is reported."""
        self._begin()
        if self.scorer is None:
            self.model, self.scorer = self.family.make_model().to(self.device), self.family.make_scorer()
        t0 = time.perf_counter()
        dev = self.device
        tp0 = [self.spec.unflatten(items[g], device=dev) for g in range(n_groups)]
        exact = plan.follow == "exact"
        adapt = [[batch_from_wire(w, dev) for w in items[n_groups + g]] for g in range(n_groups)] if exact else []
        first = n_groups * (2 if exact else 1)
        theta0 = self.spec.unflatten(self.theta.detach(), device=dev)
        members = [outer.Member.of(self.scorer, batch_from_wire(items[first + k], dev), tp0[gi], theta0)
                   for k, gi in enumerate(member_groups)]
        indices = plan.indices(members[0].samples, iteration, dev)
        rounds, nonfinite, first_round = [], [], None
        for r, idx in enumerate(indices):
            theta = theta0 if r == 0 else self.spec.unflatten(self.theta.detach(), device=dev)
            if r == 0:
                tps = tp0
            elif exact:
                tps = [outer.readapt(self.scorer, self.model, theta, adapt[g], plan.inner_lr) for g in range(n_groups)]
            else:
                tps = [outer.shifted(tp0[g], theta0, theta) for g in range(n_groups)]
            g_sum = torch.zeros_like(self.theta)
            per_member = []
            for k, m in enumerate(members):
                grads, loss, parts = outer.member_grad(self.model, m, tps[member_groups[k]], idx, plan.clip)
                g = torch.cat([x.reshape(-1) for x in grads])
                norm = float(g.norm())
                per_member.append((float(loss), norm, {k2: float(v) for k2, v in parts.items()}))
                if math.isfinite(norm) and math.isfinite(float(loss)):
                    g_sum += g
                else:
                    nonfinite.append(k)
            if r == 0:
                first_round = per_member
            if nonfinite:
                break
            rounds.append({**self._adam(g_sum, len(members)), "parts": [p for _, _, p in per_member]})
        self.iteration += 1
        out = summarize_rounds(rounds, theta0, self.theta.detach(), self.spec)
        return {**out, "losses": [x[0] for x in first_round], "grad_norms": [x[1] for x in first_round],
                "nonfinite": sorted(set(nonfinite)), "grad_s": time.perf_counter() - t0,
                "seconds": time.perf_counter() - t0}

    def _adam(self, g: torch.Tensor, n_evaluations: int) -> dict[str, Any]:
        """Average the summed gradient g, skip if not finite, clip, take one Adam step."""
        g = g / max(n_evaluations, 1)
        norm = float(g.norm())
        skipped = not math.isfinite(norm)
        update_norm, lr = 0.0, self.current_lr()
        if not skipped:
            scale = min(1.0, self.max_grad_norm / (norm + 1e-6))
            before = self.theta.detach().clone()
            self.theta.grad = g * scale
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            update_norm = float((self.theta.detach() - before).norm())
        return {"grad_norm": norm, "update_skipped": skipped, "update_norm": update_norm, "outer_lr": lr,
                "theta_norm": float(self.theta.detach().norm())}

    def assign(self, theta: np.ndarray, grad_norm: float, accepted: bool, trust: dict[str, float]) -> dict[str, Any]:
        """meta.outer = trpo: the driver searched the KL-constrained step with the workers' curvature
        products (metarl.core.trust); theta becomes its result. `trust` holds the step's statistics."""
        self._begin()
        t0 = time.perf_counter()
        new = torch.from_numpy(np.array(theta, dtype=np.float32, copy=True)).to(self.device)
        update_norm = float((new - self.theta.detach()).norm())
        with torch.no_grad():
            self.theta.copy_(new)
        self.iteration += 1
        return {"grad_norm": grad_norm, "update_skipped": not accepted, "update_norm": update_norm,
                "outer_lr": float("nan"), "theta_norm": float(self.theta.detach().norm()),
                **{f"trust/{k}": v for k, v in trust.items()}, "seconds": time.perf_counter() - t0}

    def step_on_batches(self, n_evaluations: int, *pairs: Any) -> dict[str, Any]:
        """meta.grad_on = learner. `pairs` alternates theta' (flat, as the leader sent it) and the
        batch a member collected with it; the learner computes each first-order gradient on its
        own device, then guards, clips and steps as `step` does. A non-finite gradient skips the
        update; its position is reported so the run can name the task."""
        self._begin()
        if self.scorer is None:
            self.model, self.scorer = self.family.make_model().to(self.device), self.family.make_scorer()
        t0 = time.perf_counter()
        g_sum = torch.zeros_like(self.theta)
        losses, norms, nonfinite = [], [], []
        for i in range(0, len(pairs), 2):
            params = self.spec.unflatten(pairs[i], device=self.device)
            grads, loss, _ = meta.loss_grad(self.scorer, self.model, params, batch_from_wire(pairs[i + 1], self.device))
            g = torch.cat([x.reshape(-1) for x in grads])
            norm = float(g.norm())
            losses.append(loss)
            norms.append(norm)
            if math.isfinite(norm):
                g_sum += g
            else:
                nonfinite.append(i // 2)
        grad_s = time.perf_counter() - t0
        out = self.skip_step() if nonfinite else self._apply(g_sum, n_evaluations)
        return {**out, "losses": losses, "grad_norms": norms, "nonfinite": nonfinite, "grad_s": grad_s,
                "seconds": time.perf_counter() - t0}

    def skip_step(self) -> dict[str, Any]:
        """Count an iteration whose gradient set was incomplete or non-finite, without updating."""
        self._begin()
        self.iteration += 1  # the schedule moves on: a skipped update does not stretch the run
        return {"grad_norm": float("nan"), "update_skipped": True, "update_norm": 0.0, "outer_lr": 0.0,
                "theta_norm": float(self.theta.detach().norm()), "seconds": 0.0}

    def _copy_state(self) -> dict[str, Any]:
        """theta, Adam's state and the iteration count, as CPU copies (never the live tensors)."""
        opt = self.opt.state_dict()  # its per-parameter dicts are the optimizer's live ones: copy, never assign
        opt = {**opt, "state": {p: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in s.items()}
                                for p, s in opt["state"].items()}}
        return {"theta": self.theta.detach().to("cpu", copy=True), "optimizer": opt, "iteration": self.iteration}

    def state(self, iteration: int | None = None) -> dict[str, Any]:
        """Everything a checkpoint needs, as CPU tensors and plain values. With `iteration`, the
        state after exactly that many iterations: the current one, or the one the iteration under
        way started from (a stop abandoned it part-way); anything else is an error."""
        if self._snapshot is not None and self._snapshot["iteration"] == iteration:
            return self._snapshot  # theta has changed since iteration `iteration` ended
        if iteration is None or iteration == self.iteration:
            return self._copy_state()
        raise RuntimeError(f"the learner is at iteration {self.iteration}; the state after iteration "
                           f"{iteration} is no longer kept")

    def load_state(self, state: dict[str, Any]) -> None:
        theta = state["theta"]
        if tuple(theta.shape) != (self.spec.numel,):
            raise ValueError(f"checkpoint theta has {tuple(theta.shape)} values, this network has {self.spec.numel}")
        with torch.no_grad():
            self.theta.copy_(theta.to(self.device))
        self.opt.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self._snapshot = None


def summarize_rounds(rounds: list[dict[str, Any]], theta0: dict, theta: torch.Tensor, spec: ParamSpec) -> dict[str, Any]:
    """One metrics record for an iteration's outer steps: the first step's gradient norm (the
    one-step loop's figure), theta's whole displacement, and the PPO statistics averaged over steps
    and members (outer/approx_kl: how far the steps moved the post-update policies from the ones
    that sampled)."""
    moved = float((theta - torch.cat([v.reshape(-1) for v in theta0.values()])).norm())
    out: dict[str, Any] = {
        "grad_norm": rounds[0]["grad_norm"] if rounds else float("nan"),
        "update_skipped": not rounds or all(r["update_skipped"] for r in rounds),
        "update_norm": moved, "outer_lr": rounds[0]["outer_lr"] if rounds else 0.0,
        "theta_norm": float(theta.norm()), "outer/steps": sum(not r["update_skipped"] for r in rounds),
        "outer/grad_norm_last": rounds[-1]["grad_norm"] if rounds else float("nan"),
    }
    return {**out, **mean_stats([p for r in rounds for p in r.get("parts", [])])}
