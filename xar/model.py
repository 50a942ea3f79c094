"""The xAR network (Ren et al., "Beyond Next-Token: Next-X Prediction", the cell variant released as xAR-B/L/H).

The 16x16 grid of VAE latent tokens is split into `clusters` = 4 cells of 8x8 tokens, generated one cell after
another. Every cell carries its own flow-matching time: the network sees the (noisy) earlier cells and the
current noisy cell and predicts the velocity noise - x of every token. An encoder and a decoder stack of adaLN
blocks (one condition vector = class + time embedding per cell) run over the cells with a block-causal mask:
a token attends to every token of its own cell and of the earlier cells.

Parameter and buffer names are those of OliverRensu/xAR models/xar.py, so the released state dicts (with their
`mask` and `rope.*` buffers) load strictly.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from xar.layers import Block, RMSNorm, TimestepEmbedder


@dataclasses.dataclass(frozen=True)
class XARConfig:
    """The official constructor's arguments (norm_layer and diffusion_batch_mul are accepted there but unused)."""
    img_size: int = 256               # image side in pixels
    vae_stride: int = 16              # VAE downsampling: the latent grid is img_size / vae_stride = 16 wide
    patch_size: int = 1               # latent tokens per patch side (the released models use 1)
    encoder_embed_dim: int = 1024     # transformer width (encoder and decoder must match)
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0            # GeGLU hidden width = int(dim * mlp_ratio * 2/3)
    vae_embed_dim: int = 16           # latent channels per token
    label_drop_prob: float = 0.1      # classifier-free guidance training: label -> null class with this probability
    class_num: int = 1000             # real classes; the class embedding has one more row, the null class
    attn_dropout: float = 0.0         # the release pipeline trains (and builds) with 0.1
    proj_dropout: float = 0.0
    clusters: int = 4                 # cells; must be a square number

    @property
    def grid(self) -> int:            # latent tokens per side
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid ** 2

    @property
    def cell_tokens(self) -> int:     # tokens per cell (64 at release)
        return self.seq_len // self.clusters

    def check(self) -> XARConfig:
        side = math.isqrt(self.clusters)
        if self.patch_size != 1:
            raise ValueError("xAR: only patch_size=1 exists in the official code")
        if side * side != self.clusters or self.grid % side:
            raise ValueError(f"xAR: {self.clusters} cells do not tile a {self.grid}x{self.grid} latent grid")
        if self.encoder_embed_dim != self.decoder_embed_dim:
            raise ValueError("xAR: the decoder's adaLN reads the encoder-width condition; widths must match")
        return self


# The release builders fix only the widths, depths and heads; the eval / training scripts add dropout 0.1.
RELEASE_ARGS = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, label_drop_prob=0.1,
                    class_num=1000, attn_dropout=0.1, proj_dropout=0.1, mlp_ratio=4.0)
CONFIGS = {
    "xar_base": XARConfig(encoder_embed_dim=768, encoder_depth=8, encoder_num_heads=12,
                          decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=12, **RELEASE_ARGS),
    "xar_large": XARConfig(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                           decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, **RELEASE_ARGS),
    "xar_huge": XARConfig(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                          decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, **RELEASE_ARGS),
}


def to_cells(z: torch.Tensor, clusters: int) -> torch.Tensor:
    """Latent (B, C, H, W) -> tokens (B, H*W, C) in cell-major order: cells row-major over the grid of cells,
    tokens row-major inside a cell (the official `clusterify`, stacked)."""
    B, C, H, W = z.shape
    side = math.isqrt(clusters)
    p, q = H // side, W // side
    return z.reshape(B, C, side, p, side, q).permute(0, 2, 4, 3, 5, 1).reshape(B, H * W, C)


def from_cells(tokens: torch.Tensor, clusters: int) -> torch.Tensor:
    """Inverse of `to_cells`: tokens (B, H*W, C) -> latent (B, C, H, W) for a square grid."""
    B, L, C = tokens.shape
    side, grid = math.isqrt(clusters), math.isqrt(L)
    p = grid // side
    return tokens.reshape(B, side, side, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, grid, grid)


