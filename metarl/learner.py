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

from metarl.config import LR_DECAYS
from metarl.policy import ParamSpec, init_params
from metarl import meta
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


class Learner:
    def __init__(self, family: TaskFamily, seed: int, outer_lr: float, max_grad_norm: float,
                 device: str = "auto", torch_threads: int = 1, lr_decay: str = "constant",
                 total_iterations: int = 0):
        torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        torch.manual_seed(seed)
        model = family.make_model()
        self.spec = ParamSpec.of(model)
        flat = torch.from_numpy(self.spec.flatten(init_params(model)))
        self.theta = torch.nn.Parameter(flat.to(self.device))
        self.opt = torch.optim.Adam([self.theta], lr=outer_lr)
        self.max_grad_norm = max_grad_norm
        self.outer_lr, self.lr_decay, self.total_iterations = outer_lr, lr_decay, total_iterations
        self.family, self.model, self.scorer = family, None, None  # built on the first shipped batch
        lr_factor(lr_decay, 0, total_iterations)  # an unknown decay fails here, not mid-run
        self.iteration = 0

    def current_lr(self) -> float:
        """beta at this iteration (the schedule follows the restored iteration after a resume)."""
        return self.outer_lr * lr_factor(self.lr_decay, self.iteration, self.total_iterations)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "num_params": self.spec.numel, "iteration": self.iteration,
                "cuda": torch.cuda.is_available(), "pid": os.getpid(), "host": socket.gethostname()}

    def get_theta(self) -> np.ndarray:
        return self.theta.detach().to("cpu").numpy().copy()

    def step(self, n_evaluations: int, *grads: np.ndarray) -> dict[str, Any]:
        """theta <- Adam(theta, clip(sum(grads) / n_evaluations)); skipped if not finite."""
        t0 = time.perf_counter()
        g = torch.zeros_like(self.theta)
        for x in grads:
            g += torch.from_numpy(np.array(x, dtype=np.float32, copy=True)).to(self.device)
        return {**self._apply(g, n_evaluations), "seconds": time.perf_counter() - t0,
                "ingest_messages": len(grads), "ingest_bytes": int(sum(np.asarray(x).nbytes for x in grads))}

    def _apply(self, g: torch.Tensor, n_evaluations: int) -> dict[str, Any]:
        """Average the summed gradient g, skip if not finite, clip, take the Adam step."""
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
        self.iteration += 1
        return {"grad_norm": norm, "update_skipped": skipped, "update_norm": update_norm, "outer_lr": lr,
                "theta_norm": float(self.theta.detach().norm())}

    def assign(self, theta: np.ndarray, grad_norm: float, accepted: bool, trust: dict[str, float]) -> dict[str, Any]:
        """meta.outer = trpo: the driver searched the KL-constrained step with the workers' curvature
        products (metarl.trust); theta becomes its result. `trust` holds the step's statistics."""
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
        self.iteration += 1  # the schedule moves on: a skipped update does not stretch the run
        return {"grad_norm": float("nan"), "update_skipped": True, "update_norm": 0.0, "outer_lr": 0.0,
                "theta_norm": float(self.theta.detach().norm()), "seconds": 0.0}

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint needs, as CPU tensors and plain values."""
        opt = self.opt.state_dict()
        for s in opt["state"].values():
            for k, v in s.items():
                if torch.is_tensor(v):
                    s[k] = v.detach().to("cpu")
        return {"theta": self.theta.detach().to("cpu").clone(), "optimizer": opt, "iteration": self.iteration}

    def load_state(self, state: dict[str, Any]) -> None:
        theta = state["theta"]
        if tuple(theta.shape) != (self.spec.numel,):
            raise ValueError(f"checkpoint theta has {tuple(theta.shape)} values, this network has {self.spec.numel}")
        with torch.no_grad():
            self.theta.copy_(theta.to(self.device))
        self.opt.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
