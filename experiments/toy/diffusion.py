"""The toy's diffusion model: an ε-predicting MLP, the cosine schedule, its loss, and the ζ-scaled sampler.

ζ scales the score in the x0-prediction only: ζ > 1 pulls samples toward the mode (mode-seeking, like
classifier-free guidance), ζ < 1 spreads them out (diversity-seeking).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
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


class StackedEpsMLP(NamedTuple):
    """K EpsMLPs' weights stacked along a leading axis, laid out for one batched product per layer (torch.bmm):
    each layer holds (W: (K, in, out), b: (K, 1, out)). The input layer is split into its x and t columns."""
    w_x: torch.Tensor                           # (K, 2, width)
    w_t: torch.Tensor                           # (K, 1, width)
    b_in: torch.Tensor                          # (K, 1, width)
    blocks: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    w_out: torch.Tensor                         # (K, width, 2)
    b_out: torch.Tensor                         # (K, 1, 2)


def stack(states: Sequence[dict[str, torch.Tensor]]) -> StackedEpsMLP:
    """EpsMLP state dicts (e.g. θneon for K merge weights) -> their stacked weights."""
    get = lambda key: torch.stack([sd[key].detach().float() for sd in states])
    w_in = get("inp.weight").transpose(1, 2)    # (K, 3, width): rows x1, x2, t
    n_blocks = len({k.split(".")[1] for k in states[0] if k.startswith("blocks.")})
    blocks = tuple((get(f"blocks.{i}.weight").transpose(1, 2).contiguous(), get(f"blocks.{i}.bias")[:, None])
                   for i in range(n_blocks))
    return StackedEpsMLP(w_x=w_in[:, :-1].contiguous(), w_t=w_in[:, -1:].contiguous(), b_in=get("inp.bias")[:, None],
                         blocks=blocks, w_out=get("out.weight").transpose(1, 2).contiguous(),
                         b_out=get("out.bias")[:, None])


def eps_stacked(net: StackedEpsMLP, x: torch.Tensor, t: float) -> torch.Tensor:
    """ε̂(x, t) of all K networks at once: x: (K, n, 2), t: the time in [0, 1] -> (K, n, 2). The same layers as
    EpsMLP.forward; the t column of the input layer folds into its bias, as t is one number per call."""
    h = torch.baddbmm(net.b_in + t * net.w_t, x, net.w_x)
    for w, b in net.blocks:
        h = torch.baddbmm(b, h, w).relu_()
    return torch.baddbmm(net.b_out, h, net.w_out)


@torch.no_grad()
def sample_stacked(net: StackedEpsMLP, x_T: torch.Tensor, zeta: float = 1.0, n_steps: int = 20, eta: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The sampler below for the K stacked networks on the same noise x_T: (n, 2) -> x0: (K, n, 2). Where
    σ_t > 0 every network gets the same fresh noise. Keep K × n small (≈ 4096) so the activations stay in cache."""
    x = x_T.expand(net.w_x.shape[0], -1, -1).clone()
    return _denoise(net, x, zeta, cosine_schedule(n_steps), eta, generator)


@torch.no_grad()
def sample(model: EpsMLP, x_T: torch.Tensor, zeta: float = 1.0, n_steps: int = 20, eta: float = 1.0,
           generator: torch.Generator | None = None, chunk: int = 4096) -> torch.Tensor:
    """DDIM-form sampling on a fresh n_steps cosine grid with the score scaled by ζ in the x0-prediction.

    x_T: (N, 2) starting noise (the same x_T for two models gives paired samples) -> x0: (N, 2).
    Rows are processed `chunk` at a time so the activations stay in cache (10⁶ samples are ~3× faster so).
    """
    net = stack([model.state_dict()])
    return torch.cat([sample_stacked(net, x_T[i:i + chunk], zeta, n_steps, eta, generator)[0]
                      for i in range(0, x_T.shape[0], chunk)])


def _denoise(net: StackedEpsMLP, x: torch.Tensor, zeta: float, schedule: Schedule, eta: float,
             generator: torch.Generator | None) -> torch.Tensor:
    n = schedule.alpha_bar.shape[0]
    for t in range(n - 1, 0, -1):   # at t = 0, ᾱ_0 = 1: x0 = x, so the loop stops at t = 1
        a_t, a_prev = float(schedule.alpha_bar[t]), float(schedule.alpha_bar[t - 1])
        # The network sees t/(n−1): the sampler's grid is mapped onto the same [0, 1] as training's.
        eps = eps_stacked(net, x, t / (n - 1))
        sigma = notebook_sigma(a_t, a_prev, float(schedule.alpha[t]), eta)
        # x0 = (x + (1−ᾱ_t)·ζ·score) / √ᾱ_t with score = −ε̂/√(1−ᾱ_t) (ζ scales the score here only), then
        # x ← √ᾱ_{t−1}·x0 + √(1−ᾱ_{t−1}−σ²)·ε̂ (unscaled ε̂): one multiply-add on x and ε̂.
        x0_x, x0_eps = 1 / math.sqrt(a_t), -zeta * math.sqrt(1 - a_t) / math.sqrt(a_t)
        keep = math.sqrt(max(1 - a_prev - sigma ** 2, 0.0))
        x = x.mul_(math.sqrt(a_prev) * x0_x).add_(eps, alpha=math.sqrt(a_prev) * x0_eps + keep)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape[1:], generator=generator)
    return x
