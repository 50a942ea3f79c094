"""The final evaluation repeated on K disjoint seed ranges (`final.repeats`): each range's numbers, their
mean ± std, and the paired difference θneon − θr per range (both models see the same seeds in each range, so
the difference cancels much of the sampling noise that the per-model std carries).

std is the sample standard deviation (n − 1 in the denominator; None for a single range).
"""
from __future__ import annotations

import statistics

from neon.errors import NeonError


def metric_keys(result: dict) -> list[str]:
    """The measured numbers of one evaluation (fid, is_mean, kid_mean, fd_dinov2, ...): its float values."""
    return [k for k, v in result.items() if isinstance(v, float) and k != "seconds"]


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def combine_ranges(ranges: list[dict]) -> dict:
    """One result from the results of K seed ranges (each with its 'seeds' [first, last]): every measured
    number is the mean over the ranges, 'std' holds their std, 'ranges' the per-range results, and 'seeds' the
    span [first seed of the first range, last seed of the last]. A single range is returned as it is."""
    if len(ranges) == 1:
        return dict(ranges[0])
    keys = metric_keys(ranges[0])
    out = {k: v for k, v in ranges[0].items() if k not in keys}
    out.update({k: statistics.fmean(r[k] for r in ranges) for k in keys})
    out.update(seeds=[ranges[0]["seeds"][0], ranges[-1]["seeds"][1]], std={k: _std([r[k] for r in ranges])
                                                                           for k in keys}, ranges=list(ranges))
    return out


def per_range(result: dict) -> list[dict]:
    """The per-range results of a (possibly combined) evaluation."""
    return result.get("ranges") or [result]


def paired_difference(neon: dict, base: dict) -> dict:
    """{metric: {'per_range': [θneon − θr on each range], 'mean', 'std'}} for every number both recorded. The
    ranges must be the same seeds, range by range."""
    n, b = per_range(neon), per_range(base)
    if [r.get("seeds") for r in n] != [r.get("seeds") for r in b]:
        raise NeonError("final.repeats: θneon's final evaluation (sweep/<snapshot>-final.json) used other seed ranges "
                        "than θr's; the final section changed since: remove those files to evaluate θneon again")
    out = {}
    for k in metric_keys(n[0]):
        if all(isinstance(r.get(k), float) for r in b):
            diffs = [x[k] - y[k] for x, y in zip(n, b)]
            out[k] = {"per_range": diffs, "mean": statistics.fmean(diffs), "std": _std(diffs)}
    return out
