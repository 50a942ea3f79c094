"""Rough GPU-hours to rerun Neon for each paper row, from FLOP counts — an estimate, not a measurement.

    python scripts/estimate_compute.py [--tflops-bf16 400] [--tflops-fp32 150] [--rows ROW ...] [--no-simulation]

Image counts come from configs/*.yaml: the synthetic set, the self-training length, and for every swept θs
snapshot its sweep (every point of every setting's grid, e.g. IMM's per-step-count grids, no early stop, plus the
refinement's neighbours) and a final evaluation of θneon at its best point; θr's final evaluation once. Network
cost per image:
  - EDM: forward FLOPs of the release SongUNet, counted with torch's FlopCounterMode on the meta device, times
    the sampler's 2N−1 evaluations; training 3× a forward (forward + backward);
  - VAR, xAR, IMM (transformers): 2·P FLOPs per token per forward plus attention (4·L·d per token per layer),
    P and the layer sizes of the release models; VAR samples each token once (KV cache) for both guidance
    branches; xAR runs its whole network on one 64-token cell per flow step (both branches except on cell 0);
    IMM runs the DiT once per step on both branches; IMM's loss adds a no-grad target pass (4× a forward).
Selection columns (unless --no-simulation): both protocols walked on simulated FID surfaces of the row's own
grids, snapshots and stop rules (experiments/selection/simulate.py; the noise of an n-image FID comes from
simulated features), the optimum at the low end, the middle and the high end of the grids: points visited per
snapshot (the official walk's expected count, not its upper bound), GPU-hours of the images each protocol samples
to choose (official: sweep points + every snapshot's final; adaptive: every measurement), their ratio, and how much
higher the true FID of the adaptive choice is than the official choice's (worst position; 0 or below: as good).
The VAE/tokenizer and the Inception detector are left out (small next to the generators). Sustained
throughputs are assumptions: H100 at ~40% of its dense bf16 peak for the bf16/fp16 families, TF32 for EDM.

Memory (a second table, --gpus G, --gpu-memory GB): self-training's peak per GPU at the config's global batch on
G GPUs — fp32 weights, gradients and Adam's two moments (16 bytes per parameter), the EMA copy, θr kept on the
device beside the trained copy (4 each), autocast's 16-bit weight copies (2), and the activations the backward
keeps per image: EDM's counted by a saved-tensor hook on the release network at batch 1 on the meta device (an
upper bound: a tensor two ops keep counts twice); the transformers' from Korthikanti et al. 2022 (34 bytes per
token per width per layer in 16 bits, flash attention: no tokens² term). It prints the total, whether it fits,
and how many micro-batches per step (finetune.accumulate) would make it fit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neon.config import load_config, snapshot_images, snapshot_suffix
from neon.snapshot_sweep import select_snapshots
from neon.sweep import setting_grids

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # experiments/ (the selection simulation) beside the installed neon package

# Transformer shapes of the release models: parameters P (the manifests' counts), depth, width, tokens per image.
TRANSFORMERS = {
    "var_d16_256": dict(P=310.76e6, depth=16, width=1024, tokens=680),
    "var_d36_512": dict(P=2359.0e6, depth=36, width=2304, tokens=2240),
    "xar_b_256": dict(P=173.2e6, depth=24, width=768, tokens=256),
    "xar_l_256": dict(P=609.5e6, depth=32, width=1024, tokens=256),
    "imm_in256": dict(P=676.7e6, depth=28, width=1152, tokens=256),
}
EDM_NETWORKS = {
    "edm_cifar10_cond": dict(img_resolution=32, label_dim=10, channel_mult=[2, 2, 2], dropout=0.13),
    "edm_cifar10_uncond": dict(img_resolution=32, label_dim=0, channel_mult=[2, 2, 2], dropout=0.13),
    "edm_ffhq64": dict(img_resolution=64, label_dim=0, channel_mult=[1, 2, 2, 2], dropout=0.05),
}


def edm_forward_flops(row: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from neon.family import get_family
    get_family("edm")  # the family is installed; its builder makes the release network on the meta device
    from edm.checkpoint import build_network
    kw = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, num_blocks=4, attn_resolutions=[16],
              augment_dim=9, use_fp16=False, img_channels=3, **EDM_NETWORKS[row])
    net = build_network("EDMPrecond", kw, "meta")
    r = kw["img_resolution"]
    labels = torch.zeros(1, kw["label_dim"], device="meta") if kw["label_dim"] else None
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, r, r, device="meta"), torch.ones(1, device="meta"), labels)
    return float(counter.get_total_flops())


def edm_memory(row: str) -> tuple[float, float]:
    """(parameters, bytes the backward keeps per training image) of the release network, on the meta device."""
    import torch

    from neon.family import get_family
    get_family("edm")
    from edm.checkpoint import build_network
    kw = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, num_blocks=4, attn_resolutions=[16],
              augment_dim=9, use_fp16=False, img_channels=3, **EDM_NETWORKS[row])
    net = build_network("EDMPrecond", kw, "meta").train().requires_grad_(True)
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t
    r, labels = kw["img_resolution"], kw["label_dim"]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.zeros(1, 3, r, r, device="meta"), torch.ones(1, device="meta"),
            torch.zeros(1, labels, device="meta") if labels else None, augment_labels=torch.zeros(1, 9, device="meta"))
    return float(sum(p.numel() for p in net.parameters())), float(kept[0])


def memory(row: str, cfg, gpus: int) -> dict:
    """Self-training's peak bytes per GPU: {'params', 'states', 'per_image', 'images', 'total'}."""
    if row in EDM_NETWORKS:
        P, per_image = edm_memory(row)
        half = 0                                    # EDM trains in fp32 (TF32)
    else:
        shape = TRANSFORMERS[row]
        P, per_image = shape["P"], 34 * shape["tokens"] * shape["width"] * shape["depth"]
        half = 2
    states = P * (16 + (4 if cfg.finetune.ema else 0) + 4 + half)
    images = cfg.finetune.batch / gpus
    return dict(params=P, states=states, per_image=per_image, images=images, total=states + images * per_image)


