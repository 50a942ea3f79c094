"""xAR sampling: cells one after another, each by an Euler–Maruyama SDE on the flow-matching path, as the
official `xAR.sample_tokens` + `sampler.euler_maruyama_sampler`.

For cell k (k = 0 .. clusters-1):
  guidance   cfg_k = 1 + (cfg - 1) * k / (clusters - 1)       (cell 0 unguided, the last cell at cfg)
  time grid  t_0..t_{S-1} = linspace(1, 0.04, S), then t_S = 0
  start      x ~ N(0, I), carried in float64
  steps      for i < S-1:  d = v - t * score,  score = ((t - 1) v - x) / t   (linear path x_t = (1-t) x0 + t eps)
                           x <- x + d dt + sqrt(2t) sqrt(|dt|) eps_i           (dt = t_{i+1} - t_i < 0)
  last step  x <- x + d dt at t = 0.04, dt = -0.04, no noise
where v is the network's velocity (with CFG: d = d_uncond + cfg_k (d_cond - d_uncond)). The first call of a
cell also feeds the previous cell's final sample at time 0, which puts that cell into the KV cache; the other
calls feed only the current cell.

With a guide θs and guide_scale ω ≠ 0 every call uses d = (1+ω)·d_θr − ω·d_θs, each network's drift guided by
CFG first (`guided_drift`), each network with its own KV cache, at twice the cost (neon.guidance). The drift is
(2 - t)·v + x for the same x in both networks, so this is the same extrapolation of the flow head's velocity.

Every random draw of image i comes from a generator seeded with seeds[i] (`PerImageNoise`), so an image's noise
depends on its seed alone, not on the batch it is drawn in (the rounding of the batched network may follow
the batch shape: see neon.sampling).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch

from neon.guidance import mix
from xar.model import XAR, from_cells

MIN_STEPS = 3   # the official sampler breaks below 3 steps (its last step re-enters the first-step branch)


def time_grid(num_steps: int) -> torch.Tensor:
    """(num_steps + 1,) float64: linspace(1, 0.04, num_steps) followed by 0."""
    return torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])


def timestep(t: float) -> int:
    """The integer timestep the network embeds: trunc(float32(t) * 1000) in float32, as the official sampler
    passes float32 times (float64 arithmetic would give e.g. 679 instead of 680 for t = 0.68)."""
    return int((torch.tensor(t, dtype=torch.float32) * 1000).long())


def cfg_schedule(cfg: float, cell: int, clusters: int) -> float:
    """Guidance of cell k, ramped linearly from 1 (first cell) to cfg (last cell)."""
    return (cfg - 1) * cell / (clusters - 1.0) + 1


class Noise(Protocol):
    def cell(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise of cell k: start latents (B, T, C) float32 and SDE noise (S-1, B, T, C) float64."""
        ...


class PerImageNoise:
    """Draws every image's noise from its own generator: per cell, the start latents then the S-1 SDE draws."""

    def __init__(self, seeds: Sequence[int], tokens: int, channels: int, num_steps: int, device):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        self.shape, self.steps, self.device = (tokens, channels), num_steps, device

    def cell(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, eps = [], []
        for g in self.generators:   # one small draw per image; the network batch stays whole
            start.append(torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32))
            eps.append(torch.randn((self.steps - 1, *self.shape), generator=g, device=self.device,
                                   dtype=torch.float64))
        return torch.stack(start), torch.stack(eps, dim=1)


