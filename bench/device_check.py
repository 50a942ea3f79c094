"""Every GPU check of the samplers in one run: throughput per family for eager float32, the official precision
and torch.compile (ratios to eager in the same run), images/s and peak memory at release size (random weights),
and how far each fast path's images are from eager's (per-pixel statistics on the same seeds).

    python bench/device_check.py --device cuda            # H100/H200 class: under 8 minutes in all
    python bench/device_check.py --device cpu --quick     # tiny networks: checks that every path runs

Release sizes: EDM CIFAR-10 (DDPM++ 55.7M, 18 steps), VAR-d16 (256 px, release VQVAE), xAR-B (KL-16 VAE, 40 flow
steps), IMM DiT-XL/2 (SD-VAE layout, 8 steps); random weights, so the figures are speed and agreement, not FID.
Official precision: what the official samplers run (EDM float32, cuDNN's default TF32 convolutions; VAR, xAR and
IMM float16 autocast with TF32). A family whose check fails prints one line and the others still run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]   # the repository's packages (no install needed) and bench_*.py

from neon.family import Bundle  # noqa: E402


def edm_bundle(device, quick: bool):
    from bench_edm import CIFAR10_COND

    from edm.adapter import EDMFamily, randomize
    from edm.checkpoint import build_network
    family = EDMFamily()
    if quick:
        return family, family.tiny(device=device), dict(num_steps=3), 1000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_network("EDMPrecond", CIFAR10_COND, "cpu")
    randomize(net, seed=0)
    bundle = Bundle(net=net.to(device).eval(), num_classes=10, resolution=32)
    return family, bundle, dict(num_steps=18), 10


def var_bundle(device, quick: bool):
    from bench_var import build

    from var.adapter import VARFamily
    family = VARFamily()
    args = dict(cfg=1.5, top_k=900, top_p=0.95)
    if quick:
        return family, family.tiny(device=device), dict(args, top_k=5), 10
    var, vae = build(16, device, full_vae=True, resolution=256)
    return family, Bundle(net=var, helpers={"vae": vae}, num_classes=1000, resolution=256), args, 1000


def xar_bundle(device, quick: bool):
    from xar.adapter import XARFamily
    from xar.model import CONFIGS, XAR
    from xar.vae import KL16, AutoencoderKL
    family = XARFamily()
    if quick:
        return family, family.tiny(device=device), dict(cfg=2.7, flow_steps=3), 1000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net, vae = XAR(CONFIGS["xar_base"]), AutoencoderKL(KL16)
    bundle = family._bundle(net.to(device).eval(), vae.to(device).eval(), source=None, container="plain")
    return family, bundle, dict(cfg=2.7, flow_steps=40), 1000


def imm_bundle(device, quick: bool):
    from bench_imm import RELEASE_CONFIG, sd_vae

    from imm.adapter import IMMFamily, _tiny_rule
    from imm.checkpoint import build_network
    from neon.testing import randomize
    family = IMMFamily()
    if quick:
        return family, family.tiny(device=device), dict(steps=2, cfg=1.5), 10
    net = build_network(RELEASE_CONFIG, "cpu")
    randomize(net, 0, _tiny_rule)   # the tiny network's rule: DiT's own init would zero the output layers
    vae = sd_vae(device)
    return family, family._bundle(net.to(device).eval().requires_grad_(False), vae, source=None), \
        dict(steps=8, cfg=1.5), 1000


# TF32 (matmuls, cuDNN convolutions): eager float32 is strict float32; EDM's generate.py leaves PyTorch's defaults
# (TF32 convolutions only); the official VAR, xAR and IMM samplers turn both on.
FP32, TF32_CONV, TF32 = (False, False), (False, True), (True, True)
# family -> (builder, release batch, official precision: (sampler arguments, TF32 flags), compile supported)
FAMILIES = {
    "edm": (edm_bundle, 256, ({}, TF32_CONV), True),
    "var": (var_bundle, 64, ({"autocast": "fp16"}, TF32), False),
    "imm": (imm_bundle, 64, ({"autocast": "fp16"}, TF32), True),
    "xar": (xar_bundle, 64, ({"autocast": "fp16"}, TF32), True),   # last: its compiled KV-cache shapes vary most
}
NEEDS = {"imm": "diffusers"}   # family -> a package its networks need (IMM's SD-VAE is diffusers' AutoencoderKL)


@contextlib.contextmanager
def tf32_flags(flags: tuple[bool, bool]):
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    """One warm-up call (compilation, cuDNN autotuning), then the median of `repeats` -> (images, seconds,
    peak GiB)."""
    images = fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        images = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return images, statistics.median(times), peak


def agreement(images: torch.Tensor, eager: torch.Tensor) -> dict:
    diff = (images.int() - eager.int()).abs().float()
    return dict(mean_abs_uint8=float(diff.mean()), max_abs_uint8=int(diff.max()),
                changed_share=float((diff > 0).float().mean()), pixel_mean=float(images.float().mean()),
                pixel_std=float(images.float().std()), eager_pixel_mean=float(eager.float().mean()),
                eager_pixel_std=float(eager.float().std()))


def write_rows(path: str | None, rows: list[dict]) -> None:
    """Every row so far, replaced whole after each row: a run stopped by its time limit keeps what it measured."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(path + ".tmp", path)


