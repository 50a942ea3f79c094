"""The EDM networks (Karras et al. 2022): DDPM++/NCSN++ (SongUNet), ADM (DhariwalUNet) and the four
preconditioners (EDM, VP, VE, iDDPM), written to load the official snapshots strictly.

Constructor arguments, attribute names (hence state-dict keys) and the order of floating-point operations follow
NVlabs/edm `training/networks.py`, so a released `ema` state dict loads with `strict=True` and the forward pass
agrees with the official one to float32 rounding (bit-exact on CPU for SongUNet). Details that matter:
- SongUNet swaps the [cos, sin] halves of its noise embedding to [sin, cos] and scales the one-hot label by
  sqrt(label_dim); DhariwalUNet does neither.
- The qkv projection's output channels are interleaved as (head, channel, {q, k, v}).
- The attention softmax is computed in float32 whatever the activation dtype.
- Bias adds are separate ops after the matmul / convolution (not fused), as in the official code.

Shapes: images x (B, C, H, W) float; sigma (B,) or a 0-dim tensor; class_labels (B, label_dim) one-hot float;
augment_labels (B, augment_dim) float in about [-1, 1] (see edm/augment.py).
"""
from __future__ import annotations

import math

import torch
from torch.nn.functional import silu

# ---------------------------------------------------------------------------------------------------------
# Initialisation: used when a network is built from scratch (tests, `tiny()`); loading overwrites it.

def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random weights of `shape` with the official init modes (drawn from the global torch RNG)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r}")


# ---------------------------------------------------------------------------------------------------------
# Layers.

class Linear(torch.nn.Module):
    """y = x @ W^T + b, with W stored as (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))   # in place, as upstream: the product is a fresh tensor
        return x


class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up- or downsampling by a separable FIR filter.

    Without `fused_resample` the resampling runs first (depthwise, on the input channels), then the convolution.
    kernel=0 gives a pure resampling layer without weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False,
                 resample_filter=(1, 1),          # 1-D FIR taps; [1,1] = box (DDPM++), [1,3,3,1] (NCSN++)
                 fused_resample: bool = False,    # convolve and resample in one strided/transposed conv pair
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()   # (1, 1, k, k), sums to 1
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv, conv_t = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d

        if self.fused_resample and self.up and w is not None:
            x = conv_t(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                       padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv(x, w, padding=w_pad + f_pad)
            x = conv(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:  # the filter times 4 keeps the mean: [1,1] gives nearest-neighbour x2
                x = conv_t(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                           padding=f_pad)
            if self.down:
                x = conv(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))   # in place, as upstream (x is the convolution's own output)
        return x


class GroupNorm(torch.nn.Module):
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax over keys of q^T k / sqrt(c), in float32. q, k: (N, c, L) -> (N, L_q, L_k) in q's dtype."""
    scale = math.sqrt(k.shape[1])
    w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / scale).to(torch.float32))
    return w.softmax(dim=2).to(q.dtype)


