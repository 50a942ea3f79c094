"""The paper's gradient-alignment check: the Adam-preconditioned cosine between the real-data gradient g_d
and the self-training gradient g_s at θr. It is negative exactly when the sampler is mode-seeking — then a step
on synthetic data moves away from the data, and stepping the other way (w > 0) helps."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """∇θ loss as one float64 vector (parameters in model order)."""
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]).double()


def gradient_moments(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, batch: int = 2048, passes: int = 1,
                     beta2: float = 0.999) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the per-batch gradients over `passes` sweeps of x: (N, 2) in batches, and Adam's bias-corrected
    second moment v̂ of those same gradients (β2 = 0.999). Both (num_params,) float64.

    Several passes matter for the diffusion loss, whose random t and ε make one pass noisy.
    """
    model.train()
    g_sum, v, k = 0.0, 0.0, 0
    for _ in range(passes):
        for i in range(0, x.shape[0], batch):
            g = flat_grad(model, loss_fn(model, x[i:i + batch]))
            g_sum = g_sum + g
            v = beta2 * v + (1 - beta2) * g * g
            k += 1
    model.eval()
    return g_sum / k, v / (1 - beta2 ** k)


def preconditioned_cosine(g_d: torch.Tensor, g_s: torch.Tensor, v_hat: torch.Tensor, eps: float = 1e-8) -> float:
    """cos = ⟨g_d, P g_s⟩ / (‖g_d‖_P ‖g_s‖_P) with P = diag(1 / (√v̂ + eps)), Adam's preconditioner."""
    p = 1.0 / (v_hat.sqrt() + eps)
    dot = lambda a, b: torch.sum(a * p * b)
    return float(dot(g_d, g_s) / (dot(g_d, g_d).sqrt() * dot(g_s, g_s).sqrt()))
