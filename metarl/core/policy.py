"""Networks, called functionally with a name -> tensor parameter dict, and the flat wire format.

theta and theta' are `Params` (ordered dict name -> tensor). The network module is built once per
process and never mutated: `forward(model, params, x)` runs it with whatever parameters are given
(torch.func.functional_call), so adapted parameters never touch the module's own tensors.
On the wire (Ray object store, checkpoints) parameters are one flat float32 numpy array laid out
by a `ParamSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]

NUM_ATARI_ACTIONS = 18  # the full ALE action set, shared by every game


def init_actor_critic(trunk: nn.Sequential, pi: nn.Linear, v: nn.Linear) -> None:
    """The usual actor-critic initialisation (CleanRL, SB3): orthogonal gain sqrt(2) in the trunk,
    0.01 on the policy head (a near-uniform first policy), 1 on the value head; zero biases."""
    for m in trunk:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, np.sqrt(2))
            nn.init.zeros_(m.bias)
    nn.init.orthogonal_(pi.weight, 0.01)
    nn.init.zeros_(pi.bias)
    nn.init.orthogonal_(v.weight, 1.0)
    nn.init.zeros_(v.bias)


class NatureCNN(nn.Module):
    """Mnih et al. (2015) trunk with an actor-critic head: 4x84x84 uint8 -> (18 logits, value)."""

    def __init__(self, num_actions: int = NUM_ATARI_ACTIONS, in_frames: int = 4):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_frames, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
        )
        self.pi = nn.Linear(512, num_actions)
        self.v = nn.Linear(512, 1)
        init_actor_critic(self.trunk, self.pi, self.v)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and obs.dim() == 4:
            # channels-last makes oneDNN's convolution backward (the first layer's weight gradient
            # above all) ~1.5x faster; without a backward pass the transposition does not pay off
            obs = obs.contiguous(memory_format=torch.channels_last)
        # uint8 / 255.0 converts and scales in one pass, to the same values as .float() / 255.0
        h = self.trunk(obs.float() / 255.0 if obs.is_floating_point() else obs / 255.0)
        return self.pi(h), self.v(h).squeeze(-1)


NUM_MINATAR_ACTIONS = 6  # MinAtar's full action set, the same for all five games
MINATAR_CHANNELS = 10  # Seaquest has the most object channels; the other games are zero-padded to it


class MinAtarNet(nn.Module):
    """MinAtar's reference network (Young & Tian 2019: one 3x3 convolution with 16 filters, a
    128-unit layer) with an actor-critic head: 10x10x10 uint8 {0, 1} channels-first -> (6 logits, value)."""

    def __init__(self, num_actions: int = NUM_MINATAR_ACTIONS, in_channels: int = MINATAR_CHANNELS):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 8 * 8, 128), nn.ReLU(),
        )
        self.pi = nn.Linear(128, num_actions)
        self.v = nn.Linear(128, 1)
        init_actor_critic(self.trunk, self.pi, self.v)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs.float())
        return self.pi(h), self.v(h).squeeze(-1)


class MLP(nn.Module):
    """ReLU multilayer perceptron (sinusoid regressor, navigation policy trunk)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W^T + b for one parameter set (W: out x in) or for a stack of them, one per task
    (W: n x out x in, b: n x out, x: n x rows x in): the stacked form is one batched matmul."""
    if weight.dim() == 2:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def mlp_forward(params: Params, x: torch.Tensor, prefix: str = "net") -> torch.Tensor:
    """The `MLP` above as a pure function of its parameters (ReLU between the Linear layers
    `<prefix>.0`, `<prefix>.2`, ...), for one parameter set or a per-task stack (see `linear`)."""
    idx = sorted(int(k.split(".")[1]) for k in params if k.startswith(prefix + ".") and k.endswith(".weight"))
    h = x
    for n, i in enumerate(idx):
        h = linear(h, params[f"{prefix}.{i}.weight"], params[f"{prefix}.{i}.bias"])
        if n < len(idx) - 1:
            h = torch.relu(h)
    return h


def params_device(params: Params) -> torch.device:
    """Where a parameter set lives (a task's rollout acts there and leaves its batch there)."""
    return next(iter(params.values())).device


def forward(model: nn.Module, params: Params, *args: torch.Tensor):
    """Run `model` with `params` instead of its own tensors (differentiable w.r.t. params)."""
    return functional_call(model, params, args)


def init_params(model: nn.Module) -> Params:
    """A detached copy of the module's freshly initialised parameters."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the parameters inside one flat float32 vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(params_or_model: Params | nn.Module) -> "ParamSpec":
        items = (
            list(params_or_model.named_parameters())
            if isinstance(params_or_model, nn.Module)
            else list(params_or_model.items())
        )
        return ParamSpec(tuple(k for k, _ in items), tuple(tuple(v.shape) for _, v in items))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) if s else 1 for s in self.shapes]

    @property
    def numel(self) -> int:
        return int(sum(self.sizes))

    def flatten(self, params: Params) -> np.ndarray:
        """Params -> one contiguous float32 numpy vector (detached, on CPU)."""
        out = np.empty(self.numel, dtype=np.float32)
        i = 0
        for name, n in zip(self.names, self.sizes):
            out[i : i + n] = params[name].detach().reshape(-1).to("cpu", torch.float32).numpy()
            i += n
        return out

    def unflatten(self, flat: np.ndarray | torch.Tensor, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> Params:
        """Flat vector -> Params (fresh leaf tensors; the source array is never written)."""
        if isinstance(flat, np.ndarray):
            if flat.shape != (self.numel,):
                raise ValueError(f"flat parameter vector has shape {flat.shape}, expected ({self.numel},)")
            t = torch.from_numpy(np.array(flat, dtype=np.float32, copy=True))
        else:
            t = flat.detach().clone()
        t = t.to(device=device, dtype=dtype)
        out: Params = {}
        i = 0
        for name, shape, n in zip(self.names, self.shapes, self.sizes):
            p = t[i : i + n].view(shape).clone()
            p.requires_grad_(requires_grad)
            out[name] = p
            i += n
        return out

    def flatten_grads(self, grads: Sequence[torch.Tensor | None]) -> np.ndarray:
        """Gradients in `names` order -> flat float32 numpy (None counts as zero)."""
        out = np.zeros(self.numel, dtype=np.float32)
        i = 0
        for g, n in zip(grads, self.sizes):
            if g is not None:
                out[i : i + n] = g.detach().reshape(-1).to("cpu", torch.float32).numpy()
            i += n
        return out