class UNetBlock(torch.nn.Module):
    """Residual block (GroupNorm-SiLU-conv twice, noise embedding injected in between), optional 2x resampling
    and optional multi-head self-attention; the union of the DDPM++, NCSN++ and ADM blocks."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False,
                 num_heads: int | None = None,   # None: out_channels // channels_per_head
                 channels_per_head: int = 64,
                 dropout: float = 0,
                 skip_scale: float = 1,          # output multiplier; sqrt(0.5) in DDPM++/NCSN++
                 eps: float = 1e-5,              # GroupNorm epsilon
                 resample_filter=(1, 1),
                 resample_proj: bool = False,    # 1x1 conv on the skip path even when only resampling
                 adaptive_scale: bool = True,    # ADM: emb gives (scale, shift); DDPM++: emb is added
                 init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))   # fused multiply-add, as the official code
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)   # x is conv1's output: in place is safe
        x = x * self.skip_scale

        if self.num_heads:
            # qkv channels are laid out as (head, channel, {q,k,v}).
            qkv = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------------------
# Noise-level embeddings.

class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of a scalar: [cos(x f_i), sin(x f_i)], f_i = (1/max_positions)^(i/d),
    d = num_channels/2 - 1 with `endpoint` (DDPM++) else num_channels/2 (ADM). x: (B,) -> (B, num_channels)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of a scalar (NCSN++): [cos(2π x f), sin(2π x f)], f ~ N(0, scale²) fixed."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ---------------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++ (Song et al. 2021), as re-implemented by EDM.

class SongUNet(torch.nn.Module):
    def __init__(self,
                 img_resolution: int,                # image side at input and output
                 in_channels: int,                   # colour channels at input
                 out_channels: int,                  # colour channels at output
                 label_dim: int = 0,                 # number of classes, 0 = unconditional
                 augment_dim: int = 0,               # augmentation label size, 0 = no augmentation conditioning
                 model_channels: int = 128,          # base channel count
                 channel_mult=(1, 2, 2, 2),          # channel multiplier per resolution level
                 channel_mult_emb: int = 4,          # embedding size = model_channels * channel_mult_emb
                 num_blocks: int = 4,                # residual blocks per level
                 attn_resolutions=(16,),             # resolutions with self-attention
                 dropout: float = 0.10,              # dropout on intermediate activations
                 label_dropout: float = 0,           # class-label dropout (classifier-free guidance training)
                 embedding_type: str = "positional", # 'positional' (DDPM++) or 'fourier' (NCSN++)
                 channel_mult_noise: int = 1,        # noise embedding size multiplier: 1 DDPM++, 2 NCSN++
                 encoder_type: str = "standard",     # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++)
                 decoder_type: str = "standard",     # 'standard' or 'skip'
                 resample_filter=(1, 1),             # [1,1] DDPM++, [1,3,3,1] NCSN++
                 ):
        assert embedding_type in ("fourier", "positional")
        assert encoder_type in ("standard", "skip", "residual")
        assert decoder_type in ("standard", "skip")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping of noise level, class and augmentation labels to the embedding.
        self.map_noise = (PositionalEmbedding(num_channels=noise_channels, endpoint=True)
                          if embedding_type == "positional" else FourierEmbedding(num_channels=noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions   # only the level's last block
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels, augment_labels, batch_size):
        """Noise labels (B,) or (1,) + labels -> (B or 1, emb_channels), the output of the mapping network."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)   # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([batch_size, 1], device=noise_labels.device) >= self.label_dropout
                tmp = tmp * keep.to(tmp.dtype)
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0])

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ---------------------------------------------------------------------------------------------------------
# ADM (Dhariwal & Nichol 2021), as re-implemented by EDM.

