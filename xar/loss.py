"""xAR's training loss: flow matching per cell with noisy context ("noisy context learning").

Every cell i of every sample gets its own time t_i ~ logit-normal (t = sigmoid(mu + sigma z), z ~ N(0, 1)),
x_t = (1 - t) x + t eps for all cells at once, and the network — seeing the noisy earlier cells through the
block-causal mask — regresses the velocity eps - x of every token:

    loss = E || v(x_t, y, t) - (eps - x) ||^2,   y -> null class with probability label_drop_prob.

Random draws use the global torch RNG, as the official `xAR.forward` (which draws z with scipy); any of them
can be given instead, which is how the fixtures replay the official draws.
"""
from __future__ import annotations

import dataclasses

import torch

from xar.model import XAR, to_cells


@dataclasses.dataclass
class FlowBatch:
    labels: torch.Tensor      # (B,) int64 after label dropout (class_num = null class)
    t: torch.Tensor           # (B, C) float32 time of each cell, in (0, 1)
    timesteps: torch.Tensor   # (B, C) int64 trunc(t * 1000): what the network embeds
    x_t: torch.Tensor         # (B, L, channels) noisy tokens, cell-major
    target: torch.Tensor      # (B, L, channels) velocity eps - x


def flow_batch(net: XAR, x0: torch.Tensor, labels: torch.Tensor, label_drop_prob: float | None = None,
               logit_mean: float = 0.0, logit_std: float = 1.0, drop_u: torch.Tensor | None = None,
               z: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> FlowBatch:
    """x0: clean latents (B, channels, grid, grid), already scaled by 0.2325; labels: (B,) int64.

    drop_u (B,) uniform, z (B, C) float64 standard normal, noise (B, L, channels) standard normal:
    drawn from the global RNG unless given.
    """
    B, K, T = x0.shape[0], net.cfg.clusters, net.cell_tokens
    device = x0.device
    p = net.cfg.label_drop_prob if label_drop_prob is None else label_drop_prob
    if drop_u is None:
        drop_u = torch.rand(B, device=device)
    labels = torch.where(drop_u < p, torch.full_like(labels, net.null_label), labels)
    if z is None:
        z = torch.randn(B, K, device=device, dtype=torch.float64)
    t = (1 / (1 + torch.exp(-(logit_mean + logit_std * z)))).float()   # logistic in float64, as the official
    tokens = to_cells(x0, K)
    if noise is None:
        noise = torch.randn_like(tokens)
    t_tok = t.repeat_interleave(T, dim=1)[..., None]                     # (B, L, 1): each cell's time per token
    return FlowBatch(labels=labels, t=t, timesteps=(t * 1000).long(),
                     x_t=(1 - t_tok) * tokens + t_tok * noise, target=noise - tokens)


def flow_matching_loss(net: XAR, x0: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Scalar loss: mean over samples of the mean squared velocity error (see `flow_batch` for arguments)."""
    fb = flow_batch(net, x0, labels, **kwargs)
    v = net(fb.x_t, fb.labels, fb.timesteps)
    return (v.float() - fb.target).pow(2).mean(dim=(1, 2)).mean()
