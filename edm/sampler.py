"""The EDM sampler (the paper's Algorithm 2) and per-image seeded noise.

`edm_sampler` follows the official `generate.py` step by step: time steps in float64, the state x in float64,
the network called with float64 x and a 0-dim float64 σ (the network casts to float32) and its output cast
back to float64. With S_churn = 0 (the setting of every Neon row) it is the deterministic 2nd-order Heun
solver with 2N − 1 network evaluations.

With a guide θs and guide_scale ω ≠ 0 every evaluation, the Heun correction's included, is the guided denoiser
(1+ω)·D_θr − ω·D_θs (autoguidance, NVlabs/edm2@4bf8162 generate_images.py `edm_sampler`'s `denoise`), at twice
the cost; see neon.guidance.

Randomness is per image: image i's latents (and churn noise) come from a `torch.Generator` seeded with seeds[i],
as the official `StackedRandomGenerator`, so an image's random draws depend on its seed alone, not on the batch
it is in (its floating-point rounding may follow the batch shape: see neon.sampling).
The generators live on the CPU (the official code puts them on the GPU), so the same seed gives the same latents
on any device; the noise is moved to the sampling device in one copy per call.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from neon.errors import NeonError
from neon.guidance import mix


class SeededNoise:
    """One CPU `torch.Generator` per image, seeded with `seed % 2**32` (as the official code)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator("cpu").manual_seed(int(seed) % (1 << 32)) for seed in seeds]
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape[1:]) standard normal; row i drawn from generator i."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch {shape[0]} does not match {len(self.generators)} seeds")
        rows = [torch.randn(list(shape[1:]), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """(B,) int64 in [0, high), one draw per generator."""
        return torch.stack([torch.randint(high, size=[], generator=g) for g in self.generators]).to(self.device)


def latents_and_labels(seeds: Sequence[int], img_channels: int, img_resolution: int, label_dim: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the official generate.py draws per seed, in its order: N(0, I) latents (B, C, H, W) float32, then,
    for a conditional model, a class index (B,) int64 uniform in [0, label_dim) (None when label_dim = 0)."""
    noise = SeededNoise(seeds, device)
    latents = noise.randn([len(seeds), img_channels, img_resolution, img_resolution])
    labels = noise.randint(label_dim) if label_dim else None
    return latents, labels


def time_steps(net: torch.nn.Module, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80,
               rho: float = 7, device=None) -> torch.Tensor:
    """The sampler's noise levels, float64 (N+1,): for i < N (the paper's Eq. 5)
    t_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, and t_N = 0.
    σ_min and σ_max are first clamped to the network's range (`effective_range`)."""
    if num_steps < 2:
        raise NeonError(f"edm_sampler needs num_steps >= 2, got {num_steps}")
    sigma_min, sigma_max = effective_range(net, sigma_min, sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    first, last = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t = (first + step_indices / (num_steps - 1) * (last - first)) ** rho
    return torch.cat([net.round_sigma(t), torch.zeros_like(t[:1])])


def effective_range(net: torch.nn.Module, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """(σ_min, σ_max) clamped to the noise levels the network supports (VP: [0.00098, 152]; EDM: unbounded)."""
    return max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)


def guided_denoiser(net: torch.nn.Module, class_labels: torch.Tensor | None, guide: torch.nn.Module | None = None,
                    guide_scale: float = 0.0, trace: list | None = None) -> Callable:
    """The denoiser the sampler calls: (x float64 (B, C, H, W), σ 0-dim float64) -> D float64 (B, C, H, W).
    D = net(x, σ, labels), or with a guide (1+ω)·D_net − ω·D_guide (ω = guide_scale), both networks called on the
    same batch. trace: if a list, (x, σ, D) of every call is appended (D as the network returned it, unguided;
    the guided D in float64 when a guide runs)."""
    def denoise(x, t):
        D = net(x, t, class_labels)
        if guide is not None:
            D = mix(D.to(torch.float64), guide(x, t, class_labels).to(torch.float64), guide_scale)
        if trace is not None:
            trace.append((x, t, D))
        return D.to(torch.float64)
    return denoise


@torch.no_grad()
def edm_sampler(net: torch.nn.Module, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"), S_noise: float = 1,
                trace: list | None = None, guide: torch.nn.Module | None = None,
                guide_scale: float = 0.0) -> torch.Tensor:
    """Heun's 2nd-order solver of the probability-flow ODE, with optional churn (Algorithm 2).

    net:          a preconditioned denoiser D(x; σ, labels) with `sigma_min`, `sigma_max`, `round_sigma`
    latents:      (B, C, H, W) unit normal noise
    class_labels: (B, label_dim) one-hot float, or None for an unconditional network
    randn_like:   churn noise source (a `SeededNoise.randn_like` for per-image noise); unused when S_churn = 0
    trace:        if a list, (x, σ, D) of every network call is appended to it (x float64, D as returned)
    guide:        θs for self-guidance (`guided_denoiser`), or None; guide_scale: its ω
    Returns x_N: (B, C, H, W) float64, images in about [-1, 1].
    """
    t_steps = time_steps(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    denoise = guided_denoiser(net, class_labels, guide, guide_scale, trace)

    t_host = t_steps.tolist()   # the churn range is tested on these: one read from the GPU, not two per step

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily. The official code draws churn noise at every step; with S_churn = 0 it is
        # multiplied by 0, so skipping the draw changes nothing.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_host[i] <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        if S_churn > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in about [-1, 1] -> (B, H, W, C) uint8, the official generate.py rounding."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
