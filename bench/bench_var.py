"""VAR sampling throughput: KV-cached next-scale sampling vs. a no-cache reference, in one run.

The reference recomputes every earlier scale at every step with the block-causal mask (what sampling costs
without a cache); both use the same network, random weights and per-image generators, and sample the same
tokens. Tokens/s counts the L = Σ pn² tokens of every image (CFG doubles the network's batch in both).

    python bench/bench_var.py                        # CPU: depth 4, 256px token layout (L = 680), batch 4
    python bench/bench_var.py --device cuda          # GPU: VAR-d16 + release VQVAE structure, batch 64, bf16
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from compare import interleaved, report

from neon.family import Bundle
from var.adapter import VARFamily
from var.checkpoint import RELEASE_PATCH_NUMS
from var.invariant import batch_invariant
from var.model import VAR, KVCache
from var.sampler import sample, top_k_top_p_filter
from var.vqvae import VQVAE


def build(depth: int, device: torch.device, full_vae: bool, resolution: int) -> tuple[VAR, VQVAE]:
    patch_nums = RELEASE_PATCH_NUMS[resolution]
    vae_kwargs = dict(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=patch_nums) if full_vae else \
        dict(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1,), num_res_blocks=1, v_patch_nums=patch_nums)
    torch.manual_seed(0)
    vae = VQVAE(**vae_kwargs).to(device)
    var = VAR(vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth, attn_l2_norm=True,
              shared_aln=resolution == 512, patch_nums=patch_nums)
    var.init_weights(init_head=1.0, init_adaln_gamma=0.5)   # livelier than official init: a realistic top-k
    return var.to(device).eval(), vae.eval()


@torch.no_grad()
def official_equivalent(var: VAR, vae: VQVAE, labels: torch.Tensor, cfg: float, top_k: int, top_p: float,
                        rng: torch.Generator) -> torch.Tensor:
    """The official autoregressive_infer_cfg, KV-cached, batched: [cond; uncond] rows through the transformer at
    every scale, guidance ramped with the scale, top-k / top-p, then every token of the batch drawn by one
    torch.multinomial from one generator; the image quantised as Neon's scripts (floor(255·x)).
    -> uint8 (B, H, W, 3)."""
    B, S, P, V = labels.shape[0], len(var.patch_nums), var.patch_nums[-1], var.V
    quant = vae.quantize
    cond = var.class_cond(torch.cat((labels, torch.full_like(labels, var.num_classes))))
    x = var.first_tokens(cond)
    caches = [KVCache() for _ in var.blocks]
    f_hat = cond.new_zeros(B, var.Cvae, P, P, dtype=torch.float32)
    for si, pn in enumerate(var.patch_nums):
        logits = var.backbone(x, cond, caches=caches)
        t = cfg * si / (S - 1)
        guided = top_k_top_p_filter((1 + t) * logits[:B] - t * logits[B:], top_k, top_p)
        idx = torch.multinomial(guided.softmax(dim=-1).view(-1, V), 1, replacement=True, generator=rng)
        h = quant.embedding(idx.view(B, pn * pn)).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
        f_hat, next_map = quant.next_autoregressive_input(si, f_hat, h)
        if next_map is not None:
            x = var.next_tokens(next_map.flatten(2).transpose(1, 2), si + 1).repeat(2, 1, 1)
    img = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    return img.float().clamp_(0, 1).mul_(255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def compare(var: VAR, vae: VQVAE, batch: int, device: torch.device, args) -> None:
    """VARFamily.sample (as `neon sample` calls it; oneDNN on) and in its batch-invariant mode, against the
    official loop, interleaved in this process."""
    bundle = Bundle(net=var, helpers={"vae": vae}, num_classes=var.num_classes, resolution=vae.resolution)
    family, seeds = VARFamily(), list(range(batch))
    labels = torch.arange(batch) % var.num_classes
    rng = torch.Generator(device).manual_seed(0)
    kwargs = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)

    def official():
        return official_equivalent(var, vae, labels.to(device), args.cfg, args.top_k, args.top_p, rng)

    ours_s, official_s = interleaved(lambda: family.sample(bundle, seeds, labels, **kwargs), official, device,
                                     args.compare_repeats)
    report("var", batch, ours_s, official_s)
    inv_s, official_s = interleaved(lambda: family.sample(bundle, seeds, labels, batch_invariant=True, **kwargs),
                                    official, device, args.compare_repeats)
    print(f"  batch-invariant (opt-in) : {batch / inv_s:9.2f} img/s   ({official_s / inv_s:.2f}x the official "
          f"{batch / official_s:.2f} img/s of the same runs)")


def run(var, vae, batch: int, use_cache: bool, amp, device, args) -> tuple[float, torch.Tensor]:
    labels = torch.arange(batch, device=device) % var.num_classes
    gens = [torch.Generator(device).manual_seed(s) for s in range(batch)]
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        img = sample(var, vae, labels, gens, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, img


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=None, help="default: 4 on CPU, 16 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 64 on CUDA")
    p.add_argument("--resolution", type=int, default=256, choices=sorted(RELEASE_PATCH_NUMS))
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--top_k", type=int, default=900)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--no-reference", action="store_true", help="time only the cached sampler")
    p.add_argument("--compare-repeats", type=int, default=7, help="interleaved runs against the official loop")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison with the official loop")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    depth = args.depth or (16 if cuda else 4)
    batch = args.batch or (64 if cuda else 4)
    amp_name = args.amp or ("bf16" if cuda else "none")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp_name]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    var, vae = build(depth, device, full_vae=cuda, resolution=args.resolution)
    L = var.L
    print(f"VAR depth {depth} (width {var.C}), L={L} tokens/image, batch {batch}, {amp_name}, device {device}, "
          f"{torch.get_num_threads()} CPU threads" + (f", {torch.cuda.get_device_name(device)}" if cuda else ""))

    modes = [("kv-cache", True)] + ([] if args.no_reference else [("no-cache reference", False)])
    rates, images = {}, {}
    invariant = batch_invariant(False)   # time the plain kernels, as a GPU worker runs them
    with invariant, torch.inference_mode():
        for name, use_cache in modes:
            run(var, vae, batch, use_cache, amp, device, args)                       # warm-up
            times = []
            for _ in range(args.repeats):
                dt, img = run(var, vae, batch, use_cache, amp, device, args)
                times.append(dt)
            best = min(times)
            rates[name] = batch * L / best
            images[name] = img
            print(f"  {name:20s} {rates[name]:12.0f} tokens/s   {batch / best:8.2f} images/s   "
                  f"(best of {args.repeats}: {best:.3f} s)")
    if not args.no_compare:
        compare(var, vae, batch, device, args)
    if len(rates) == 2:
        same = (images["kv-cache"] - images["no-cache reference"]).abs().max().item()
        print(f"  speed-up of the KV cache: {rates['kv-cache'] / rates['no-cache reference']:.2f}x "
              f"(max image difference between the two: {same:.2e})")


if __name__ == "__main__":
    main()