class RecordedNoise:
    """Replays given noise: start (clusters, B, T, C) and eps (clusters, S-1, B, T, C)."""

    def __init__(self, start: torch.Tensor, eps: torch.Tensor):
        self.start, self.eps = start, eps

    def cell(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.start[k].float(), self.eps[k].double()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def sample_cells(net: XAR, labels: torch.Tensor, num_steps: int, cfg: float, noise: Noise,
                 kv_cache: bool = True, autocast: torch.dtype | None = None, guide: XAR | None = None,
                 guide_scale: float = 0.0) -> list[torch.Tensor]:
    """Generate the cells of len(labels) latents with `net` in eval mode. labels: (B,) int64 in [0, class_num).

    Returns the clusters final cell samples, each (B, T, C) float64 (T tokens of C channels), in cell order.
    kv_cache=False recomputes the finished cells at every call instead (same result, for comparison).
    guide, guide_scale: θs (in eval mode) and ω of self-guidance (`guided_drift`); None: θr alone.
    """
    if num_steps < MIN_STEPS:
        raise ValueError(f"xAR's Euler–Maruyama sampler needs flow_steps >= {MIN_STEPS}, got {num_steps}")
    B, K = labels.shape[0], net.cfg.clusters
    device = labels.device
    t_steps = time_grid(num_steps).tolist()
    cfgs = [cfg_schedule(cfg, k, K) for k in range(K)]
    # θs attends to its own keys and values of the finished cells: one cache per network.
    caches = [m.new_cache(2 * B if max(cfgs) > 1 else B) if kv_cache else None
              for m in ([net] if guide is None else [net, guide])]
    null = torch.full_like(labels, net.null_label)
    cells: list[torch.Tensor] = []   # finished cells, float32 (the context the network sees)
    done: list[torch.Tensor] = []    # the same in float64 (what the SDE produced)
    for k in range(K):
        # The unconditional branch is needed where this cell is guided; cell 0 (cfg_0 = 1) never needs it: the
        # cache it would fill stays empty, and cell 1's first call recomputes cell 0 for both branches.
        y = torch.cat([labels, null]) if cfgs[k] > 1 else labels
        x0, eps = noise.cell(k)
        x = x0.to(device, torch.float64)
        for i in range(num_steps):
            t, dt = t_steps[i], t_steps[i + 1] - t_steps[i]
            # The finished cells the call feeds (at time 0): all of them without a cache; with one, only the
            # previous cell on a cell's first call, which puts it into the cache.
            context = cells if not kv_cache else cells[-1:] if i == 0 else []
            d = guided_drift(net, x, y, k, t, context, caches, cfgs[k], autocast, guide, guide_scale)
            if i < num_steps - 1:   # Euler–Maruyama step
                x = x + d * dt + (2 * t) ** 0.5 * (eps[i].to(device) * abs(dt) ** 0.5)
            else:                   # final deterministic Euler step from t = 0.04 to 0
                x = x + dt * d
        done.append(x)
        cells.append(x.float())
    return done


def drift(net: XAR, x: torch.Tensor, y: torch.Tensor, k: int, t: float, context: list[torch.Tensor], cache,
          cfg_k: float, autocast) -> torch.Tensor:
    """One network's SDE drift for cell k at time t, with classifier-free guidance: (B, T, C) float64.
    x: (B, T, C) float64 current cell; y: labels (B,), or [labels, null labels] (2B,) when cfg_k > 1;
    context, cache: as `_velocity`."""
    guided = cfg_k > 1
    v = _velocity(net, x, y, k, timestep(t), context, cache, guided, autocast)
    xx = torch.cat([x, x]) if guided else x
    score = ((t - 1) * v - xx) / (t ** 2 - (t - 1) * t)   # linear path: alpha = 1-t, sigma = t
    d = v - 0.5 * (2 * t) * score                         # drift with diffusion g(t)^2 = 2t
    if guided:
        d_cond, d_uncond = d.chunk(2)
        d = d_uncond + cfg_k * (d_cond - d_uncond)
    return d


def guided_drift(net: XAR, x: torch.Tensor, y: torch.Tensor, k: int, t: float, context: list[torch.Tensor],
                 caches: list, cfg_k: float, autocast, guide: XAR | None = None,
                 guide_scale: float = 0.0) -> torch.Tensor:
    """The drift the sampler steps with: θr's `drift` (with caches[0]), or with a guide
    (1+ω)·d_θr − ω·d_θs (θs with caches[1]). Self-guidance acts on each network's CFG-combined drift, both with
    the same cfg_k, so the guide corrects the output the sampler would otherwise use."""
    d = drift(net, x, y, k, t, context, caches[0], cfg_k, autocast)
    if guide is None:
        return d
    return mix(d, drift(guide, x, y, k, t, context, caches[1], cfg_k, autocast), guide_scale)


def _velocity(net: XAR, x: torch.Tensor, y: torch.Tensor, k: int, step: int, context: list[torch.Tensor],
              cache, guided: bool, autocast) -> torch.Tensor:
    """One network call for cell k -> the velocity (rows, T, C) float64 of the current cell's tokens.
    x: (B, T, C) float64 current cell; context: finished cells (B, T, C) float32 fed before it at time 0;
    guided: run the batch twice, with y = [labels, null labels]."""
    T = net.cell_tokens
    inp = torch.cat(context + [x.float()], dim=1)
    if guided:
        inp = torch.cat([inp, inp])
    timesteps = torch.tensor([0] * len(context) + [step], device=y.device).expand(y.shape[0], -1)
    with _autocast(inp.device, autocast):
        v = net(inp, y, timesteps, start=(k + 1) * T - inp.shape[1], cache=cache)
    return v[:, -T:].double()


def sample_tokens(net: XAR, labels: torch.Tensor, num_steps: int, cfg: float, noise: Noise,
                  kv_cache: bool = True, autocast: torch.dtype | None = None, guide: XAR | None = None,
                  guide_scale: float = 0.0) -> torch.Tensor:
    """-> latents (B, vae_embed_dim, grid, grid) float32, scaled as in training (decode them / 0.2325)."""
    cells = sample_cells(net, labels, num_steps, cfg, noise, kv_cache=kv_cache, autocast=autocast, guide=guide,
                         guide_scale=guide_scale)
    return from_cells(torch.cat([c.float() for c in cells], dim=1), net.cfg.clusters)
