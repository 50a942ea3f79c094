"""EDM sampler throughput at the CIFAR-10 release architecture, and what faster arithmetic does to the images.

CPU (default): images/s of the Heun sampler for EDMPrecond + DDPM++ at 32x32 (55.7M parameters, random weights
or --network), batch 64, a few steps.

CUDA (--device cuda): the same for float32 eager (the official arithmetic), bf16 autocast, and each under
torch.compile, with the FID-relevant difference of every variant to float32 eager on the same seeds: the max
and mean absolute difference of the uint8 images and the share of pixel values that change.

    python bench/bench_edm.py                                  # CPU, batch 64, 2 steps
    python bench/bench_edm.py --device cuda --steps 18 --batch 256
    python bench/bench_edm.py --device cuda --network checkpoints/edm-cifar10-32x32-cond-vp.pkl
    python bench/bench_edm.py --tiny --variants fp32,bf16,fp32-compiled,bf16-compiled   # code-path check on CPU
    python bench/bench_edm.py --batch 16 --compare 5           # family.sample vs the official loop (ratio)
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from compare import interleaved, report

from edm.adapter import EDMFamily, randomize
from edm.checkpoint import build_network, load_network
from edm.sampler import SeededNoise, edm_sampler, to_uint8
from neon.family import Bundle

# The released edm-cifar10-32x32-cond-vp network (EDM README training table; see the fixture manifests).
CIFAR10_COND = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                    channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, use_fp16=False, img_resolution=32,
                    img_channels=3, label_dim=10)


VARIANTS = {"fp32": (False, False), "bf16": (True, False), "fp32-compiled": (False, True),
            "bf16-compiled": (True, True)}   # name -> (bf16 autocast, torch.compile)


def make_network(args, device):
    if args.network:
        return load_network(args.network, device)
    if args.tiny:
        return EDMFamily().tiny(device=device).net
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_network("EDMPrecond", CIFAR10_COND, "cpu")
    randomize(net, seed=0)   # every layer contributes (the official init zeroes the output layers)
    return net.to(device).eval()


def run(net, seeds, steps, device, autocast: bool):
    noise = SeededNoise(seeds, device)
    latents = noise.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(len(seeds)) % net.label_dim, net.label_dim)
        labels = labels.to(device, torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        images = edm_sampler(net, latents, labels, num_steps=steps)
    return to_uint8(images).cpu()


@torch.no_grad()
def official_equivalent(net, seeds, labels: torch.Tensor | None, num_steps: int, sigma_min=0.002, sigma_max=80,
                        rho=7, device="cpu") -> torch.Tensor:
    """EDM's generate.py for one batch: latents from one generator per seed (StackedRandomGenerator, on the
    sampling device), the Heun loop in float64 with the network called on the whole batch, and the churn noise
    drawn at every step as the official loop does (multiplied by 0 at S_churn = 0). -> uint8 (B, H, W, C)."""
    gens = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    class_labels = None if labels is None else torch.eye(net.label_dim, device=device)[labels.to(device)]
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        t_hat = net.round_sigma(t_cur)   # gamma = 0 at S_churn = 0
        noise = torch.stack([torch.randn(x_cur.shape[1:], generator=g, device=device, dtype=x_cur.dtype)
                             for g in gens])
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * noise
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return (x_next * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def compare(net, batch: int, steps: int, device, repeats: int) -> float:
    """EDMFamily.sample (as `neon sample` calls it) against the official generate.py loop, interleaved."""
    bundle = Bundle(net=net, num_classes=int(net.label_dim), resolution=int(net.img_resolution))
    seeds = list(range(batch))
    labels = torch.arange(batch) % net.label_dim if net.label_dim else None
    ours_s, official_s = interleaved(lambda: EDMFamily().sample(bundle, seeds, labels, num_steps=steps),
                                     lambda: official_equivalent(net, seeds, labels, steps, device=device),
                                     device, repeats)
    return report("edm", batch, ours_s, official_s)


def timed(fn, device, repeats, warmup):
    for _ in range(warmup):  # warm-up (and compilation)
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="Heun steps (2N-1 network calls)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--network", default=None, help="an EDM checkpoint instead of random weights")
    parser.add_argument("--tiny", action="store_true", help="the tiny test network (a quick check of the code paths)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: fp32 on CPU, all on CUDA)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--compare", type=int, default=None, metavar="REPEATS",
                        help="only compare family.sample with the official loop, interleaved REPEATS times")
    args = parser.parse_args()

    device = torch.device(args.device)
    net = make_network(args, device)
    seeds = list(range(args.batch))
    nfe = 2 * args.steps - 1
    names = args.variants.split(",") if args.variants else (list(VARIANTS) if device.type == "cuda" else ["fp32"])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    compiled = torch.compile(net) if any(VARIANTS[n][1] for n in names) else None

    print(f"EDMPrecond/SongUNet {net.img_resolution}x{net.img_resolution}, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params, batch {args.batch}, {args.steps} steps "
          f"({nfe} NFE), device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.compare:
        compare(net, args.batch, args.steps, device, args.compare)
        return
    results, reference = [], None
    for name in names:   # the first variant is the reference of the differences (fp32 by default)
        autocast, use_compiled = VARIANTS[name]
        model = compiled if use_compiled else net
        def call(model=model, autocast=autocast):
            return run(model, seeds, args.steps, device, autocast)
        images, seconds = timed(call, device, args.repeats, warmup if not use_compiled else max(warmup, 1))
        row = dict(variant=name, seconds=seconds, images_per_s=args.batch / seconds,
                   nfe_images_per_s=args.batch * nfe / seconds)
        if reference is None:
            reference = images
        diff = (images.int() - reference.int()).abs()
        row.update(max_uint8_diff=int(diff.max()), mean_uint8_diff=float(diff.float().mean()),
                   changed_share=float((diff > 0).float().mean()))
        results.append(row)
        print(f"{name:>14}: {row['images_per_s']:9.2f} images/s ({row['nfe_images_per_s']:9.1f} image-NFE/s), "
              f"{seconds:7.2f} s; vs {names[0]}: max |Δ| {row['max_uint8_diff']} uint8, "
              f"mean {row['mean_uint8_diff']:.4f}, changed {100 * row['changed_share']:.2f}% of values")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
