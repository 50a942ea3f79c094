"""VAR's sampler: next-scale prediction with classifier-free guidance, top-k / top-p filtering and an optional
Gumbel smoothing, the equivalent of the official `VAR.autoregressive_infer_cfg`, with one generator per image.

Per scale k = 0..K-1 (ratio r = k/(K-1)):
  1. run the transformer on the new tokens of scale k for the conditional and the unconditional (null-class)
     rows, attending to the cached keys/values of all coarser scales;
  2. guided logits = (1+t)·cond - t·uncond with t = cfg·r, so guidance ramps from 0 at the first scale to cfg
     at the last;
  3. top-k, then top-p on the top-k-filtered logits; draw one token per position;
  4. add the looked-up code map (φ-refined, upsampled) to f_hat; area-downsample f_hat to the next scale's size
     as the next input.
The image is the VQVAE decoding of the final f_hat, mapped from [-1, 1] to [0, 1].

Randomness: the official code draws every token of the batch from one generator (`torch.multinomial` over all
B·l rows, seeded once per call), so an official image depends on its position in the batch and on the batch
size. Here image i's draws all come from generators[i]: per scale, l = pn² uniforms (and, with more_smooth,
l·V exponentials for the Gumbel noise), turned into tokens by inverse-CDF sampling. The distribution of every
token is exactly the official one; the stream of random numbers is not, so for top_k != 1 an image here is not
bit-identical to the official image of the same `g_seed`. With top_k = 1 (greedy) both are the argmax, and the
reference outputs are reproduced exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from var.model import VAR, KVCache
from var.vqvae import VQVAE


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits (..., V) outside the top-k and then outside the nucleus of mass top_p with -inf.

    top_k keeps every logit >= the k-th largest (ties at the threshold are kept); 0 = off. top_p is applied to the
    already top-k-filtered logits: in ascending order, entries whose cumulative probability is <= 1 - top_p are
    dropped, the largest is always kept; 0 = off. Kept values are unchanged.
    """
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1, largest=True, sorted=False).values.amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits


def draw_per_image(generators: Sequence[torch.Generator], l: int, V: int, gumbel: bool, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For each image, l uniforms in [0, 1) (float64) and, if gumbel, l·V exponentials, from its own generator.
    -> u (B, l), exponentials (B, l, V) or None."""
    u, e = [], []
    for g in generators:
        u.append(torch.rand(l, generator=g, device=device, dtype=torch.float64))
        if gumbel:
            e.append(torch.empty(l, V, device=device).exponential_(generator=g))
    return torch.stack(u), (torch.stack(e) if gumbel else None)


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (B, l, V) >= 0, u (B, l) uniform in [0, 1) -> token (B, l) int64.
    A token of probability zero is never chosen (so a one-hot distribution gives its argmax for any u)."""
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    # u·total can round up to the total itself; fall back to the last token that has any probability.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last)


@torch.no_grad()
def sample(var: VAR, vae: VQVAE, labels: torch.Tensor, generators: Sequence[torch.Generator],
           cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
           use_cache: bool = True, on_stage: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """Class labels (B,) in [0, num_classes] (num_classes = null class) + one generator per image -> images
    (B, 3, H, W) float in [0, 1].

    cfg: guidance at the last scale (ramped linearly from 0); top_k, top_p: filters (0 = off); more_smooth: use
    Gumbel-softmax-weighted code vectors (the official visualisation option, not used for FID); use_cache: False
    recomputes all earlier scales at every step with the block-causal mask (the reference for benchmarks);
    on_stage(k, {'logits': guided logits (B, l, V) before filtering, 'idx': (B, l), 'f_hat': (B, Cvae, P, P)}).
    """
    B = labels.shape[0]
    if len(generators) != B:
        raise ValueError(f"{B} labels but {len(generators)} generators")
    device = labels.device
    S, P, V = len(var.patch_nums), var.patch_nums[-1], var.V
    quant = vae.quantize
    cond = var.class_cond(torch.cat((labels, torch.full_like(labels, var.num_classes))))   # [cond; uncond]
    x = var.first_tokens(cond)                                                             # (2B, first_l, C)
    caches = [KVCache() for _ in var.blocks] if use_cache else None
    seen = []                                                # token inputs so far (no-cache path only)
    f_hat = cond.new_zeros(B, var.Cvae, P, P, dtype=torch.float32)

    for si, pn in enumerate(var.patch_nums):
        ratio = si / (S - 1)
        if use_cache:
            logits = var.backbone(x, cond, caches=caches)
        else:
            seen.append(x)
            seq = torch.cat(seen, dim=1)
            logits = var.backbone(seq, cond, mask=var.block_causal_mask(seq.shape[1]), last=pn * pn)
        t = cfg * ratio
        guided = (1 + t) * logits[:B] - t * logits[B:]
        filtered = top_k_top_p_filter(guided, top_k, top_p)

        u, expo = draw_per_image(generators, pn * pn, V, more_smooth, device)
        idx = categorical(filtered.softmax(dim=-1), u)
        if not more_smooth:
            h = quant.embedding(idx)                                                       # (B, l, Cvae)
        else:
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)     # sharper towards the finer scales (as MaskGIT)
            soft = ((filtered * (1 + ratio) - expo.log()) / tau).softmax(dim=-1)
            h = torch.bmm(soft, quant.embedding.weight.expand(B, -1, -1))
        # contiguous: PyTorch's channels-last kernels give batch-size-dependent last bits (see var.invariant)
        h = h.transpose(1, 2).reshape(B, var.Cvae, pn, pn).contiguous()
        f_hat, next_map = quant.next_autoregressive_input(si, f_hat, h)
        if on_stage is not None:
            on_stage(si, {"logits": guided, "idx": idx, "f_hat": f_hat.clone()})
        if next_map is not None:
            x = var.next_tokens(next_map.flatten(2).transpose(1, 2), si + 1).repeat(2, 1, 1)

    return vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