class DhariwalUNet(torch.nn.Module):
    def __init__(self,
                 img_resolution: int,                # image side at input and output
                 in_channels: int,                   # colour channels at input
                 out_channels: int,                  # colour channels at output
                 label_dim: int = 0,                 # number of classes, 0 = unconditional
                 augment_dim: int = 0,               # augmentation label size, 0 = none
                 model_channels: int = 192,          # base channel count
                 channel_mult=(1, 2, 3, 4),          # channel multiplier per resolution level
                 channel_mult_emb: int = 4,          # embedding size = model_channels * channel_mult_emb
                 num_blocks: int = 3,                # residual blocks per level
                 attn_resolutions=(32, 16, 8),       # resolutions with self-attention (blocks of >= 64 channels)
                 dropout: float = 0.10,              # dropout on intermediate activations
                 label_dropout: float = 0,           # class-label dropout (classifier-free guidance training)
                 ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels, augment_labels, batch_size):
        """Noise labels (B,) or (1,) + labels -> (B or 1, emb_channels), the output of the mapping network."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([batch_size, 1], device=tmp.device) >= self.label_dropout
                tmp = tmp * keep.to(tmp.dtype)
            emb = emb + self.map_label(tmp)   # no sqrt(label_dim) scaling here (it is in the init instead)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


MODELS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# ---------------------------------------------------------------------------------------------------------
# Preconditioning: D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)).

def _build_model(model_type: str, **kwargs) -> torch.nn.Module:
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r} (known: {', '.join(MODELS)})")
    return MODELS[model_type](**kwargs)


class _Precond(torch.nn.Module):
    """What every preconditioner shares: the backbone F, the input handling (float32 x, sigma reshaped to
    (B or 1, 1, 1, 1), one-hot labels, zeros when a conditional model gets none; float16 backbone only on CUDA
    with use_fp16) and D(x; σ) itself. A subclass states its coefficients, as the EDM paper's Table 1."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_kwargs: dict, out_channels: int | None = None):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=out_channels or img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at noise level sigma (B or 1, 1, 1, 1)."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels, dtype = self._inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        # iDDPM's backbone also predicts the variance (2·C channels): the first C are the denoiser's output.
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def _inputs(self, x, sigma, class_labels, force_fp32):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        return x, sigma, class_labels, (torch.float16 if fp16 else torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """The EDM preconditioning (the paper's Table 1): σ_data-scaled skip, c_noise = ln(σ)/4."""

    def __init__(self,
                 img_resolution: int,                # image side
                 img_channels: int,                  # colour channels
                 label_dim: int = 0,                 # number of classes, 0 = unconditional
                 use_fp16: bool = False,             # run the backbone in float16 (CUDA only)
                 sigma_min: float = 0,               # lowest supported noise level
                 sigma_max: float = float("inf"),    # highest supported noise level
                 sigma_data: float = 0.5,            # expected standard deviation of the data
                 model_type: str = "DhariwalUNet",   # backbone class name
                 **model_kwargs):                    # backbone arguments
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021): c_out = -σ, c_noise = (M-1)·σ⁻¹(σ)."""

    def __init__(self,
                 img_resolution: int,                # image side
                 img_channels: int,                  # colour channels
                 label_dim: int = 0,                 # number of classes, 0 = unconditional
                 use_fp16: bool = False,             # run the backbone in float16 (CUDA only)
                 beta_d: float = 19.9,               # extent of the noise schedule
                 beta_min: float = 0.1,              # initial slope of the noise schedule
                 M: int = 1000,                      # number of DDPM timesteps
                 epsilon_t: float = 1e-5,            # smallest t used in training
                 model_type: str = "SongUNet",       # backbone class name
                 **model_kwargs):                    # backbone arguments
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        with torch.device("cpu"):  # float32 arithmetic as the official code, also when built on the meta device
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021): c_out = σ, c_noise = ln(σ/2)."""

    def __init__(self,
                 img_resolution: int,                # image side
                 img_channels: int,                  # colour channels
                 label_dim: int = 0,                 # number of classes, 0 = unconditional
                 use_fp16: bool = False,             # run the backbone in float16 (CUDA only)
                 sigma_min: float = 0.02,            # lowest supported noise level
                 sigma_max: float = 100,             # highest supported noise level
                 model_type: str = "SongUNet",       # backbone class name
                 **model_kwargs):                    # backbone arguments
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(_Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021): σ snapped to the M+1 discrete levels `u`; the
    backbone predicts 2·C channels of which the first C are used."""

    def __init__(self,
                 img_resolution: int,                # image side
                 img_channels: int,                  # colour channels
                 label_dim: int = 0,                 # number of classes, 0 = unconditional
                 use_fp16: bool = False,             # run the backbone in float16 (CUDA only)
                 C_1: float = 0.001,                 # timestep adjustment at low noise levels
                 C_2: float = 0.008,                 # timestep adjustment at high noise levels
                 M: int = 1000,                      # number of DDPM timesteps
                 model_type: str = "DhariwalUNet",   # backbone class name
                 **model_kwargs):                    # backbone arguments
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         out_channels=img_channels * 2)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        with torch.device("cpu"):  # the discrete noise levels u_M = 0 < ... < u_0, also when built on meta
            u = torch.zeros(M + 1)
            for j in range(M, 0, -1):  # M, ..., 1
                u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
            self.sigma_min = float(u[M - 1])
            self.sigma_max = float(u[0])
        self.register_buffer("u", u)

    def coefficients(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        dist = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = dist.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


PRECONDS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "iDDPMPrecond": iDDPMPrecond}
