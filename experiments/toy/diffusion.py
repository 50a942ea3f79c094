"""The toy's diffusion model: an ε-predicting MLP, the cosine schedule, its loss, and the ζ-scaled sampler.

ζ scales the score in the x0-prediction only: ζ > 1 pulls samples toward the mode (mode-seeking, like
classifier-free guidance), ζ < 1 spreads them out (diversity-seeking).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Schedule(NamedTuple):
    alpha_bar: torch.Tensor   # (n,) ᾱ_t, with ᾱ_0 = 1
    alpha: torch.Tensor       # (n,) α_t = 1 − β_t = ᾱ_t / ᾱ_{t−1}


def cosine_schedule(n_steps: int, s: float = 0.008) -> Schedule:
    """Nichol & Dhariwal's cosine schedule on the grid t = 0 … n_steps−1, normalised so that ᾱ_0 = 1."""
    t = torch.arange(n_steps, dtype=torch.float32)
    f = torch.cos((t / n_steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    beta = 1.0 - alpha_bar / torch.cat([alpha_bar[:1], alpha_bar[:-1]])
    return Schedule(alpha_bar=alpha_bar, alpha=1.0 - beta)


class EpsMLP(nn.Module):
    """ε̂(x_t, t): an MLP on [x, t/(T−1)] — 3 → 32, four Linear(32, 32)+ReLU blocks, → 2."""

    def __init__(self,
                 dim: int = 2,      # data dimension
                 width: int = 32,   # hidden units
                 blocks: int = 4):  # Linear+ReLU blocks between input and output layer
        super().__init__()
        self.inp = nn.Linear(dim + 1, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (N, 2); t: (N, 1) or (1, 1) time in [0, 1] -> ε̂: (N, 2)."""
        h = self.inp(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))
        for block in self.blocks:
            h = F.relu(block(h))
        return self.out(h)


def eps_loss(model: EpsMLP, x0: torch.Tensor, schedule: Schedule, generator: torch.Generator) -> torch.Tensor:
    """DDPM's simple loss: t uniform on {0 … T−1} (t = 0 included), x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, MSE on ε."""
    T = schedule.alpha_bar.shape[0]
    t = torch.randint(0, T, (x0.shape[0], 1), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    alpha_bar = schedule.alpha_bar[t]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    return F.mse_loss(model(x_t, t / (T - 1)), eps)


def notebook_sigma(alpha_bar_t: float, alpha_bar_prev: float, alpha_t: float, eta: float) -> float:
    """The official notebook's "η" noise level: η·√max(0, (1−ᾱ_{t−1})/(1−ᾱ_t) · (1 − α_t/ᾱ_t)).

    The textbook DDIM has (1 − α_t) as the second factor; the notebook's 1 − α_t/ᾱ_t = 1 − 1/ᾱ_{t−1} is ≤ 0,
    so σ_t clamps to 0 and its "η = 1" sampler is deterministic DDIM. The paper's curves (best w ≈ ±1.1 at 50
    steps, ±0.28 at 250) come from this sampler — the textbook η = 1 one moves them — so we keep it as is.
    """
    var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_t / alpha_bar_t)
    return eta * math.sqrt(max(var, 0.0))


class EpsWeights(NamedTuple):
    """One EpsMLP's weights laid out for the sampler, which keeps its samples coordinate-major, x: (2, n).

    Each hidden layer is then one (n, width) @ (width, width) product with its bias added in the same call, and
    the output layer a (2, width) @ (width, n) product: the same product taken as (n, width) @ (width, 2) runs
    several times slower on MKL. The input layer is split into its x and t columns (t is one number per call)."""
    w_x: torch.Tensor                                     # (2, width)
    w_t: torch.Tensor                                     # (width,)
    b_in: torch.Tensor                                    # (width,)
    blocks: tuple[tuple[torch.Tensor, torch.Tensor], ...]   # (Wᵀ: (width, width), b: (width,)) per block
    w_out: torch.Tensor                                   # (2, width)
    b_out: torch.Tensor                                   # (2, 1)


def weights(state: dict[str, torch.Tensor]) -> EpsWeights:
    """An EpsMLP state dict (e.g. θneon for one merge weight) -> its weights laid out for the sampler."""
    get = lambda key: state[key].detach().float()
    w_in = get("inp.weight").T                            # (3, width): rows x1, x2, t
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    blocks = tuple((get(f"blocks.{i}.weight").T.contiguous(), get(f"blocks.{i}.bias")) for i in range(n_blocks))
    return EpsWeights(w_x=w_in[:-1].contiguous(), w_t=w_in[-1].contiguous(), b_in=get("inp.bias"), blocks=blocks,
                      w_out=get("out.weight").contiguous(), b_out=get("out.bias")[:, None])


def eps_hat(net: EpsWeights, x: torch.Tensor, b_in: torch.Tensor,
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """ε̂ with the layers of EpsMLP.forward: x: (2, n), b_in: the input layer's bias with the time column folded
    in, b_in + t·w_t for the time t in [0, 1] -> ε̂: (2, n), written into out[2]. out: two (n, width) buffers for
    the hidden layers, taken in turn, and the (2, n) result — a sampler allocates them once, not in every call."""
    h, spare, eps = out
    torch.addmm(b_in, x.T, net.w_x, out=h)
    for w, b in net.blocks:
        h, spare = torch.addmm(b, h, w, out=spare).relu_(), h
    return torch.addmm(net.b_out, net.w_out, h.T, out=eps)


class Step(NamedTuple):
    """One step of the sampler below: the network's time input and the update's coefficients."""
    t: float        # t/(n−1): the sampler's grid mapped onto the same [0, 1] as training's
    c_x: float      # x ← c_x·x + c_eps·ε̂ (+ σ·noise)
    c_eps: float
    sigma: float


@functools.lru_cache(maxsize=64)
def steps(n_steps: int, zeta: float, eta: float) -> tuple[Step, ...]:
    """The sampler's steps t = n−1 … 1 on a fresh n_steps cosine grid (at t = 0, ᾱ_0 = 1: x0 = x, so it stops
    at t = 1), as plain numbers: computed once, not in every chunk's loop."""
    schedule = cosine_schedule(n_steps)
    out = []
    for t in range(n_steps - 1, 0, -1):
        a_t, a_prev = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[t - 1])
        sigma = notebook_sigma(a_t, a_prev, float(schedule.alpha[t]), eta)
        # x0 = (x + (1−ᾱ_t)·ζ·score) / √ᾱ_t with score = −ε̂/√(1−ᾱ_t) (ζ scales the score here only), then
        # x ← √ᾱ_{t−1}·x0 + √(1−ᾱ_{t−1}−σ²)·ε̂ (unscaled ε̂): one multiply-add on x and ε̂.
        x0_x, x0_eps = 1 / math.sqrt(a_t), -zeta * math.sqrt(1 - a_t) / math.sqrt(a_t)
        keep = math.sqrt(max(1 - a_prev - sigma ** 2, 0.0))
        out.append(Step(t / (n_steps - 1), math.sqrt(a_prev) * x0_x, math.sqrt(a_prev) * x0_eps + keep, sigma))
    return tuple(out)


@torch.no_grad()
def sample(model: EpsMLP | EpsWeights, x_T: torch.Tensor, zeta: float = 1.0, n_steps: int = 20, eta: float = 1.0,
           generator: torch.Generator | None = None, chunk: int = 4096) -> torch.Tensor:
    """DDIM-form sampling on a fresh n_steps cosine grid with the score scaled by ζ in the x0-prediction.

    x_T: (N, 2) starting noise (the same x_T for two models gives paired samples) -> x0: (N, 2).
    Rows are processed `chunk` at a time so the activations stay in cache (10⁶ samples are ~3× faster so).
    """
    net = model if isinstance(model, EpsWeights) else weights(model.state_dict())
    plan = steps(n_steps, float(zeta), float(eta))
    rows = min(chunk, x_T.shape[0])
    # The hidden layers' buffers, allocated once: fresh ones in every chunk cost page faults and cache misses.
    out = (x_T.new_empty(rows, net.w_x.shape[1]), x_T.new_empty(rows, net.w_x.shape[1]), x_T.new_empty(2, rows))
    return torch.cat([_denoise(net, x_T[i:i + chunk].T.contiguous(), plan, out, generator).T
                      for i in range(0, x_T.shape[0], chunk)])


def _denoise(net: EpsWeights, x: torch.Tensor, plan: tuple[Step, ...], out: tuple[torch.Tensor, ...],
             generator: torch.Generator | None) -> torch.Tensor:
    """x_T: (2, n) -> x0: (2, n), updated in place; out: eps_hat's buffers for at least n rows."""
    b_in = net.b_in + torch.tensor([step.t for step in plan])[:, None] * net.w_t   # (steps, width)
    n = x.shape[1]
    out = (out[0][:n], out[1][:n], out[2][:, :n])
    for step, b in zip(plan, b_in):
        eps = eps_hat(net, x, b, out)
        x = x.mul_(step.c_x).add_(eps, alpha=step.c_eps)
        if step.sigma > 0:   # fresh noise, drawn sample-major as (n, 2)
            x = x + step.sigma * torch.randn(x.shape[::-1], generator=generator).T
    return x
