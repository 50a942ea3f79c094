"""Merging: θneon = (1+w)·θr − w·θs.

A small w > 0 extrapolates away from the self-trained θs, undoing the degradation that training on
mode-seeking samples would cause (the paper's Eq. 3).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping

import torch

from neon import paths
from neon.checkpoint import open_checkpoint
from neon.errors import NeonError
from neon.pipeline_folder import check_replaceable, is_pipeline_folder


def check_w(w: float) -> float:
    w = float(w)
    if not math.isfinite(w):
        raise NeonError(f"merge weight w must be finite, got {w}")
    return w


def merge_tensor(theta_r: torch.Tensor, theta_s: torch.Tensor, w: float) -> torch.Tensor:
    """(1+w)·θr − w·θs for floating tensors, computed in float32 (float64 kept) and cast back to θr's dtype.

    Where θs equals θr — frozen weights, fixed tables (RoPE, sin-cos positions), attention masks holding −inf —
    θr is kept exactly: the formula would round such entries, and turns −inf into (1+w)(−inf) + w·inf = NaN.
    Integer and bool tensors (step counters, index buffers) are taken from θr unchanged.
    θs may be on another device (read from a file while θr is on the GPU): the result is on θr's device."""
    if not theta_r.is_floating_point():
        return theta_r.clone()
    acc = torch.float64 if theta_r.dtype == torch.float64 else torch.float32
    # Copied in its own dtype (half the bytes of a bf16 θs), without blocking the host when the copy goes to a
    # GPU: the stream orders it before the arithmetic. A copy to the CPU must block, or it would be read unfinished.
    theta_s = theta_s.to(theta_r.device, non_blocking=theta_r.device.type == "cuda")
    r, s = theta_r.to(acc), theta_s.to(acc)
    merged = (r * (1.0 + w) - s * w).to(theta_r.dtype)
    return torch.where(r == s, theta_r, merged)