def block_causal_mask(seq_len: int, clusters: int) -> torch.Tensor:
    """(1, 1, L, L) float: 0 where a token may attend (its own cell and every earlier cell), -inf elsewhere."""
    cell = torch.arange(seq_len) // (seq_len // clusters)
    allowed = cell[None, :] <= cell[:, None]
    return torch.zeros(seq_len, seq_len).masked_fill(~allowed, float("-inf"))[None, None]


class LayerKV:
    """One attention layer's key/value buffers for the sampler's KV cache, allocated on first write (in the
    dtype the layer computes in, which autocast decides)."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len
        self.k = self.v = None

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, heads, N, head_dim) at positions [start, start + N); return all keys/values so far."""
        B, H, N, Dh = k.shape
        if self.k is None or self.k.dtype != k.dtype:
            self.k = k.new_empty(self.batch, H, self.seq_len, Dh)
            self.v = v.new_empty(self.batch, H, self.seq_len, Dh)
        self.k[:B, :, start:start + N] = k
        self.v[:B, :, start:start + N] = v
        return self.k[:B, :, :start + N], self.v[:B, :, :start + N]


class KVCache:
    """Keys/values of the finished cells for every attention layer (encoder then decoder).

    The first `length` tokens are final. A call must start there; afterwards every token it fed except the
    last cell (the one being generated, overwritten by the next call) is final — the official rule "the cache
    keeps all but the last 64 tokens".
    """

    def __init__(self, num_layers: int, batch: int, seq_len: int):
        self.layers = [LayerKV(batch, seq_len) for _ in range(num_layers)]
        self.length = 0


class XAR(nn.Module):
    def __init__(self, cfg: XARConfig):
        super().__init__()
        self.cfg = cfg.check()
        D, L = cfg.encoder_embed_dim, cfg.seq_len
        # Registration order reproduces the official state_dict key order.
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, cfg.decoder_embed_dim))
        self.register_buffer("mask", block_causal_mask(L, cfg.clusters))
        self.class_emb = nn.Embedding(cfg.class_num + 1, D)   # row class_num: the null (unconditional) class
        self.time_embed = TimestepEmbedder(D)
        self.z_proj = nn.Linear(cfg.vae_embed_dim, D)
        self.z_proj_ln = RMSNorm(D, weight=True)
        grid_pos = torch.stack(torch.meshgrid(torch.arange(cfg.grid), torch.arange(cfg.grid), indexing="ij"))
        rows, cols = to_cells(grid_pos[None], cfg.clusters)[0].unbind(-1)   # grid row / column of each token
        block = dict(rows=rows, cols=cols, attn_drop=cfg.attn_dropout, proj_drop=cfg.proj_dropout)
        self.encoder_blocks = nn.ModuleList(Block(D, cfg.encoder_num_heads, cfg.mlp_ratio, **block)
                                            for _ in range(cfg.encoder_depth))
        self.encoder_norm = RMSNorm(D, weight=True)
        self.decoder_embed = nn.Linear(D, cfg.decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, **block)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = RMSNorm(cfg.decoder_embed_dim, weight=True)
        self.pred = nn.Linear(cfg.decoder_embed_dim, cfg.vae_embed_dim)
        self.initialize_weights()

    @property
    def null_label(self) -> int:
        return self.cfg.class_num

    @property
    def cell_tokens(self) -> int:
        return self.cfg.cell_tokens

    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform linears with zero bias, N(0, 0.02) embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.class_emb.weight, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(len(self.encoder_blocks) + len(self.decoder_blocks), batch, self.cfg.seq_len)

    def condition(self, labels: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """labels (B,) int in [0, class_num]; timesteps (B, C) int in [0, 1000], one per cell -> (B, C, D)."""
        B, C = timesteps.shape
        return self.class_emb(labels)[:, None] + self.time_embed(timesteps.reshape(-1)).view(B, C, -1)

    def _mask(self, start: int, n: int) -> torch.Tensor | None:
        if n == self.cell_tokens:   # queries of one whole cell see every earlier token: nothing to mask
            return None
        return self.mask[0, 0, start:start + n, :start + n] == 0

    def forward_encoder(self, x: torch.Tensor, cond: torch.Tensor, start: int = 0,
                        cache: KVCache | None = None) -> torch.Tensor:
        """Noisy tokens (B, N, vae_embed_dim) at positions [start, start + N) -> encoder features (B, N, D)."""
        n = x.shape[1]
        mask = self._mask(start, n)
        h = self.z_proj_ln(self.z_proj(x) + self.encoder_pos_embed_learned[:, start:start + n])
        for i, blk in enumerate(self.encoder_blocks):
            h = blk(h, cond, start, mask, cache.layers[i] if cache is not None else None)
        return self.encoder_norm(h)

    def forward_decoder(self, h: torch.Tensor, cond: torch.Tensor, start: int = 0,
                        cache: KVCache | None = None) -> torch.Tensor:
        """Encoder features (B, N, D) -> velocity (B, N, vae_embed_dim)."""
        n, offset = h.shape[1], len(self.encoder_blocks)
        mask = self._mask(start, n)
        h = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, start:start + n]
        for i, blk in enumerate(self.decoder_blocks):
            h = blk(h, cond, start, mask, cache.layers[offset + i] if cache is not None else None)
        return self.pred(self.decoder_norm(h))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, timesteps: torch.Tensor, start: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """Velocity of whole cells.

        x: (B, N, vae_embed_dim) tokens at positions [start, start + N) of the cell-major order, N = C cells;
        labels: (B,) int (class_num = null class); timesteps: (B, C) int, the time of each cell times 1000.
        With a cache, the keys of positions [0, start) are read from it and this call's keys are written to it.
        Returns (B, N, vae_embed_dim).
        """
        if cache is not None and start != cache.length:
            raise ValueError(f"xAR KV cache holds {cache.length} final tokens; a call cannot start at {start}")
        cond = self.condition(labels, timesteps)
        v = self.forward_decoder(self.forward_encoder(x, cond, start, cache), cond, start, cache)
        if cache is not None:
            cache.length = start + x.shape[1] - self.cell_tokens
        return v


