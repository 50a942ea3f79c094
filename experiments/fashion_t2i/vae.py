"""The VAE stage: the pipeline's AutoencoderKL trained on the train split before θr, then frozen (as SD's VAE was
trained before its UNet), and its latent scale set as SD's was: 1 / the std of the latents."""
from __future__ import annotations

import numpy as np
import torch


def to_vae_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1], what the family's `encode` feeds the VAE."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, kl_weight: float, seed: int,
              log=print) -> dict:
    """Train `vae` in place on uint8 NHWC `images`: loss = MSE(decode(z), x) + kl_weight · KL(q(z|x) ‖ N(0, I)) per
    latent element, z drawn from the posterior. Then scaling_factor := 1 / std of the posterior means (its
    config, saved with the pipeline). -> {"reconstruction_mse", "scaling_factor", "final_loss"}."""
    x_all = to_vae_input(images)
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        kl = posterior.kl() / z[0].numel()              # diffusers sums KL over the latent's elements
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + kl_weight * kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"vae: step {step + 1}/{steps}, loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held = x_all[torch.randperm(len(x_all), generator=gen)[:2048]]
        means = vae.encode(held).latent_dist.mean
        mse = float(torch.nn.functional.mse_loss(vae.decode(means).sample, held))
        scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=scale)
    return {"reconstruction_mse": mse, "scaling_factor": scale, "final_loss": loss.item()}
