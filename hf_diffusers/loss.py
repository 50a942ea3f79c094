"""The diffusers training objective (examples/unconditional_image_generation/train_unconditional.py and
examples/text_to_image/train_text_to_image.py): t uniform over the training timesteps, x_t = add_noise(x_0, ε, t),
the network's prediction against the target of the scheduler's prediction_type, mean squared error."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from neon.errors import NeonError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def noise_scheduler(scheduler) -> DDPMScheduler:
    """The training scripts' noise scheduler: DDPMScheduler with the pipeline scheduler's config (same betas,
    timesteps and prediction_type). Schedulers without a discrete β schedule (EDM-style σ) have no such loss."""
    if not hasattr(scheduler, "alphas_cumprod"):
        raise NeonError(f"diffusers loss: {type(scheduler).__name__} has no discrete noise schedule "
                        "(alphas_cumprod); its training objective is not the DDPM one")
    train = DDPMScheduler.from_config(scheduler.config)
    if train.config.prediction_type not in PREDICTION_TYPES:
        raise NeonError(f"diffusers loss: unknown prediction_type {train.config.prediction_type!r}")
    return train


def diffusion_loss(net, train: DDPMScheduler, x0: torch.Tensor, cond: dict[str, torch.Tensor],
                   learned_sigma: bool = False, snr_gamma: float | None = None) -> torch.Tensor:
    """x0: (B, C, H, W) images in [-1, 1] (or scaled VAE latents). cond: the network's conditioning keywords
    (class_labels; a text model's encoder_hidden_states and added_cond_kwargs). Random draws use the global torch
    RNG, as the scripts do. learned_sigma: the network also predicts a variance (DiT, 2C output channels); only the
    mean's channels enter the loss, as the scripts' MSE. snr_gamma: Min-SNR weighting (train_text_to_image
    --snr_gamma)."""
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, train.config.num_train_timesteps, (x0.shape[0],), device=x0.device).long()
    noisy = train.add_noise(x0, noise, timesteps)
    output = net(noisy, timesteps, **cond).sample
    if learned_sigma:
        output = output[:, :x0.shape[1]]
    kind = train.config.prediction_type
    target = {"epsilon": noise, "sample": x0}.get(kind)
    if kind == "v_prediction":
        target = train.get_velocity(x0, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(output.float(), target.float(), reduction="mean")
    snr = compute_snr(train, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, float(snr_gamma)))
    weights = weights / snr if kind == "epsilon" else weights / (snr + 1) if kind == "v_prediction" else weights
    per_image = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=list(range(1, x0.ndim)))
    return (per_image * weights).mean()
