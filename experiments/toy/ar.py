"""The toy's autoregressive model: p(x1) p(x2 | x1), both Gaussian, with exact likelihood.

Temperature τ multiplies both standard deviations when sampling: τ < 1 is mode-seeking, τ > 1 diversity-seeking.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class ARGaussian2D(nn.Module):
    """p(x1) = N(μ1, e^{2ℓ1}) with free scalars μ1, ℓ1; p(x2 | x1) = N(μ2(x1), e^{2ℓ2(x1)}) from an MLP."""

    def __init__(self,
                 width: int = 64,                     # hidden units of the conditional's MLP 1 → 64 → 64 → 2
                 min_log_std: float = -6.0,           # log-std clamp, as the official notebook
                 max_log_std: float = 3.0):
        super().__init__()
        self.mu1 = nn.Parameter(torch.zeros(1))
        self.log_std1 = nn.Parameter(torch.zeros(1))
        self.head2 = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, 2))
        self.min_log_std, self.max_log_std = min_log_std, max_log_std

    def conditional(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x1: (N,) -> μ2(x1), clamped ℓ2(x1): (N,) each."""
        mu2, log_std2 = self.head2(x1[:, None]).unbind(dim=1)
        return mu2, log_std2.clamp(self.min_log_std, self.max_log_std)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of x: (N, 2) -> scalar."""
        x1, x2 = x[:, 0], x[:, 1]
        log_std1 = self.log_std1.clamp(self.min_log_std, self.max_log_std)
        mu2, log_std2 = self.conditional(x1)
        nll1 = 0.5 * ((x1 - self.mu1) / log_std1.exp()) ** 2 + log_std1 + 0.5 * LOG_2PI
        nll2 = 0.5 * ((x2 - mu2) / log_std2.exp()) ** 2 + log_std2 + 0.5 * LOG_2PI
        return (nll1 + nll2).mean()

    @torch.no_grad()
    def sample(self, eps: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """eps: (N, 2) standard normal noise (one column per coordinate) -> x: (N, 2) at temperature τ."""
        log_std1 = self.log_std1.clamp(self.min_log_std, self.max_log_std)
        x1 = self.mu1 + tau * log_std1.exp() * eps[:, 0]
        mu2, log_std2 = self.conditional(x1)
        x2 = mu2 + tau * log_std2.exp() * eps[:, 1]
        return torch.stack([x1, x2], dim=1)
