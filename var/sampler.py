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

With a guide θs and guide_scale ω ≠ 0, step 2's logits become (1+ω)·ℓ_θr − ω·ℓ_θs, each network's logits guided
by CFG first (`guided_logits`). θs runs on the same token maps with its own embeddings and its own key/value
cache (`Branch`), at twice the cost (neon.guidance).

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

from neon.guidance import mix
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


class Branch:
    """One network's state along the scales: the conditioning of its [cond; uncond] rows (2B, C), the token
    inputs of the next scale, its own key/value cache (or, without one, the inputs seen so far)."""

    def __init__(self, var: VAR, labels: torch.Tensor, use_cache: bool = True):
        self.var = var
        self.cond = var.class_cond(torch.cat((labels, torch.full_like(labels, var.num_classes))))
        self.x = var.first_tokens(self.cond)                                               # (2B, first_l, C)
        self.caches = [KVCache() for _ in var.blocks] if use_cache else None
        self.seen: list[torch.Tensor] = []                   # token inputs so far (no-cache path only)

    def logits(self, pn: int, t: float) -> torch.Tensor:
        """CFG-guided logits (B, pn², V) of the current scale: (1+t)·cond − t·uncond."""
        var = self.var
        if self.caches is not None:
            logits = var.backbone(self.x, self.cond, caches=self.caches)
        else:
            self.seen.append(self.x)
            seq = torch.cat(self.seen, dim=1)
            logits = var.backbone(seq, self.cond, mask=var.block_causal_mask(seq.shape[1]), last=pn * pn)
        B = logits.shape[0] // 2
        return (1 + t) * logits[:B] - t * logits[B:]

    def advance(self, next_map: torch.Tensor, si: int) -> None:
        """Token inputs of scale si + 1 from the area-downsampled f_hat (B, Cvae, pn, pn), for both row halves."""
        self.x = self.var.next_tokens(next_map.flatten(2).transpose(1, 2), si + 1).repeat(2, 1, 1)


def guided_logits(branches: Sequence[Branch], pn: int, t: float, guide_scale: float = 0.0) -> torch.Tensor:
    """The logits the tokens are drawn from: θr's CFG logits (branches[0]), or with a guide branch
    (1+ω)·ℓ_θr − ω·ℓ_θs. Self-guidance acts on each network's CFG-combined logits, both with the same t, so the
    guide corrects the distribution the sampler would otherwise draw from."""
    logits = branches[0].logits(pn, t)
    if len(branches) == 1:
        return logits
    return mix(logits, branches[1].logits(pn, t), guide_scale)


@torch.no_grad()
def sample(var: VAR, vae: VQVAE, labels: torch.Tensor, generators: Sequence[torch.Generator],
           cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
           use_cache: bool = True, on_stage: Callable[[int, dict], None] | None = None,
           guide: VAR | None = None, guide_scale: float = 0.0) -> torch.Tensor:
    """Class labels (B,) in [0, num_classes] (num_classes = null class) + one generator per image -> images
    (B, 3, H, W) float in [0, 1].

    cfg: guidance at the last scale (ramped linearly from 0); top_k, top_p: filters (0 = off); more_smooth: use
    Gumbel-softmax-weighted code vectors (the official visualisation option, not used for FID); use_cache: False
    recomputes all earlier scales at every step with the block-causal mask (the reference for benchmarks);
    on_stage(k, {'logits': guided logits (B, l, V) before filtering, 'idx': (B, l), 'f_hat': (B, Cvae, P, P)});
    guide, guide_scale: θs (eval mode) and ω of self-guidance (`guided_logits`); None: θr alone.
    """
    B = labels.shape[0]
    if len(generators) != B:
        raise ValueError(f"{B} labels but {len(generators)} generators")
    device = labels.device
    S, P, V = len(var.patch_nums), var.patch_nums[-1], var.V
    quant = vae.quantize
    branches = [Branch(m, labels, use_cache) for m in ([var] if guide is None else [var, guide])]
    f_hat = branches[0].cond.new_zeros(B, var.Cvae, P, P, dtype=torch.float32)

    for si, pn in enumerate(var.patch_nums):
        ratio = si / (S - 1)
        guided = guided_logits(branches, pn, cfg * ratio, guide_scale)
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
            for branch in branches:
                branch.advance(next_map, si)

    return vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
