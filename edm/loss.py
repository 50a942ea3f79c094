"""The EDM training losses (self-training θs uses the same loss the released model was trained with).

Each loss returns the per-element loss λ(σ)·(D(y + n; σ) − y)², shape (B, C, H, W), as the official
`training/loss.py`; the official training loop then reduces with `loss.sum() / batch` (see `reduce_loss`).
Random draws use the global torch RNG in the official order (σ first, then the noise), so a seeded run draws
the same numbers as the official code; `draws=` supplies them explicitly instead (tests, reproducibility).
"""
from __future__ import annotations

import torch


class EDMLoss:
    """EDM: ln σ ~ N(P_mean, P_std²), weight λ(σ) = (σ² + σ_data²) / (σ·σ_data)²."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean          # mean of ln σ
        self.P_std = P_std            # standard deviation of ln σ
        self.sigma_data = sigma_data  # data standard deviation (as in the preconditioner)

    def draw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        return {"rnd_normal": rnd_normal}

    def sigma(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        return (draws["rnd_normal"] * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net, images, labels=None, augment_pipe=None, draws=None):
        """images: (B, C, H, W) in [-1, 1]; labels: (B, label_dim) one-hot or None.
        draws: optional {'rnd_normal': (B,1,1,1), 'noise_unit': (B,C,H,W)} replacing the random draws."""
        return _denoising_loss(self, net, images, labels, augment_pipe, draws)


class VPLoss:
    """VP: t ~ U(ε_t, 1), σ(t) = sqrt(exp(½β_d t² + β_min t) − 1), weight 1/σ²."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d          # extent of the noise schedule
        self.beta_min = beta_min      # initial slope of the noise schedule
        self.epsilon_t = epsilon_t    # smallest t

    def draw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rnd_uniform": torch.rand([images.shape[0], 1, 1, 1], device=images.device)}

    def sigma(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        t = torch.as_tensor(1 + draws["rnd_uniform"] * (self.epsilon_t - 1))
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma ** 2

    def __call__(self, net, images, labels=None, augment_pipe=None, draws=None):
        """As EDMLoss.__call__; draws: {'rnd_uniform': (B,1,1,1), 'noise_unit': (B,C,H,W)}."""
        return _denoising_loss(self, net, images, labels, augment_pipe, draws)


class VELoss:
    """VE: σ = σ_min·(σ_max/σ_min)^u, u ~ U(0, 1), weight 1/σ²."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def draw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rnd_uniform": torch.rand([images.shape[0], 1, 1, 1], device=images.device)}

    def sigma(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** draws["rnd_uniform"])

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma ** 2

    def __call__(self, net, images, labels=None, augment_pipe=None, draws=None):
        return _denoising_loss(self, net, images, labels, augment_pipe, draws)


def _denoising_loss(loss, net, images, labels, augment_pipe, draws):
    draws = dict(draws) if draws is not None else loss.draw(images)
    sigma = loss.sigma(draws)
    weight = loss.weight(sigma)
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    noise_unit = draws["noise_unit"] if "noise_unit" in draws else torch.randn_like(y)
    n = noise_unit * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


LOSSES = {"EDMLoss": EDMLoss, "VPLoss": VPLoss, "VELoss": VELoss}


def reduce_loss(per_element: torch.Tensor, reduction: str = "sum_per_image") -> torch.Tensor:
    """The scalar that is backpropagated.

    'sum_per_image' (default): sum over pixels and channels, mean over the batch — the official training loop's
    `loss.sum() * loss_scaling / batch_gpu_total` with loss_scaling 1, averaged over GPUs by DDP.
    'mean': the plain mean, i.e. the same gradient divided by C·H·W (Adam is nearly invariant to that factor,
    except through its eps = 1e-8).
    """
    if reduction == "sum_per_image":
        return per_element.sum() / per_element.shape[0]
    if reduction == "mean":
        return per_element.mean()
    raise ValueError(f"unknown loss reduction {reduction!r} (use 'sum_per_image' or 'mean')")
