"""The flow-matching objective of diffusers' SD3 training scripts (examples/dreambooth/train_dreambooth_sd3.py and
train_dreambooth_lora_sd3.py; Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 2-3):

    t ~ a density over the training timesteps (logit-normal by default), σ = the scheduler's σ at t,
    x_t = (1 − σ) x_0 + σ ε,   v = transformer(x_t, t, text),
    loss = weighting(σ) · ‖v − (ε − x_0)‖²,  or, with precondition_outputs (the scripts' default, after EDM Sec. 5),
    loss = weighting(σ) · ‖(x_t − σ v) − x_0‖² = weighting(σ) · σ² · ‖v − (ε − x_0)‖².
"""
from __future__ import annotations

import diffusers
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from neon.errors import NeonError, shown

# The scripts' --weighting_scheme choices: how t is drawn (logit_normal, mode) or how the loss is weighted
# (sigma_sqrt, cosmap; t then uniform).
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap")
# The scripts' defaults: --weighting_scheme logit_normal --logit_mean 0 --logit_std 1 --mode_scale 1.29
# --precondition_outputs 1.
DEFAULTS = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                precondition_outputs=True)


def training_schedule(scheduler) -> diffusers.FlowMatchEulerDiscreteScheduler:
    """The scripts' `noise_scheduler_copy`: FlowMatchEulerDiscreteScheduler from the pipeline scheduler's config,
    fresh (its 1000 training σ, shifted as the config says; never a sampler's set_timesteps)."""
    if "shift" not in scheduler.config:
        raise NeonError(f"text2image loss: {type(scheduler).__name__} is not a flow-matching scheduler (no shift); "
                        "SD3's training objective needs one")
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)


def check_recipe(weighting_scheme: str, logit_std: float) -> None:
    """One line naming the loss argument that the scripts' own argparse (choices) or torch.normal would refuse."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise NeonError(f"finetune.loss_args.weighting_scheme: one of {', '.join(WEIGHTING_SCHEMES)}, got "
                        f"{shown(weighting_scheme)}")
    if not logit_std > 0:
        raise NeonError(f"finetune.loss_args.logit_std: must be positive, got {shown(logit_std)}")


def flow_matching_loss(net, train: diffusers.FlowMatchEulerDiscreteScheduler, x0: torch.Tensor, cond: dict,
                       weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29, precondition_outputs: bool = True) -> torch.Tensor:
    """x0: (B, C, H, W) float, the VAE latents (mean − shift_factor) × scaling_factor. cond: the transformer's
    encoder_hidden_states (B, L, joint_attention_dim) and pooled_projections (B, pooled_projection_dim). Random
    draws (ε, then t) from the global torch RNG, in the scripts' order. Returns the scalar mean over the batch."""
    check_recipe(weighting_scheme, logit_std)
    noise = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=x0.shape[0],
                                              logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    # The scripts look each drawn timestep up in the schedule; its timesteps are distinct, so that index is this.
    # The 'mode' density can draw u = 1, one past the last index, where the scripts fail: the last step instead.
    indices = (u * train.config.num_train_timesteps).long().clamp(max=train.config.num_train_timesteps - 1)
    timesteps = train.timesteps[indices].to(x0.device)
    sigmas = train.sigmas[indices].to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    pred = net(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]
    if precondition_outputs:   # the network's x_0 estimate along the straight path, against x_0
        pred, target = pred * (-sigmas) + noisy, x0
    else:                      # the velocity dx_t/dσ, against ε − x_0
        target = noise - x0
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    per_image = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1).mean(1)
    return per_image.mean()
