"""IMM pushforward sampler throughput (images/s), network and SD-VAE decoder timed apart, in one run.

CPU (default): the tiny family network and tiny VAE (IMMFamily.tiny); seconds on one core.
    OMP_NUM_THREADS=1 python bench/bench_imm.py
GPU: DiT-XL/2 at the release config (random weights) at batch 64, 8 steps, cfg 1.5, under bf16 autocast, compared
with the float32 (TF32) DiT the official samplers run; plus the SD-VAE decoder layout (random weights, fp16).
    python bench/bench_imm.py --device cuda --autocast bf16 --decode

Guidance doubles the DiT batch (one pass over [null, labels]); the float64 Euler update is negligible.
"""
from __future__ import annotations

import argparse
import time

import torch
from compare import interleaved, report

from imm.adapter import IMMFamily
from imm.checkpoint import build_network
from imm.sampler import one_hot, pushforward, sample_latents
from imm.vae import LatentVAE

# imagenet256_ts_a2.pkl / Neon_imm_imagenet256.pkl network config (lumalabs/imm configs/im256_generate_images.yaml).
RELEASE_CONFIG = dict(img_resolution=32, img_channels=4, label_dim=1000, model_type="DiT_XL_2", s_embed=True,
                      noise_schedule="fm", f_type="euler_fm", temb_type="stride", time_scale=1000, sigma_data=0.5,
                      eps=0.0, T=0.994)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats: int) -> float:
    """Best-of-`repeats` seconds (after one warm-up call)."""
    best = float("inf")
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if r:
            best = min(best, time.perf_counter() - t0)
    return best


def official_equivalent(net, vae, labels: torch.Tensor, steps: int, cfg: float | None, generator: torch.Generator):
    """The official generate_images.py loop: the batch's noise in one draw (net.get_init_noise, one stream), the
    uniform pushforward grid with cfg_forward at every jump (one batched DiT pass over [null, labels]), then one
    batched VAE decode. -> uint8 (B, H, W, 3)."""
    shape = (len(labels), net.img_channels, net.img_resolution, net.img_resolution)
    z = torch.randn(shape, generator=generator).to(labels.device) * net.sigma_data
    latents = pushforward(net, z, one_hot(labels, net.label_dim), steps, cfg)
    return vae.decode(latents)


def sd_vae(device: torch.device) -> LatentVAE:
    """The sd-vae-ft-ema layout (random weights; the official decoder runs it in float16)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, sample_size=256)
    return LatentVAE(vae.to(torch.float16 if device.type == "cuda" else torch.float32)).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, choices=["tiny", "release"], help="cpu: tiny, cuda: release (DiT-XL/2)")
    p.add_argument("--batch", type=int, default=None, help="images per sampler call (cpu 16, cuda 64)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"], help="DiT autocast on CUDA")
    p.add_argument("--decode", action="store_true", help="cuda: also time the SD-VAE decoder (random weights)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model = args.model or ("release" if gpu else "tiny")
    batch = args.batch or (64 if gpu else 16)
    if gpu:  # as the official samplers (TF32 matmuls)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    family = IMMFamily()
    if model == "tiny":
        bundle = family.tiny(device=device)
        net, vae = bundle.net, bundle.helpers["vae"]
    else:
        torch.manual_seed(0)
        net = build_network(RELEASE_CONFIG, device).eval().requires_grad_(False)
        vae = sd_vae(device) if args.decode else None
    seeds, labels = list(range(batch)), torch.arange(batch) % net.label_dim
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"IMM {model} ({params:.2f}M params) on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ''}, batch {batch}, {args.steps} steps, "
          f"cfg {args.cfg}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    def run_sampler(autocast):
        return lambda: sample_latents(net, seeds, labels, steps=args.steps, cfg=args.cfg, autocast=autocast)

    fp32 = best_time(run_sampler(None), device, args.repeats)
    print(f"  DiT sampler, float32   : {fp32:8.3f} s/batch  {batch / fp32:9.2f} img/s")
    if args.autocast and gpu:
        fast = best_time(run_sampler(args.autocast), device, args.repeats)
        print(f"  DiT sampler, {args.autocast:9s} : {fast:8.3f} s/batch  {batch / fast:9.2f} img/s"
              f"  ({fp32 / fast:.2f}x float32)")
    if vae is not None:
        latents = sample_latents(net, seeds, labels, steps=1, cfg=None)
        vae.batch_size = batch
        dec = best_time(lambda: vae.decode(latents), device, args.repeats)
        print(f"  VAE decode             : {dec:8.3f} s/batch  {batch / dec:9.2f} img/s")
        if model == "tiny":   # the whole sampler, as `neon sample` calls it, against the official loop
            gen = torch.Generator().manual_seed(0)
            ours_s, official_s = interleaved(
                lambda: family.sample(bundle, seeds, labels, steps=args.steps, cfg=args.cfg),
                lambda: official_equivalent(net, vae, labels.to(device), args.steps, args.cfg, gen), device,
                args.repeats)
            report("imm", batch, ours_s, official_s)
    if gpu:
        print(f"  peak memory            : {torch.cuda.max_memory_allocated(device) / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()