def micro_batches(m: dict, budget: float) -> int | None:
    """Micro-batches per step that fit `budget` bytes (1: as configured), None if the states alone do not."""
    room = budget - m["states"]
    if room < m["per_image"]:
        return None
    k = 1
    while m["images"] / k * m["per_image"] > room:
        k += 1
    return k


def transformer_forward_flops(shape: dict, tokens: int, context: int | None = None) -> float:
    """One forward over `tokens` tokens attending to `context` tokens (default: themselves)."""
    context = tokens if context is None else context
    return 2 * shape["P"] * tokens + 4 * shape["depth"] * shape["width"] * tokens * context


def costs(row: str, cfg) -> tuple[float, float, str]:
    """(sampling FLOPs per image with the row's sampler settings, training FLOPs per image, precision)."""
    s = cfg.synthetic.sampler
    if row in EDM_NETWORKS:
        f = edm_forward_flops(row)
        nfe = 2 * s.get("num_steps", 18) - 1
        return f * nfe, 3 * f, "fp32"
    shape = TRANSFORMERS[row]
    L = shape["tokens"]
    if row.startswith("var"):
        sample = 2 * transformer_forward_flops(shape, L, L // 2)  # each token once, on average half the context
        return sample, 3 * transformer_forward_flops(shape, L), "bf16"
    if row.startswith("xar"):
        steps, cells = s.get("flow_steps", 50), 4
        per_cell = transformer_forward_flops(shape, L // cells, L // 2)
        sample = steps * per_cell * (1 + 2 * (cells - 1))  # cell 0 unguided, the rest on both branches
        return sample, 3 * transformer_forward_flops(shape, L), "bf16"
    steps = s.get("steps", 8)  # IMM
    return 2 * steps * transformer_forward_flops(shape, L), 4 * transformer_forward_flops(shape, L), "bf16"


def snapshots_swept(cfg) -> int:
    """How many θs snapshots the sweep walks: the run's own choice (neon.snapshot_sweep.select_snapshots) among the
    files its finetune section writes."""
    written = [f"snapshot-{n:010d}{snapshot_suffix(cfg) or ''}" for n in snapshot_images(cfg.finetune)]
    return len(select_snapshots(written, cfg.sweep.snapshot))


def simulate_selection(cfg, positions: list[float]) -> dict:
    """Both protocols walked on simulated surfaces of this row's grids (experiments/selection/simulate.py), the
    optimum at each of `positions` along the grids: mean images and points of each, setting by setting
    (image-equivalents at the synthetic sampler's cost), and the worst true-FID excess of the adaptive choice."""
    from experiments.selection.simulate import Surface, adaptive, bowl, official
    c, n_snap = cfg.sweep, snapshots_swept(cfg)
    out = {"official": 0.0, "official_points": 0.0, "adaptive": 0.0, "adaptive_points": 0.0, "excess": 0.0}
    for setting, ws, guidance in setting_grids(c):
        scale = setting["steps"] / cfg.synthetic.sampler["steps"] if "steps" in setting else 1
        for pos in positions:
            truth = bowl(ws, guidance, n_snap, pos)
            o = official(Surface(truth, n_snap, ws, guidance), c.num_images, cfg.final.num_images, c.tolerance,
                         c.stop or "previous", c.refine, c.refine_pattern or "3x3", c.refine_centre or "frozen",
                         ws, guidance)
            a = adaptive(Surface(truth, n_snap, ws, guidance), c.num_images)
            out["official"] += o.images * scale / len(positions)
            out["official_points"] += o.points / len(positions)
            out["adaptive"] += a.images * scale / len(positions)
            out["adaptive_points"] += a.points / len(positions)
            out["excess"] = max(out["excess"], a.true_fid / o.true_fid - 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tflops-bf16", type=float, default=400.0, help="sustained TFLOP/s, bf16/fp16 (H100 ~40%%)")
    p.add_argument("--tflops-fp32", type=float, default=150.0, help="sustained TFLOP/s, fp32 via TF32")
    p.add_argument("--rows", nargs="+", help="only these rows (config names)")
    p.add_argument("--no-simulation", action="store_true",
                   help="skip the selection columns (simulated walks of both protocols: a few minutes)")
    p.add_argument("--positions", type=float, nargs="+", default=[0.15, 0.5, 0.85],
                   help="where the simulated optimum sits along the grids (0: low end, 1: high end)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the memory table divides the global batch over")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (H100: 80)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table")
    args = p.parse_args()
    head = f"{'row':<20} {'S':>8} {'self-train':>11} {'snapshots':>10} {'sweep':>8} {'final':>8} {'total GPU-h':>12}"
    if not args.no_simulation:
        head += f" {'official pts':>13} {'official sel GPU-h':>19} {'adaptive pts':>13} {'adaptive sel GPU-h':>19}" \
                f" {'ratio':>6} {'FID excess':>11}"
    print(head)
    for row in args.rows or [*EDM_NETWORKS, *TRANSFORMERS]:
        cfg = load_config(str(REPO / "configs" / f"{row}.yaml"))
        sample, train, precision = costs(row, cfg)
        rate = 1e12 * (args.tflops_fp32 if precision == "fp32" else args.tflops_bf16)
        refine = {"3x3": 8, "cross": 4, None: 4}[cfg.sweep.refine_pattern] if cfg.sweep.refine else 0
        sweep_images = final_images = 0.0   # image-equivalents at the synthetic sampler's cost
        for setting, ws, guidance in setting_grids(cfg.sweep):
            scale = setting["steps"] / cfg.synthetic.sampler["steps"] if "steps" in setting else 1
            n_points = len(ws) * len(guidance or [None]) + (refine if guidance else min(refine, 2))
            sweep_images += n_points * cfg.sweep.num_images * scale
            final_images += cfg.final.num_images * scale
        n_snap = snapshots_swept(cfg)
        classes = 10 if row.startswith("edm") else 1000
        n_syn = cfg.synthetic.per_class * classes if cfg.synthetic.per_class else cfg.synthetic.num_images
        # Every snapshot: its sweep and a final evaluation of θneon at its best point; θr's final evaluation once.
        hours = [n_syn * sample / rate / 3600, cfg.finetune.total_images * train / rate / 3600,
                 n_snap * sweep_images * sample / rate / 3600, (n_snap + 1) * final_images * sample / rate / 3600]
        line = (f"{row:<20} {hours[0]:8.1f} {hours[1]:11.1f} {n_snap:10d} {hours[2]:8.1f} {hours[3]:8.1f}"
                f" {sum(hours):12.0f}")
        if not args.no_simulation:
            sim = simulate_selection(cfg, args.positions)
            gpu_h = lambda images, sample=sample, rate=rate: images * sample / rate / 3600
            line += (f" {sim['official_points'] / n_snap:13.1f} {gpu_h(sim['official']):19.1f}"
                     f" {sim['adaptive_points'] / n_snap:13.1f} {gpu_h(sim['adaptive']):19.1f}"
                     f" {sim['adaptive'] / sim['official']:6.3f} {100 * sim['excess']:10.2f}%")
        print(line, flush=True)
    if not args.no_memory:
        print_memory(args.rows or [*EDM_NETWORKS, *TRANSFORMERS], args.gpus, args.gpu_memory)


def print_memory(rows: list[str], gpus: int, gpu_memory: float) -> None:
    gib = 2 ** 30
    print(f"\nself-training memory per GPU, global batch over {gpus} GPUs of {gpu_memory:g} GB (an estimate):")
    print(f"{'row':<20} {'params':>9} {'states GiB':>11} {'act/img GiB':>12} {'img/GPU':>8} {'total GiB':>10}"
          f"  fits?")
    for row in rows:
        cfg = load_config(str(REPO / "configs" / f"{row}.yaml"))
        m = memory(row, cfg, gpus)
        k = micro_batches(m, 0.92 * gpu_memory * 1e9)   # the allocator and the CUDA context keep some
        verdict = ("yes" if k == 1 else f"with finetune.accumulate: {k}" if k else "no: the states alone do not")
        print(f"{row:<20} {m['params'] / 1e6:8.1f}M {m['states'] / gib:11.1f} {m['per_image'] / gib:12.3f} "
              f"{m['images']:8.1f} {m['total'] / gib:10.1f}  {verdict}", flush=True)


if __name__ == "__main__":
    main()
