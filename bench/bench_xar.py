"""xAR sampler throughput, with and without the KV cache, in one run (ratios, not thresholds).

CPU (default): a small random xAR on the release token layout; seconds on a laptop core.
    OMP_NUM_THREADS=1 python bench/bench_xar.py
    OMP_NUM_THREADS=1 python bench/bench_xar.py --batch 16 --compare 7     # family.sample vs the official loop
GPU: xAR-B (random weights, release architecture) at batch 64 under bf16 autocast, and the KL-16 decoder.
    python bench/bench_xar.py --device cuda --model xar_base --batch 64 --flow-steps 40 --autocast bf16 --decode

Without the cache every call recomputes the finished cells; with it only the first call of a cell carries the
previous cell. Both give the same images (tests/test_xar_adapter.py checks it).
"""
from __future__ import annotations

import argparse
import time

import torch
from compare import interleaved, report

from neon.family import Bundle
from xar.adapter import AUTOCAST, XARFamily, images_to_uint8
from xar.model import CONFIGS, XAR, XARConfig
from xar.sampler import PerImageNoise, sample_tokens
from xar.vae import KL16, LATENT_SCALE, AutoencoderKL, VAEConfig

SMALL = XARConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, decoder_embed_dim=64,
                  decoder_depth=2, decoder_num_heads=4)


class BatchNoise:
    """The official sampler's draws: each cell's start latents and SDE noise for the whole batch at once, from
    one generator (the official code uses the global RNG)."""

    def __init__(self, batch: int, tokens: int, channels: int, num_steps: int, generator: torch.Generator, device):
        self.shape, self.steps, self.generator, self.device = (batch, tokens, channels), num_steps, generator, device

    def cell(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randn(self.shape, generator=self.generator, device=self.device)
        eps = torch.randn((self.steps - 1, *self.shape), generator=self.generator, device=self.device,
                          dtype=torch.float64)
        return start, eps


@torch.no_grad()
def official_equivalent(net: XAR, vae: AutoencoderKL, labels: torch.Tensor, steps: int, cfg: float,
                        generator: torch.Generator) -> torch.Tensor:
    """The official loop for one batch: the cells in order with batched noise (`BatchNoise`), the KV cache, then
    one batched VAE decode, quantised as Neon's generate_dataset.py. The cell loop is xar/sampler.py's
    transcription of the official one; only the random draws differ from ours. -> uint8 (B, H, W, 3)."""
    noise = BatchNoise(len(labels), net.cell_tokens, net.cfg.vae_embed_dim, steps, generator, labels.device)
    z = sample_tokens(net, labels, steps, cfg, noise, kv_cache=True)
    return images_to_uint8(vae.decode(z / LATENT_SCALE))


def compare(net: XAR, batch: int, steps: int, cfg: float, device, repeats: int) -> float:
    """XARFamily.sample (as `neon sample` calls it) against the official loop, interleaved; the small VAE
    decoder of the tiny family (the same in both)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig(embed_dim=net.cfg.vae_embed_dim, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                      encoder_attn_levels=(1,))).to(device).eval()
    bundle = Bundle(net=net, helpers={"vae": vae}, num_classes=net.cfg.class_num, resolution=0)
    seeds, labels = list(range(batch)), torch.arange(batch) % net.cfg.class_num
    gen = torch.Generator(device).manual_seed(0)
    ours_s, official_s = interleaved(
        lambda: XARFamily().sample(bundle, seeds, labels, cfg=cfg, flow_steps=steps),
        lambda: official_equivalent(net, vae, labels.to(device), steps, cfg, gen), device, repeats)
    return report("xar", batch, ours_s, official_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampler(net: XAR, batch: int, steps: int, cfg: float, kv_cache: bool, autocast, device, repeats: int) -> float:
    """Best-of-`repeats` seconds for one batch of latents (after one warm-up run)."""
    labels = torch.arange(batch, device=device) % net.cfg.class_num
    best = float("inf")
    for r in range(repeats + 1):
        noise = PerImageNoise(range(batch), net.cell_tokens, net.cfg.vae_embed_dim, steps, device)
        _sync(device)
        t0 = time.perf_counter()
        sample_tokens(net, labels, steps, cfg, noise, kv_cache=kv_cache, autocast=autocast)
        _sync(device)
        if r:   # the first run warms up kernels and allocators
            best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def time_decode(batch: int, device, autocast, repeats: int) -> float:
    vae = AutoencoderKL(KL16).to(device).eval()
    z = torch.randn(batch, KL16.embed_dim, 16, 16, device=device)
    best = float("inf")
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            vae.decode(z)
        _sync(device)
        if r:
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small", choices=["small", *CONFIGS])
    p.add_argument("--batch", type=int, default=None, help="images per sampler call (cpu 4, cuda 64)")
    p.add_argument("--flow-steps", type=int, default=None, help="SDE steps per cell (cpu 6, cuda 40)")
    p.add_argument("--cfg", type=float, default=2.7)
    p.add_argument("--autocast", default=None, choices=["none", "bf16", "fp16"], help="default: bf16 on cuda")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode", action="store_true", help="also time the release KL-16 decoder (random weights)")
    p.add_argument("--compare", type=int, default=None, metavar="REPEATS",
                   help="only compare family.sample with the official loop, interleaved REPEATS times")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 4)
    steps = args.flow_steps or (40 if gpu else 6)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    net = XAR(SMALL if args.model == "small" else CONFIGS[args.model]).to(device).eval()
    args.autocast = args.autocast or ("bf16" if gpu else "none")
    autocast = AUTOCAST[args.autocast]
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"xAR {args.model} ({params:.1f}M params) on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ''}, batch {batch}, {steps} steps/cell, "
          f"cfg {args.cfg}, autocast {args.autocast}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if args.compare:
        compare(net, batch, steps, args.cfg, device, args.compare)
        return
    with_cache = time_sampler(net, batch, steps, args.cfg, True, autocast, device, args.repeats)
    without = time_sampler(net, batch, steps, args.cfg, False, autocast, device, args.repeats)
    print(f"  sampler, KV cache      : {with_cache:8.3f} s/batch  {batch / with_cache:9.2f} img/s")
    print(f"  sampler, recompute     : {without:8.3f} s/batch  {batch / without:9.2f} img/s")
    print(f"  KV cache speed-up      : {without / with_cache:8.2f}x")
    if gpu:
        print(f"  peak memory            : {torch.cuda.max_memory_allocated(device) / 2**30:8.2f} GiB")
    if args.decode:
        dec = time_decode(batch, device, autocast, args.repeats)
        print(f"  KL-16 decode           : {dec:8.3f} s/batch  {batch / dec:9.2f} img/s")


if __name__ == "__main__":
    main()
