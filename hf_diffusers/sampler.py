"""The pipelines' own denoising loops, with one torch.Generator per image.

`unet_loop` is DDPMPipeline / DDIMPipeline.__call__ (plus class labels for a class-conditional UNet2DModel, which
those pipelines do not take) and `dit_loop` is DiTPipeline.__call__, step for step: the same calls in the same
order on the same tensors, so with `generator=[torch.Generator().manual_seed(s) for s in seeds]` the images equal
the pipeline's. `to_uint8` is the pipelines' output_type="pil" conversion.

With a guide θs and guide_scale ω ≠ 0 the scheduler's step sees (1+ω)·out_θr − ω·out_θs of the model outputs
(noise, v or sample prediction, whatever the scheduler's prediction_type), DiT's after each network's own
classifier-free guidance, at twice the cost (neon.guidance).
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from neon.errors import NeonError
from neon.guidance import mix


def step_kwargs(scheduler, generators, extra: dict) -> dict:
    """Keywords for scheduler.step: the per-image generators where the step draws noise (DDPM, DDIM with eta > 0),
    and the pipeline's own step arguments (DDIM's eta, use_clipped_model_output) where the scheduler takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    unknown = [k for k in extra if k not in accepted]
    if unknown:
        raise NeonError(f"diffusers sampler: {type(scheduler).__name__}.step takes no {', '.join(unknown)}")
    out = dict(extra)
    if "generator" in accepted:
        out["generator"] = generators
    return out


def unet_output(unet, model_input: torch.Tensor, t, class_labels: torch.Tensor | None, guide=None,
                guide_scale: float = 0.0) -> torch.Tensor:
    """The model output (B, C, H, W) the scheduler steps with: the UNet's, or with a guide
    (1+ω)·out_θr − ω·out_θs, both networks on the same batch."""
    model_output = unet(model_input, t, class_labels=class_labels).sample
    if guide is None:
        return model_output
    return mix(model_output, guide(model_input, t, class_labels=class_labels).sample, guide_scale)


@torch.no_grad()
def unet_loop(unet, scheduler, generators: list[torch.Generator], class_labels: torch.Tensor | None,
              num_inference_steps: int, guide=None, guide_scale: float = 0.0, **step_args) -> torch.Tensor:
    """DDPMPipeline / DDIMPipeline: x_T ~ N(0, I) per image, then x_t -> x_{t-1} by the scheduler.
    guide, guide_scale: θs and ω of self-guidance (`unet_output`). -> float (B, C, H, W) in [0, 1]."""
    scheduler = copy.deepcopy(scheduler)   # set_timesteps and multistep solvers keep state
    size = unet.config.sample_size
    shape = (len(generators), unet.config.in_channels, size, size)
    device = unet.device
    image = randn_tensor(shape, generator=generators, device=device, dtype=unet.dtype)
    image = image * scheduler.init_noise_sigma   # 1 for DDPM/DDIM, the pipelines' case; sigma_max for Euler
    scheduler.set_timesteps(num_inference_steps)
    kwargs = step_kwargs(scheduler, generators, step_args)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(image, t)   # identity for DDPM/DDIM
        model_output = unet_output(unet, model_input, t, class_labels, guide, guide_scale)
        image = scheduler.step(model_output, t, image, **kwargs).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


def dit_output(transformer, latent_model_input: torch.Tensor, timesteps: torch.Tensor,
               class_labels_input: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """One DiT's model output for the scheduler, DiTPipeline's: with guidance (guidance_scale > 1, the batch
    doubled as [cond; uncond]) the noise channels are uncond + guidance_scale·(cond − uncond) in both halves and
    the learned-variance channels pass through; with learned sigma only the mean channels are returned."""
    latent_channels = transformer.config.in_channels
    noise_pred = transformer(latent_model_input, timestep=timesteps, class_labels=class_labels_input).sample
    if guidance_scale > 1:   # guidance on the noise channels; the learned-variance channels pass through
        eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        noise_pred = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
    if transformer.config.out_channels // 2 == latent_channels:   # learned sigma: keep the mean
        model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
    else:
        model_output = noise_pred
    return model_output


def guided_dit_output(transformer, latent_model_input: torch.Tensor, timesteps: torch.Tensor,
                      class_labels_input: torch.Tensor, guidance_scale: float, guide=None,
                      guide_scale: float = 0.0) -> torch.Tensor:
    """`dit_output` of θr, or with a guide (1+ω)·out_θr − ω·out_θs. Self-guidance acts on each network's
    CFG-combined output, both with the same guidance_scale, so the guide corrects the output the scheduler
    would otherwise step with."""
    out = dit_output(transformer, latent_model_input, timesteps, class_labels_input, guidance_scale)
    if guide is None:
        return out
    return mix(out, dit_output(guide, latent_model_input, timesteps, class_labels_input, guidance_scale),
               guide_scale)


@torch.no_grad()
def dit_loop(transformer, vae, scheduler, generators: list[torch.Generator], class_labels: torch.Tensor,
             guidance_scale: float, num_inference_steps: int, guide=None, guide_scale: float = 0.0,
             **step_args) -> torch.Tensor:
    """DiTPipeline: latents per image, classifier-free guidance on the doubled batch (the null class is the
    label table's last row), the VAE decoding the latents. -> float (B, C, H, W) in [0, 1].
    guide, guide_scale: θs and ω of self-guidance (`guided_dit_output`).

    The pipeline's step draws from no generator; here a stochastic scheduler draws from the images' own
    generators (a deterministic one, the released DDIM, draws nothing, so the images are the pipeline's)."""
    scheduler = copy.deepcopy(scheduler)
    batch, device = len(generators), transformer.device
    latent_size, latent_channels = transformer.config.sample_size, transformer.config.in_channels
    latents = randn_tensor((batch, latent_channels, latent_size, latent_size), generator=generators,
                           device=device, dtype=transformer.dtype)
    guided = guidance_scale > 1
    latent_model_input = torch.cat([latents] * 2) if guided else latents
    class_labels = class_labels.to(device).reshape(-1)
    class_null = torch.full((batch,), transformer.config.num_embeds_ada_norm, device=device, dtype=torch.int64)
    class_labels_input = torch.cat([class_labels, class_null], 0) if guided else class_labels

    scheduler.set_timesteps(num_inference_steps)
    kwargs = step_kwargs(scheduler, generators + generators if guided else generators, step_args)
    for t in scheduler.timesteps:
        if guided:   # both halves continue from the guided half
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        timesteps = t[None].to(device) if torch.is_tensor(t) else torch.tensor([t], device=device)
        timesteps = timesteps.expand(latent_model_input.shape[0])
        model_output = guided_dit_output(transformer, latent_model_input, timesteps, class_labels_input,
                                         guidance_scale, guide, guide_scale)
        latent_model_input = scheduler.step(model_output, t, latent_model_input, **kwargs).prev_sample
    latents = latent_model_input.chunk(2, dim=0)[0] if guided else latent_model_input
    samples = vae.decode(1 / vae.config.scaling_factor * latents).sample
    return (samples / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [0, 1] -> uint8 (B, H, W, C) on CPU, as the pipelines' numpy_to_pil (in numpy, the
    same float32 arithmetic: ×255, round half to even)."""
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return torch.from_numpy(np.ascontiguousarray((array * 255).round().astype("uint8")))
