"""IMM's flow map: the network that jumps from time t to an earlier time s in one step.

Inductive Moment Matching (Zhou et al., 2025) uses the flow-matching interpolation x_t = (1 - t) x + t eps with
eps ~ N(0, sigma_d^2) and t in [0, T]. The network predicts a velocity-like F and the "euler_fm" flow map is

    f(x_t, t, s) = x_t - (t - s) * sigma_d * F(c_in * x_t, 1000 t, 1000 (t - s) or 1000 s, y),
    c_in = 1 / (sigma_d * sqrt(alpha_t^2 + sigma_t^2)),  alpha_t = 1 - t,  sigma_t = t.

The second time input is 1000 (t - s) for temb_type 'stride' (imagenet256_ts_a2, the Neon release) and 1000 s
for 'identity' (imagenet256_s_a1). Attribute names and the constructor record follow lumalabs/imm
training/preconds.py so that released checkpoints describe this class exactly.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from imm.dit import build_dit
from neon.errors import NeonError

_PRECISIONS = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}


class IMMPrecond(nn.Module):
    def __init__(self,
                 img_resolution: int,            # latent side (32 for ImageNet-256 through the 8x SD-VAE)
                 img_channels: int,              # latent channels (4)
                 label_dim: int = 0,             # number of classes; labels are one-hot rows, all-zero = null class
                 mixed_precision: str | None = None,  # 'fp16' / 'bf16': autocast the DiT on CUDA (official training)
                 noise_schedule: str = "fm",     # alpha_t = 1 - t, sigma_t = t
                 model_type: str = "SongUNet",   # 'DiT' or a named DiT size; the official default (a U-Net) is refused
                 sigma_data: float = 0.5,        # std of the (normalised) data and of the noise
                 f_type: str = "euler_fm",       # flow-map parameterisation
                 T: float = 0.994,               # largest time (sampling starts here)
                 eps: float = 0.0,               # smallest time (sampling ends here)
                 temb_type: str = "identity",    # second time input: 'identity' = s, 'stride' = t - s
                 time_scale: float = 1000.0,     # times are multiplied by this before the sinusoidal embedding
                 **model_kwargs):                # DiT arguments (patch_size, hidden_size, num_classes, ...)
        super().__init__()
        if noise_schedule != "fm" or f_type != "euler_fm":
            raise NeonError(f"IMM noise_schedule={noise_schedule!r}, f_type={f_type!r} is not supported "
                            f"(only 'fm' with 'euler_fm', as the ImageNet-256 releases use)")
        if temb_type not in ("identity", "stride"):
            raise NeonError(f"IMM temb_type must be 'identity' or 'stride', got {temb_type!r}")
        if mixed_precision not in _PRECISIONS:
            raise NeonError(f"IMM mixed_precision must be null, 'fp16' or 'bf16', got {mixed_precision!r}")
        if label_dim <= 0:
            raise NeonError("IMM's DiT is class-conditional: label_dim must be positive")
        # The constructor record, as torch_utils.persistence keeps it (saved with our own container).
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                mixed_precision=mixed_precision, noise_schedule=noise_schedule,
                                model_type=model_type, sigma_data=sigma_data, f_type=f_type, T=T, eps=eps,
                                temb_type=temb_type, time_scale=time_scale, **model_kwargs)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.mixed_precision = _PRECISIONS[mixed_precision]
        self.noise_schedule = noise_schedule
        self.f_type = f_type
        self.sigma_data = sigma_data
        self.T = T
        self.eps = eps
        self.temb_type = temb_type
        self.time_scale = time_scale
        # eta = sigma_t / alpha_t at the ends of the time range (the loss samples times in eta).
        self.nt_low = self.eta(torch.tensor(eps, dtype=torch.float64, device="cpu")).item()
        self.nt_high = self.eta(torch.tensor(T, dtype=torch.float64, device="cpu")).item()
        self.model = build_dit(model_type, img_resolution=img_resolution, img_channels=img_channels,
                               in_channels=img_channels, out_channels=img_channels, label_dim=label_dim,
                               **model_kwargs)

    # -- the noise schedule (all in the dtype of t; the loss uses float64) ---------------------------------------
    @staticmethod
    def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - t, t

    @staticmethod
    def logsnr(t: torch.Tensor) -> torch.Tensor:
        """log(alpha_t^2 / sigma_t^2) = 2 (log(1 - t) - log t), computed in float64."""
        t64 = t.to(torch.float64)
        return (2 * ((1 - t64).log() - t64.log())).to(t.dtype)

    def eta(self, t: torch.Tensor) -> torch.Tensor:
        """eta_t = sigma_t / alpha_t = exp(-logsnr / 2): t / (1 - t), in [0, inf)."""
        return (-0.5 * self.logsnr(t)).exp()

    @staticmethod
    def eta_to_t(eta: torch.Tensor) -> torch.Tensor:
        """Inverse of eta: t = eta / (1 + eta) (eta = inf gives t = 1)."""
        e64 = eta.to(torch.float64)
        return torch.nan_to_num(e64 / (1 + e64), nan=1.0).to(eta.dtype)

    def add_noise(self, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t y + sigma_t noise (noise ~ N(0, sigma_d^2))."""
        alpha_t, sigma_t = self.alpha_sigma(t)
        return alpha_t * y + sigma_t * noise

    # -- the network -----------------------------------------------------------------------------------------
    def _precision(self, device: torch.device, force_fp32: bool):
        """force_fp32 turns autocast off (the loss's target branch); a network built with mixed_precision
        autocasts itself on CUDA; otherwise the caller's autocast (if any) applies."""
        if force_fp32:
            return torch.autocast(device.type, enabled=False)
        if self.mixed_precision is not None and device.type == "cuda":
            return torch.autocast("cuda", dtype=self.mixed_precision)
        return contextlib.nullcontext()

    def one_hot_labels(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """None -> the null class for every row; else (N, label_dim) float32."""
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def model_output(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor,
                     force_fp32: bool = False) -> torch.Tensor:
        """Raw network output F, float32 (or the autocast dtype). x (N, C, H, W); t, s 0-d or (N,) or (N,1,1,1);
        class_labels (N, label_dim). The network sees float32 inputs whatever the dtype of x and t."""
        t = t.to(torch.float32).reshape(-1, 1, 1, 1)
        s = s.to(torch.float32).reshape(-1, 1, 1, 1)
        alpha_t, sigma_t = self.alpha_sigma(t)
        c_in = (alpha_t ** 2 + sigma_t ** 2).rsqrt() / self.sigma_data
        c_noise_t = t * self.time_scale
        c_noise_s = (t - s if self.temb_type == "stride" else s) * self.time_scale
        with self._precision(x.device, force_fp32):
            return self.model(c_in * x.to(torch.float32), c_noise_t.flatten(), c_noise_s.flatten(),
                              class_labels=class_labels)

    def flow_map(self, x: torch.Tensor, F: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Euler flow map x_s = x_t - (t - s) sigma_d F, in the dtype of t (float64 in the sampler and loss).
        Per-sample times (N,) are reshaped to broadcast over (C, H, W)."""
        t = t.reshape(-1, 1, 1, 1) if t.ndim == 1 else t
        s = s.reshape(-1, 1, 1, 1) if s.ndim == 1 else s
        return x - (t - s) * self.sigma_data * F

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        """f(x_t, t, s, y) -> x_s (N, C, H, W), in the dtype of t. class_labels one-hot (N, label_dim) or None."""
        labels = self.one_hot_labels(class_labels, x.shape[0], x.device)
        F = self.model_output(x, t, s, labels, force_fp32).to(t.dtype)
        return self.flow_map(x, F, t, s)
