"""θs as a sampling-time guide: the SIMS / autoguidance form of negative extrapolation, next to Neon's weight merge.

Neon extrapolates in weight space once, θneon = (1+w)·θr − w·θs, and samples θneon. The guided sampler instead
keeps both networks and extrapolates their outputs at every network evaluation:

    out = (1+ω)·out_θr − ω·out_θs

(the denoiser for EDM, the flow-map output F for IMM, xAR's flow-head drift, the logits for VAR, the model
output for the diffusers family). This is the guided denoiser of autoguidance (Karras et al. 2024,
NVlabs/edm2@4bf8162 generate_images.py `edm_sampler`: `ref_Dx.lerp(Dx, guidance)` with guidance = 1+ω and the
guiding network in place of ref) and of SIMS (Alemohammad et al. 2024, the synthetic-data model as the guide).
It costs a second network evaluation per step; with ω = 0 the guide is never run.

The core sets the guide up without knowing the family (`with_guide`); a family's sampler takes the declared
argument `guide_scale` (ω, `GUIDE_SCALE`), asks `active_guide` for the network to evaluate and combines the two
outputs with `mix`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from neon.checkpoint import check_state_dict
from neon.errors import NeonError
from neon.family import Arg, Bundle
from neon.fastpaths import copy_module

GUIDE_SCALE = Arg("guide_scale", float, 0.0,
                  "ω of self-guidance: every network output becomes (1+ω)·θr − ω·θs, θs the guide network "
                  "(neon sample --guide); 0 = off, the guide is not evaluated")


def with_guide(bundle: Bundle, theta_s: Mapping[str, torch.Tensor], what: str = "guide") -> Bundle:
    """A copy of `bundle` whose `guide` is `bundle.net`'s architecture carrying θs's weights, in eval mode, on
    `bundle.net`'s device, frozen. theta_s: a state dict with exactly `bundle.net`'s keys and shapes (a
    self-training snapshot, as `neon.checkpoint.load_state_dict` reads it); else one NeonError naming `what`.
    The frozen helpers (VAE, tokenizer) are shared, not copied; `bundle` itself is left as it was."""
    check_state_dict(bundle.net.state_dict(), theta_s, what)
    guide = copy_module(bundle.net, shared=list(bundle.helpers.values()))
    guide.load_state_dict(dict(theta_s), strict=True)
    return dataclasses.replace(bundle, guide=guide.eval().requires_grad_(False))


def active_guide(bundle: Bundle, guide_scale: float) -> torch.nn.Module | None:
    """The network a sampler must evaluate beside `bundle.net`: None when ω = 0 (no guidance, no extra cost),
    else `bundle.guide`; ω ≠ 0 on a bundle without a guide is one NeonError."""
    if float(guide_scale) == 0:
        return None
    if bundle.guide is None:
        raise NeonError(f"guide_scale={guide_scale}: no guide network is set (neon sample --guide CKPT)")
    return bundle.guide


def mix(out_r: torch.Tensor, out_s: torch.Tensor, guide_scale: float) -> torch.Tensor:
    """(1+ω)·out_r − ω·out_s, written as out_r + ω·(out_r − out_s) so that a guide with θr's own output leaves
    out_r exactly unchanged. Both outputs have the same shape and dtype."""
    return out_r + guide_scale * (out_r - out_s)
