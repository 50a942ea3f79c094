"""IMM's pushforward sampler: a few flow-map jumps from t = T down to t = eps, with classifier-free guidance.

    x_{t_0} = sigma_d * z,  z ~ N(0, I)              (one generator per image, seeded by the image's seed)
    t_i     = T + i (eps - T) / N,  i = 0..N          (uniform grid, float64)
    x_{t_{i+1}} = f(x_{t_i}, t_i, t_{i+1}, y)          (guided: F = F_null + w (F_y - F_null) before the jump)

With a guide θs and guide_scale ω ≠ 0 the jump uses F = (1+ω)·F_θr − ω·F_θs, each network's F guided by CFG
first (see `network_output`), at twice the cost (neon.guidance).

No noise is drawn after the first step, so an image's randomness comes from its seed alone. The state and the times
are float64 (as lumalabs/imm generate_images.py keeps them); the network sees float32 (or the autocast dtype).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from imm.precond import IMMPrecond
from neon.errors import NeonError
from neon.guidance import mix

_AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_grid(net: IMMPrecond, num_steps: int, device=None) -> torch.Tensor:
    """The official 'uniform' discretisation: (num_steps + 1,) float64 from T to eps."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise NeonError(f"IMM sampler steps must be a positive integer, got {num_steps!r}")
    return torch.linspace(net.T, net.eps, num_steps + 1, dtype=torch.float64, device=device)


def initial_latents(net: IMMPrecond, seeds: Sequence[int], device=None) -> torch.Tensor:
    """x_T = sigma_d * N(0, I): (B, C, H, W) float32, image i drawn from torch.Generator().manual_seed(seeds[i])
    on the CPU (so the draw is the same on every device)."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
    return (z * net.sigma_data).to(device)


def network_output(net: IMMPrecond, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor,
                   cfg_scale: float | None = None) -> torch.Tensor:
    """One network's F for the jump t -> s, with classifier-free guidance (the official `cfg_forward`), in the dtype
    of t. x (N, C, H, W); t, s 0-d times; class_labels one-hot (N, label_dim). cfg_scale None: one conditional
    pass. Else one batched pass over [x, x] with [null, labels] (unconditional half first) and
    F = F_null + cfg_scale * (F_y - F_null)."""
    labels = net.one_hot_labels(class_labels, x.shape[0], x.device)
    if cfg_scale is None:
        return net.model_output(x, t, s, labels).to(t.dtype)
    F = net.model_output(torch.cat([x, x]), t, s, torch.cat([torch.zeros_like(labels), labels])).to(t.dtype)
    F_null, F_cond = F[:len(x)], F[len(x):]
    return F_null + cfg_scale * (F_cond - F_null)


def guided_output(net: IMMPrecond, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor,
                  cfg_scale: float | None = None, guide: IMMPrecond | None = None,
                  guide_scale: float = 0.0) -> torch.Tensor:
    """F of θr (`network_output`), or with a guide (1+ω)·F_θr − ω·F_θs, ω = guide_scale. Self-guidance acts on
    the CFG-combined F of each network (both with the same cfg_scale), so that with cfg the guide corrects the
    output the sampler would otherwise use, as autoguidance replaces CFG's unconditional branch."""
    F = network_output(net, x, t, s, class_labels, cfg_scale)
    if guide is None:
        return F
    return mix(F, network_output(guide, x, t, s, class_labels, cfg_scale), guide_scale)


def guided_step(net: IMMPrecond, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor,
                cfg_scale: float | None = None, guide: IMMPrecond | None = None,
                guide_scale: float = 0.0) -> torch.Tensor:
    """One flow-map jump t -> s with the F of `guided_output`: x_s = flow_map(x, F, t, s) in the dtype of t."""
    return net.flow_map(x, guided_output(net, x, t, s, class_labels, cfg_scale, guide, guide_scale), t, s)


@torch.no_grad()
def pushforward(net: IMMPrecond, latents: torch.Tensor, class_labels: torch.Tensor, num_steps: int = 8,
                cfg_scale: float | None = None, trajectory: bool = False, guide: IMMPrecond | None = None,
                guide_scale: float = 0.0):
    """latents (B, C, H, W) at t = T -> final latents (B, C, H, W) float64 (with trajectory=True also the
    (num_steps, B, C, H, W) states after each step). guide, guide_scale: self-guidance (`guided_output`)."""
    t_steps = time_grid(net, num_steps, latents.device)
    x = latents.to(torch.float64)
    states = []
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x = guided_step(net, x, t_cur, t_next, class_labels, cfg_scale, guide, guide_scale).to(torch.float64)
        if trajectory:
            states.append(x)
    return (x, torch.stack(states)) if trajectory else x


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (B,) in [0, num_classes) -> float32 (B, num_classes)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)


def check_labels(labels: torch.Tensor | None, num_seeds: int, num_classes: int) -> torch.Tensor:
    if labels is None:
        raise NeonError("this IMM model is class-conditional: give one label per seed")
    labels = torch.as_tensor(labels)
    if labels.shape != (num_seeds,) or labels.dtype.is_floating_point:
        raise NeonError(f"labels must be integers of shape ({num_seeds},), got {labels.dtype} {tuple(labels.shape)}")
    if num_seeds and (labels.min() < 0 or labels.max() >= num_classes):
        raise NeonError(f"labels must lie in [0, {num_classes}), got [{labels.min().item()}, {labels.max().item()}]")
    return labels


def sample_latents(net: IMMPrecond, seeds: Sequence[int], labels: torch.Tensor | None, steps: int = 8,
                   cfg: float | None = 1.5, autocast: str | None = None, guide: IMMPrecond | None = None,
                   guide_scale: float = 0.0) -> torch.Tensor:
    """Seeds + labels -> final latents (B, C, H, W) float64 on the network's device.

    steps: number of flow-map jumps (the releases use 1, 2, 4, 8); cfg: guidance scale (1.5 in the release
    presets; None = no guidance); autocast: None (float32, as the official samplers run the DiT) or 'bf16' /
    'fp16' for the DiT on CUDA; guide, guide_scale: θs and ω of self-guidance (`guided_output`)."""
    if autocast not in _AUTOCAST:
        raise NeonError(f"autocast must be null, 'bf16' or 'fp16', got {autocast!r}")
    device = next(net.parameters()).device
    labels = check_labels(labels, len(seeds), net.label_dim).to(device)
    latents = initial_latents(net, seeds, device)
    precision = (torch.autocast("cuda", dtype=_AUTOCAST[autocast]) if autocast and device.type == "cuda"
                 else contextlib.nullcontext())
    with precision:
        return pushforward(net, latents, one_hot(labels, net.label_dim), steps,
                           None if cfg is None else float(cfg), guide=guide, guide_scale=float(guide_scale))
