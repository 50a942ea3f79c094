"""Ours against an official-equivalent baseline in one process: interleaved runs, medians, a ratio.

The baseline is the same network called the way the official sampler calls it (batched, one random stream for the
batch, no per-image work); ours is the family's `sample` as `neon sample` calls it. Both run alternately, so a
machine that gets busier slows both alike; the ratio of the medians is what the bench reports (>= 1.0: ours is
at least as fast).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(ours: Callable[[], object], official: Callable[[], object], device: torch.device,
                repeats: int = 5) -> tuple[float, float]:
    """Median seconds of `ours` and `official`, run alternately `repeats` times each after one warm-up each
    (the order alternates too, so neither always runs on a warm cache)."""
    ours(), official()
    times = {"ours": [], "official": []}
    for r in range(repeats):
        order = (("ours", ours), ("official", official)) if r % 2 == 0 else (("official", official), ("ours", ours))
        for name, fn in order:
            times[name].append(seconds(fn, device))
    return statistics.median(times["ours"]), statistics.median(times["official"])


def report(family: str, batch: int, ours_s: float, official_s: float) -> float:
    """Print both rates and their ratio; return the ratio (ours / official images/s)."""
    ratio = official_s / ours_s
    print(f"  {family} family.sample      : {batch / ours_s:9.2f} img/s   (median {ours_s:.3f} s/batch)")
    print(f"  official-equivalent      : {batch / official_s:9.2f} img/s   (median {official_s:.3f} s/batch)")
    print(f"  ratio ours / official    : {ratio:9.2f}")
    return ratio