def check_compatible(theta_r: Mapping[str, tuple], theta_s: Mapping[str, tuple]) -> None:
    """Refuse (naming the first offending key) unless both hold the same keys with the same shapes.
    Values are tensors or shapes."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # noqa: E731
    for key in theta_r:
        if key not in theta_s:
            raise NeonError(f"checkpoints differ: key {key!r} is in the reference but not in the self-trained one")
    for key in theta_s:
        if key not in theta_r:
            raise NeonError(f"checkpoints differ: key {key!r} is in the self-trained but not in the reference one")
    for key, t in theta_r.items():
        if shape(t) != shape(theta_s[key]):
            raise NeonError(f"checkpoints differ: {key!r} has shape {shape(t)} vs {shape(theta_s[key])}")


def merge_state_dicts(theta_r: Mapping[str, torch.Tensor], theta_s: Mapping[str, torch.Tensor],
                      w: float) -> dict[str, torch.Tensor]:
    """θneon = (1+w)·θr − w·θs, key by key (keys in θr's order)."""
    w = check_w(w)
    check_compatible(theta_r, theta_s)
    return {k: merge_tensor(t, theta_s[k], w) for k, t in theta_r.items()}


# ---------------------------------------------------------------------------------------------------------
# Files: merge two checkpoints into a third, in the reference checkpoint's container.

def check_same_family(ckpt_r, ckpt_s) -> None:
    """Refuse checkpoints that cannot be two versions of one network."""
    if ckpt_r.class_name and ckpt_s.class_name and ckpt_r.class_name != ckpt_s.class_name:
        raise NeonError(f"checkpoints are of different families: {ckpt_r.path} holds a {ckpt_r.class_name}, "
                        f"{ckpt_s.path} a {ckpt_s.class_name}")
    if not set(ckpt_r.tensors) & set(ckpt_s.tensors):
        raise NeonError(f"checkpoints are of different families (no parameter names in common): {ckpt_r.path} "
                        f"is {ckpt_r.describe()}, {ckpt_s.path} is {ckpt_s.describe()}")
    check_compatible({k: r.shape for k, r in ckpt_r.tensors.items()},
                     {k: r.shape for k, r in ckpt_s.tensors.items()})


def output_paths(out: str, ws: list[float]) -> list[str]:
    """One output per w: `out` itself for a single w; else `out` with '{w}' filled in, or '_w<w>' added."""
    if len(ws) == 1:
        return [out]
    if "{w}" in out:
        return [out.replace("{w}", f"{w:g}") for w in ws]
    root, ext = os.path.splitext(out)
    return [f"{root}_w{w:g}{ext}" for w in ws]


def check_output(path: str, inputs, force: bool, folder: bool) -> None:
    """An output never is, holds or lies inside an input; an existing one is replaced only with `force`, and a
    folder only where an earlier merge wrote it and it holds nothing else (`check_replaceable`)."""
    paths.check_apart(path, inputs)
    if os.path.lexists(path):
        if not force:
            raise NeonError(f"{path} exists (use --force to overwrite)")
        if folder:
            check_replaceable(path)


def merge_files(ref: str, synth: str, w: float | list[float], out: str, force: bool = False,
                trust_architecture: bool = False) -> list[str]:
    """θneon = (1+w)·θr − w·θs from checkpoint files, streamed tensor by tensor: the output is a copy of `ref`
    (same container, everything else it holds) whose merged network (the EMA one where there is one) is
    replaced. Nothing is written unless every check passes; a pickle carrying embedded source that no
    registered family recognises is refused unless trust_architecture (the output would carry it)."""
    ws = [check_w(x) for x in (w if isinstance(w, (list, tuple)) else [w])]
    # A pipeline folder merges into a pipeline folder; every other container into a file.
    check = paths.output_folder if is_pipeline_folder(ref) else lambda p: paths.output_file(p, "checkpoint file")
    outs = [check(path) for path in output_paths(out, ws)]
    for path in outs:
        check_output(path, (ref, synth), force, folder=is_pipeline_folder(ref))
    ckpt_r, ckpt_s = open_checkpoint(ref, trust_architecture), open_checkpoint(synth, trust_architecture)
    check_same_family(ckpt_r, ckpt_s)
    for key in ckpt_r.tensors:   # before any output is written: a refusal leaves none of the w's outputs
        theta_r, theta_s = ckpt_r.read(key), ckpt_s.read(key)
        for wi in ws:
            check_finite(merge_tensor(theta_r, theta_s, wi), theta_r, key, wi)
    for wi, path in zip(ws, outs):
        ckpt_r.write(path, lambda key, t, wi=wi: merge_tensor(t, ckpt_s.read(key), wi))
    return outs


def check_finite(merged: torch.Tensor, theta_r: torch.Tensor, key: str, w: float) -> None:
    """Refuse an overflow (a huge w): θneon is never saved with inf/NaN weights. Entries θr holds as ±inf itself
    (attention masks) are kept as they are."""
    if merged.is_floating_point() and bool((~torch.isfinite(merged) & torch.isfinite(theta_r)).any()):
        raise NeonError(f"merge weight w={w:g}: {key} overflows to inf/NaN in its dtype")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, help="θr: the reference (base) checkpoint")
    p.add_argument("--synth", required=True, help="θs: the self-trained checkpoint")
    p.add_argument("--w", required=True, type=float, nargs="+", help="merge weight(s); one output per w")
    p.add_argument("--out", required=True, help="output file (several w: '{w}' in the name, or _w<w> is added)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (a folder only if an earlier merge wrote it)")
    p.add_argument("--trust-architecture", action="store_true",
                   help="EDM/IMM: merge pickles whose embedded source is no official release's (warned)")


def merge_main(args) -> None:
    t0 = time.time()
    outs = merge_files(args.ref, args.synth, args.w, args.out, args.force, args.trust_architecture)
    for w, path in zip(args.w, outs):
        print(f"w={w:g}: {path}")
    print(f"merged in {time.time() - t0:.1f} s")