def check_family(name: str, device, quick: bool, repeats: int, done=lambda row: None) -> list[dict]:
    build, release_batch, (official_args, official_tf32), can_compile = FAMILIES[name]
    family, bundle, args, num_classes = build(device, quick)
    batch = 4 if quick else release_batch
    seeds = list(range(batch))
    labels = torch.arange(batch) % num_classes
    compile_mode = "aot_eager" if device.type == "cpu" else True   # inductor takes minutes on a CPU
    variants = [("eager fp32", {}, FP32), ("official precision", official_args, official_tf32)]
    if can_compile:
        variants.append(("compiled fp32", {"compile": compile_mode}, FP32))
        variants.append(("compiled official", {**official_args, "compile": compile_mode}, official_tf32))
    if name == "edm":
        variants.append(("channels-last fp32", {"channels_last": True}, FP32))
    rows, eager = [], None
    for variant, extra, tf32 in variants:
        with tf32_flags(tf32):
            images, seconds, peak = timed(lambda extra=extra: family.sample(bundle, seeds, labels, **args, **extra),
                                          device, repeats)
        eager = images if eager is None else eager
        row = dict(family=name, variant=variant, batch=batch, images_per_s=batch / seconds, peak_gib=peak,
                   **agreement(images, eager))
        row["speed_vs_eager"] = row["images_per_s"] / rows[0]["images_per_s"] if rows else 1.0
        rows.append(row)
        done(row)
        print(f"{name:4s} {variant:19s} {row['images_per_s']:9.2f} img/s  {row['speed_vs_eager']:5.2f}x eager  "
              f"peak {peak:6.2f} GiB  |Δ| mean {row['mean_abs_uint8']:.3f} max {row['max_abs_uint8']:3d}  "
              f"changed {100 * row['changed_share']:5.1f}%  pixels {row['pixel_mean']:.1f}±{row['pixel_std']:.1f}",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny networks, batch 4 (a check that every path runs)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3; quick 1)")
    p.add_argument("--json", help="also write every row here")
    args = p.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (1 if args.quick else 3)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"device {device}{gpu}, torch {torch.__version__}, {'quick' if args.quick else 'release sizes'}, "
          f"median of {repeats}", flush=True)
    rows, failed, skipped = [], [], []

    def done(row: dict) -> None:
        rows.append(row)
        write_rows(args.json, rows)
    t0 = time.perf_counter()
    write_rows(args.json, rows)
    for name in args.families:
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            skipped.append(name)
            print(f"{name}: skipped: needs {NEEDS[name]} (pip install {NEEDS[name]})", flush=True)
            continue
        try:
            check_family(name, device, args.quick, repeats, done)
        except Exception as e:   # one family's failure must not hide the others' figures
            failed.append(name)
            print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            traceback.print_exc(limit=3)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - t0:.0f} s; failed: {', '.join(failed) or 'none'}; "
          f"skipped: {', '.join(skipped) or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
