"""VAR checkpoint files: read (official releases, Neon's files, this project's), infer the configuration from the
tensors' shapes, build the networks and load them strictly; write plain state dicts atomically.

Containers. Every official file is a plain state dict (`torch.save(model.state_dict())`): `vae_ch160v4096z32.pth`,
`var_d16.pth` .. `var_d36.pth`, and Neon's training snapshots. Neon's `calculate_fid.py` also accepts a trainer
checkpoint, `{'trainer': {'var_wo_ddp': ...}}`; other wrappers (`model`, `state_dict`, ...) are unwrapped too.
Files are read with `weights_only=True`: nothing in them is executed.

Configuration. depth, width, heads, vocabulary, Cvae, num_classes, mlp_ratio, shared_aln and attn_l2_norm come
from the shapes; drop_path_rate is the official builder's 0.1·depth/24. patch_nums come from the stored
`lvl_1L` (the scale of every token) when its values are there, else from L and the number of scales matched
against the two release layouts; when neither works the caller must say (`patch_nums=`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from neon.checkpoint import atomic_save, load_strict, unwrap_state_dict
from neon.errors import NeonError
from var.model import VAR, level_index
from var.vqvae import VQVAE

# Official patch_nums (models/__init__.py default and utils/arg_util.py's '--pn' map).
RELEASE_PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),   # var_d16 .. var_d30
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # var_d36 (d36-s)
}
WRAPPER_KEYS = ("trainer", "var_wo_ddp", "vae_local", "model", "state_dict", "module", "net")

Shapes = Mapping[str, tuple]


def read_state_dict(path: str, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load `path` safely and unwrap it to a flat name -> tensor dict."""
    if not os.path.isfile(path):
        raise NeonError(f"{what} {path!r} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NeonError(f"{what} {path!r} is not a readable torch checkpoint ({first[:160]})") from None
    return unwrap_container(obj, f"{what} {path!r}")


def unwrap_container(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict, possibly nested under wrapper keys (e.g. {'trainer': {'var_wo_ddp': sd}}) -> the state dict."""
    return unwrap_state_dict(obj, WRAPPER_KEYS, where)[1]


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _need(shapes: Shapes, key: str, what: str) -> tuple:
    if key not in shapes:
        raise NeonError(f"not a {what} state dict: key {key!r} is missing")
    return shapes[key]


# ---------------------------------------------------------------------------------------------------------
def patch_nums_from_levels(lvl_1L: torch.Tensor) -> tuple[int, ...]:
    """(1, L) scale index of every token -> patch_nums (each scale's token count must be a square)."""
    counts = torch.bincount(lvl_1L.reshape(-1).long()).tolist()
    pns = tuple(math.isqrt(c) for c in counts)
    if any(pn * pn != c or c == 0 for pn, c in zip(pns, counts)):
        raise NeonError(f"lvl_1L does not describe square token maps (tokens per scale {counts})")
    return pns


def infer_patch_nums(shapes: Shapes, lvl_1L: torch.Tensor | None = None) -> tuple[int, ...]:
    L = _need(shapes, "pos_1LC", "VAR")[1]
    S = _need(shapes, "lvl_embed.weight", "VAR")[0]
    if lvl_1L is not None and lvl_1L.device.type != "meta":
        pns = patch_nums_from_levels(lvl_1L)
        if len(pns) == S and sum(p * p for p in pns) == L:
            return pns
    matches = [pns for pns in RELEASE_PATCH_NUMS.values() if len(pns) == S and sum(p * p for p in pns) == L]
    if len(matches) == 1:
        return matches[0]
    raise NeonError(f"cannot infer patch_nums of a VAR with {S} scales and L={L} tokens; pass patch_nums=")


def infer_var_kwargs(shapes: Shapes, lvl_1L: torch.Tensor | None = None, patch_nums=None) -> dict:
    """VAR constructor arguments from a state dict's shapes (and lvl_1L's values, if at hand)."""
    C, Cvae = _need(shapes, "word_embed.weight", "VAR")
    V = _need(shapes, "head.weight", "VAR")[0]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    if depth == 0:
        raise NeonError("not a VAR state dict: no blocks.* keys")
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in shapes
    num_heads = shapes["blocks.0.attn.scale_mul_1H11"][1] if attn_l2_norm else max(C // 64, 1)  # head_dim 64
    if patch_nums is None:
        patch_nums = infer_patch_nums(shapes, lvl_1L)
    return dict(
        vocab_size=V, Cvae=Cvae,
        num_classes=_need(shapes, "class_emb.weight", "VAR")[0] - 1,
        depth=depth, embed_dim=C, num_heads=num_heads,
        mlp_ratio=_need(shapes, "blocks.0.ffn.fc1.weight", "VAR")[0] / C,
        drop_path_rate=0.1 * depth / 24,       # official build_vae_var; used only when training
        norm_eps=1e-6, shared_aln="shared_ada_lin.1.weight" in shapes, cond_drop_rate=0.1,
        attn_l2_norm=attn_l2_norm, patch_nums=tuple(int(p) for p in patch_nums),
    )


def infer_vqvae_kwargs(shapes: Shapes, patch_nums) -> dict:
    """VQVAE constructor arguments from a state dict's shapes; patch_nums come from the VAR it serves."""
    V, z = _need(shapes, "quantize.embedding.weight", "VQVAE")
    ch = _need(shapes, "encoder.conv_in.weight", "VQVAE")[0]
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    phis = [k for k in shapes if k.startswith("quantize.quant_resi.") and k.endswith(".weight")]
    if any(".qresi_ls." in k for k in phis):
        share = len(phis)
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in phis):
        share = 1
    else:
        share = 0 if phis else 4
    return dict(
        vocab_size=V, z_channels=z, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        using_sa=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in shapes,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in shapes,
        quant_conv_ks=_need(shapes, "quant_conv.weight", "VQVAE")[-1],
        quant_resi=0.5 if phis else 0.0, share_quant_resi=share,
        default_qresi_counts=len(phis) if share == 0 else 0,
        v_patch_nums=tuple(patch_nums),
    )


# ---------------------------------------------------------------------------------------------------------
def build(cls, kwargs: dict, device: torch.device | str = "meta") -> torch.nn.Module:
    with torch.device(device):
        return cls(**kwargs)


# VQVAE.load_state_dict keeps its own ema_vocab_hit_SV when the number of scales differs.
ANY_SHAPE = ("quantize.ema_vocab_hit_SV",)


def load_var(path: str, device: torch.device | str = "cpu", patch_nums=None, **overrides) -> tuple[VAR, dict]:
    """A VAR checkpoint file -> (VAR in eval mode on device, its constructor kwargs)."""
    sd = read_state_dict(path, "VAR checkpoint")
    kwargs = infer_var_kwargs(shapes_of(sd), sd.get("lvl_1L"), patch_nums)
    kwargs.update(overrides)
    var = load_strict(lambda: VAR(**kwargs), sd, f"VAR checkpoint {path!r} does not match the model")
    if not torch.equal(var.lvl_1L.cpu(), level_index(var.patch_nums)):   # the mask is derived from lvl_1L
        raise NeonError(f"VAR checkpoint {path!r}: its lvl_1L is not the token layout of patch_nums {var.patch_nums}")
    return var.to(device).eval(), kwargs


def load_vqvae(path: str, patch_nums, device: torch.device | str = "cpu") -> tuple[VQVAE, dict]:
    """A VQVAE checkpoint file -> (frozen VQVAE on device, its constructor kwargs)."""
    sd = read_state_dict(path, "VQVAE checkpoint")
    kwargs = infer_vqvae_kwargs(shapes_of(sd), patch_nums)
    vae = load_strict(lambda: VQVAE(**kwargs), sd, f"VQVAE checkpoint {path!r} does not match the model", ANY_SHAPE)
    return vae.to(device).eval().requires_grad_(False), kwargs


def save_state_dict(module: torch.nn.Module, path: str) -> None:
    """Write module.state_dict() as a plain state dict (the official container), atomically."""
    atomic_save({k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}, path)
