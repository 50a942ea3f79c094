"""torch-fidelity's InceptionV3 ('inception-v3-compat'): its architecture without weights, and its weights file.

Both detectors run this network: torch-fidelity's own extractor, and NVIDIA's detector (`nvidia_detector`),
whose weights are mapped onto it (`layout`).
"""
from __future__ import annotations

import os
import tempfile

import torch

from neon import paths
from neon.errors import NeonError


def compat_architecture() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with PyTorch's default init and no weights loaded (for its layout)."""
    # Imported here: torch-fidelity takes a second to import, and most of neon never builds this network.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the default init
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)  # its constructor insists on reading a weights file (or downloading one)
        return Skeleton("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)


def load_compat_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch-fidelity InceptionV3 weights file, read with weights_only=True (tensors only, no code)."""
    with paths.open_input(os.fspath(path), "Inception weights file") as f:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with code in it, or not a torch file at all
            raise NeonError(f"{path}: not a plain InceptionV3 state dict ({type(e).__name__})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise NeonError(f"{path}: not a torch-fidelity InceptionV3 state dict (no 'fc.weight')")
    return state
