"""VAR's training loss: cross-entropy of every token of every scale under teacher forcing.

    loss = mean_b  Σ_t (1/L) · CE(logits[b, t], gt[b, t])        (the official VARTrainer, progressive training off)

with label smoothing `label_smooth` (official default 0.0) and label dropout: each class label is replaced by
the null class with probability `cond_drop_rate` (0.1), which is what teaches the model the unconditional
prediction that classifier-free guidance needs. Random draws (label dropout, drop-path) use the global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var.model import VAR, unwrap
from var.vqvae import VQVAE


def split_scales(tokens_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """All tokens (B, L), coarse to fine -> per-scale indices [(B, pn_k²)] as int64."""
    return list(tokens_BL.long().split([pn * pn for pn in patch_nums], dim=1))


def drop_labels(labels: torch.Tensor, num_classes: int, cond_drop_rate: float) -> torch.Tensor:
    """Replace each label by the null class `num_classes` with probability cond_drop_rate."""
    if cond_drop_rate <= 0:
        return labels
    return torch.where(torch.rand(labels.shape[0], device=labels.device) < cond_drop_rate, num_classes, labels)


def per_token_loss(logits_BLV: torch.Tensor, gt_BL: torch.Tensor, label_smooth: float = 0.0) -> torch.Tensor:
    """(B, L, V) logits, (B, L) targets -> (B, L) cross-entropy."""
    B, L, V = logits_BLV.shape
    return F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL.reshape(-1), label_smoothing=label_smooth,
                           reduction="none").view(B, L)


def var_loss(var: VAR, vae: VQVAE, tokens_BL: torch.Tensor, labels: torch.Tensor,
             label_smooth: float = 0.0, cond_drop_rate: float | None = None) -> torch.Tensor:
    """Scalar training loss of `var` on VQ tokens (B, L) (coarse to fine, as VQVAE.img_to_idxBl concatenated)
    with class labels (B,). cond_drop_rate None = the model's own (0.1 for the releases). `var` may be wrapped
    (DistributedDataParallel, torch.compile): it is called as given, its attributes are read from the model."""
    model = unwrap(var)
    gt_BL = tokens_BL.long()
    # The official trainer builds the teacher-forcing input outside its autocast context (trainer.py train_step).
    with torch.no_grad(), torch.autocast(gt_BL.device.type, enabled=False):
        x_BLCv = vae.quantize.idxBl_to_var_input(split_scales(gt_BL, model.patch_nums))
    p = model.cond_drop_rate if cond_drop_rate is None else cond_drop_rate
    logits = var(drop_labels(labels, model.num_classes, p), x_BLCv)
    loss_weight = torch.full((1, model.L), 1.0 / model.L, device=logits.device)
    return per_token_loss(logits, gt_BL, label_smooth).mul(loss_weight).sum(dim=-1).mean()