def build(name_or_cfg: str | XARConfig, **overrides) -> XAR:
    cfg = CONFIGS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    return XAR(dataclasses.replace(cfg, **overrides))


def config_from_state_dict(sd: dict[str, torch.Tensor], **release_args) -> XARConfig:
    """Read the architecture off a state dict (the release files store no config).

    Heads follow from the RoPE table (`rope.freqs` has head_dim / 4 entries), the MLP ratio from the GeGLU
    width. Arguments that leave no trace in the weights (dropout, label_drop_prob, img_size and vae_stride
    beyond the token grid) take the release values unless given. Raises KeyError if a key xAR has is missing.
    """
    args = {**RELEASE_ARGS, **release_args}
    D, Dd = sd["z_proj.weight"].shape[0], sd["pred.weight"].shape[1]
    hidden = sd["encoder_blocks.0.mlp.fc1_g.weight"].shape[0]
    if int(D * args["mlp_ratio"] * 2 / 3) != hidden:
        args["mlp_ratio"] = hidden * 3 / (2 * D)

    def depth(stack: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(stack + ".")})

    def heads(stack: str, width: int) -> int:
        return width // (4 * sd[f"{stack}.0.attn.rope.freqs"].shape[0])

    return XARConfig(**{**args, "encoder_embed_dim": D, "encoder_depth": depth("encoder_blocks"),
                        "encoder_num_heads": heads("encoder_blocks", D), "decoder_embed_dim": Dd,
                        "decoder_depth": depth("decoder_blocks"), "decoder_num_heads": heads("decoder_blocks", Dd),
                        "vae_embed_dim": sd["z_proj.weight"].shape[1],
                        "class_num": sd["class_emb.weight"].shape[0] - 1})
