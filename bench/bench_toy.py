"""`neon toy` against the FLOP floor of its own work, measured in the same process.

    python bench/bench_toy.py [--quick] [--threads N] [--before-seconds S]

Counts the multiply-adds of every network call the run makes (sampling, training forward + backward ≈ 3×
forward, gradient estimates), measures this machine's rate for the product that dominates them — a
(4096, 32) @ (32, 32) float32 matmul, run on N threads at once as the toy runs N workers — before and after
the run, and prints the run's wall time, its FLOP count, the floor (FLOPs / best measured rate) and the
ratio. --before-seconds S also prints the ratio of an earlier measured run time S (e.g. the figure bench/README.md
gives for the code before the batched sampler: 1560 s, one thread of a quiet 2-core machine) to the same floor.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from experiments.toy import experiment
from experiments.toy.experiment import FULL, QUICK, ToySettings

WIDTH, BLOCKS = 32, 4            # EpsMLP: [x, t] -> 32, four 32 -> 32 blocks, 32 -> 2
AR_WIDTH = 64                    # ARGaussian2D's conditional: 1 -> 64 -> 64 -> 2


def diffusion_macs(t_in: int) -> int:
    return (2 + t_in) * WIDTH + BLOCKS * WIDTH * WIDTH + WIDTH * 2


def toy_flops(settings: ToySettings) -> dict[str, float]:
    """FLOPs (2 × multiply-adds) of the run's network calls, by stage; training counts 3× the forward pass."""
    d, a = settings.diffusion, settings.ar
    sample = 2 * diffusion_macs(0) * (d.sample_steps - 1)     # per sample; t folds into the input layer's bias
    train = 3 * 2 * diffusion_macs(1)                         # per row and step
    ar = 2 * (AR_WIDTH + AR_WIDTH * AR_WIDTH + AR_WIDTH * 2)  # per row
    n_fid = 1 + len(d.zetas) * len(d.finetune_steps) * len(d.w)
    flops = dict(
        diffusion_fid=sample * n_fid * d.n_fid,
        diffusion_other_sampling=sample * (len(d.zetas) * d.n_synthetic + len(d.cos_zetas) * d.n_cos_synthetic
                                           + 2 * settings.n_show),
        diffusion_training=train * (d.base_steps * d.n_real + len(d.zetas) * max(d.finetune_steps) * d.n_synthetic),
        diffusion_gradients=train * d.cos_passes * (d.n_cos_real + len(d.cos_zetas) * d.n_cos_synthetic),
        ar_sampling=ar * ((1 + len(a.taus) * len(a.finetune_epochs) * len(a.w)) * a.n_fid
                          + len(a.taus) * a.n_synthetic + len(a.cos_taus) * a.n_cos_synthetic),
        ar_training=3 * ar * (a.base_epochs * a.n_real + len(a.taus) * max(a.finetune_epochs) * a.n_synthetic
                              + a.n_cos_real + len(a.cos_taus) * a.n_cos_synthetic),
    )
    return {k: float(v) for k, v in flops.items()}


def matmul_rate(threads: int, seconds: float = 2.0) -> float:
    """FLOP/s of (4096, 32) @ (32, 32) products, `threads` at a time (each thread with torch on one thread)."""
    a, b = torch.randn(4096, WIDTH), torch.randn(WIDTH, WIDTH)
    reps = 200

    def work(_):
        out = torch.empty(4096, WIDTH)
        for _ in range(reps):
            torch.mm(a, b, out=out)

    best, end = 0.0, time.perf_counter() + seconds
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            list(pool.map(work, range(threads)))
            best = max(best, threads * reps * 2 * 4096 * WIDTH * WIDTH / (time.perf_counter() - t0))
    return best


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the toy's sampling processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the --quick settings instead of the full run")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="worker threads")
    p.add_argument("--before-seconds", type=float, help="an earlier run time to compare with the same floor")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    flops = toy_flops(settings)
    total = sum(flops.values())
    rate_before = matmul_rate(args.threads)
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = experiment.run_toy(quick=args.quick, progress=False, threads=args.threads)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    rate_after = matmul_rate(args.threads)
    rate = max(rate_before, rate_after)
    floor = total / rate
    print(experiment.format_table(result))
    print(f"settings: {'quick' if args.quick else 'full'}; threads: {args.threads}; torch {torch.__version__}")
    for stage, f in flops.items():
        print(f"  {stage:<26} {f:.3e} FLOP")
    print(f"FLOP count: {total:.3e}")
    print(f"matmul rate, {args.threads} thread(s): {rate_before / 1e9:.1f} GFLOP/s before, "
          f"{rate_after / 1e9:.1f} after (best used)")
    print(f"floor: {floor:.1f} s; run: {wall:.1f} s wall ({cpu:.1f} s CPU); ratio to floor: {wall / floor:.2f}")
    print("stages (s): " + json.dumps(result["timings_s"]))
    figures = dict(settings="quick" if args.quick else "full", threads=args.threads, flops=flops, flop_total=total,
                   rate_flops_per_s=[rate_before, rate_after], floor_s=floor, wall_s=wall, cpu_s=cpu,
                   ratio=wall / floor, timings_s=result["timings_s"])
    if args.before_seconds:
        figures["before_ratio"] = args.before_seconds / floor
        print(f"before: {args.before_seconds:.0f} s -> ratio to the same floor {args.before_seconds / floor:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
