"""Both selection protocols walked on simulated FID surfaces, where the truth is known and a walk costs nothing.

A surface gives every grid point (snapshot, w, guidance) a true FID. Its measurements are made the way a run
makes them: D-dimensional features of n images, the same seeds for every point (common random numbers), and the
Fréchet distance to the reference N(0, I) — so the noise of an n-image FID, its small-n bias and the correlation
between points all come from feature statistics, not from a guessed constant. Image i of point p has features
    x_i(p) = μ(p) + z_i + τ·ξ_i(p),
z_i shared by every point (the seed's noise), ξ_i(p) the point's own (images of two merges differ a little even on
one seed), μ(p) along a fixed direction with |μ(p)|² = the true FID less the constant that the ξ term adds.

`official` replays neon.search.official_search per snapshot on `num_images` images per point plus a final
evaluation of each snapshot's best point; `adaptive` runs neon.adaptive.Adaptive. Both report the images they
sampled, the point they chose and its true FID.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from neon.adaptive import Adaptive, Estimate, Point
from neon.metrics.frechet import frechet_distance, gaussian_from_features
from neon.metrics.jackknife import frechet_jackknife
from neon.search import official_search

DIM = 16          # feature dimension: enough for a covariance-driven small-n bias, small enough to walk fast
TAU = 0.15        # the per-point part of an image's features, relative to the seed's part


class Surface:
    """Measurements of `truth(snapshot, w, g) -> FID` through simulated features (see the module's docstring)."""

    def __init__(self, truth: Callable[[int, float, float | None], float], snapshots: int, w: Sequence[float],
                 guidance: Sequence[float] | None, seed: int = 0, dim: int = DIM, tau: float = TAU):
        self.truth, self.snapshots, self.dim, self.tau, self.seed = truth, snapshots, dim, tau, seed
        self.w, self.guidance = sorted(w), None if guidance is None else sorted(guidance)
        self.offset = dim * (math.sqrt(1 + tau ** 2) - 1) ** 2   # the FID the ξ term alone adds
        self.sampled = 0
        self._z: torch.Tensor | None = None

    def coords(self, p: Point) -> tuple[int, float, float | None]:
        return p.snapshot, self.w[p.w], None if p.g is None else self.guidance[p.g]

    def features(self, p: Point, first: int, n: int) -> torch.Tensor:
        """Features of images first .. first+n−1 of point p."""
        s, w, g = self.coords(p)
        if self._z is None or self._z.shape[0] < first + n:   # the seeds' noise: the same rows for every point
            self._z = torch.randn(first + n, self.dim, generator=torch.Generator().manual_seed(self.seed),
                                  dtype=torch.float64)
        z = self._z[:first + n]
        tag = zlib.crc32(f"{s}|{w!r}|{g!r}".encode())
        xi = torch.randn(first + n, self.dim, generator=torch.Generator().manual_seed(self.seed * 7919 + tag),
                         dtype=torch.float64)
        shift = torch.zeros(self.dim, dtype=torch.float64)
        shift[0] = math.sqrt(max(self.truth(s, w, g) - self.offset, 0.0))
        self.sampled += n
        return (shift + z + self.tau * xi)[first:]

    def fid(self, p: Point, first: int, n: int) -> float:
        mu, sigma = gaussian_from_features(self.features(p, first, n))
        return frechet_distance(mu, sigma, np.zeros(self.dim), np.eye(self.dim))

    def measure(self, groups: int = 8) -> Callable[[Point, int], Estimate]:
        """measure(point, n) for neon.adaptive: the first n images, cached; images counted per point at its
        largest n (as a run, which keeps a racing point's features and samples only the new ones)."""
        known: dict[tuple, Estimate] = {}
        most: dict[Point, int] = {}

        def measure(p: Point, n: int) -> Estimate:
            if (p, n) not in known:
                x = self.features(p, 0, n)
                self.sampled -= most.get(p, 0)   # only the images beyond those already sampled count
                most[p] = max(most.get(p, 0), n)
                value, jack = frechet_jackknife(x, np.zeros(self.dim), np.eye(self.dim), groups)
                known[(p, n)] = Estimate(value, jack, n)
            return known[(p, n)]
        return measure


@dataclasses.dataclass
class Outcome:
    protocol: str
    images: int
    points: int             # distinct points measured
    choice: tuple           # (snapshot, w, guidance)
    true_fid: float


def official(surface: Surface, num_images: int, final_images: int, tolerance: float | None = None,
             stop: str = "previous", refine: float | None = None, pattern: str = "3x3", centre: str = "frozen",
             w_order: Sequence[float] | None = None, g_order: Sequence[float] | None = None) -> Outcome:
    """The official protocol: per snapshot, the scripts' walk on num_images images per point, then the best
    point's final evaluation on final_images other images; the snapshot with the lowest final wins."""
    surface.sampled, visited, finals = 0, 0, []
    w_index = {w: i for i, w in enumerate(surface.w)}
    g_index = {} if surface.guidance is None else {g: i for i, g in enumerate(surface.guidance)}
    for s in range(surface.snapshots):
        cache: dict[tuple, float] = {}

        def objective(w, g, s=s, cache=cache):
            if (w, g) not in cache:
                if w in w_index and (g is None or g in g_index):
                    cache[(w, g)] = surface.fid(Point(s, w_index[w], None if g is None else g_index[g]), 0,
                                                num_images)
                else:   # a refinement neighbour off the grid: measured at the nearest grid point's truth
                    cache[(w, g)] = _off_grid(surface, s, w, g, num_images)
            return cache[(w, g)]
        b_w, b_g, _ = official_search(objective, list(w_order or surface.w),
                                      None if surface.guidance is None else list(g_order or surface.guidance),
                                      tolerance, stop, refine, pattern, centre)
        visited += len(cache)
        final = _final_fid(surface, s, b_w, b_g, num_images, final_images)
        finals.append((final, s, b_w, b_g))
    _, s, w, g = min(finals)
    return Outcome("official", surface.sampled, visited, (s, w, g), surface.truth(s, w, g))


def _off_grid(surface: Surface, s: int, w: float, g: float | None, n: int) -> float:
    """A point off the grid (a refinement neighbour), on the sweep's seeds."""
    return _one_point(surface, s, w, g, surface.seed, 0, n)


def _final_fid(surface: Surface, s: int, w: float, g: float | None, num_images: int, final_images: int) -> float:
    """The final evaluation of one point, on images after the sweep's."""
    return _one_point(surface, s, w, g, surface.seed + 1, num_images, final_images)


def _one_point(surface: Surface, s: int, w: float, g: float | None, seed: int, first: int, n: int) -> float:
    """The FID of images first .. first+n−1 of the point (s, w, g), counted in the surface's images."""
    one = Surface(lambda *_: surface.truth(s, w, g), 1, [w], None if g is None else [g], seed, surface.dim,
                  surface.tau)
    surface.sampled += n
    return one.fid(Point(0, 0, None if g is None else 0), first, n)


def adaptive(surface: Surface, num_images: int, start_images: int | None = None, groups: int = 8,
             z: float = 2.0, indifference: float = 0.002) -> Outcome:
    """The adaptive protocol on the same surface (num_images: its largest count per point)."""
    surface.sampled = 0
    measure = surface.measure(groups)
    n_start = min(num_images, start_images or max(num_images // 16, 4 * groups))
    counted: set[Point] = set()

    def counting(p: Point, n: int) -> Estimate:
        counted.add(p)
        return measure(p, n)
    choice = Adaptive(counting, surface.snapshots, surface.w, surface.guidance, n_start, num_images, z,
                      indifference).run()
    s, w, g = surface.coords(choice.point)
    return Outcome("adaptive", surface.sampled, len(counted), (s, w, g), surface.truth(s, w, g))


def bowl(w_grid: Sequence[float], g_grid: Sequence[float] | None, snapshots: int, position: float,
         base: float = 2.0, best: float = 1.2) -> Callable[[int, float, float | None], float]:
    """A paper-like surface: FID(w) a bowl with its minimum at `position` (0 low end, 1 high end) of the w grid
    (and of the guidance grid), FID at w = 0 about `base`, at the optimum `best`; the optimum w shrinks a little
    and the best FID improves then levels off as self-training lengthens (snapshot index)."""
    w_lo, w_hi = min(w_grid), max(w_grid)
    span_w = max(w_hi - w_lo, 1e-9)
    g_lo, g_hi = (min(g_grid), max(g_grid)) if g_grid else (0.0, 1.0)
    span_g = max(g_hi - g_lo, 1e-9)

    def truth(s: int, w: float, g: float | None) -> float:
        t = s / max(snapshots - 1, 1)
        w_star = w_lo + span_w * min(max(position + 0.1 * (0.5 - t), 0.0), 1.0)
        f_star = best * (1 + 0.05 * (t - 0.7) ** 2)
        curvature = (base - best) / max((w_star - min(0.0, w_lo)) ** 2, (span_w / 2) ** 2)
        value = f_star + curvature * (w - w_star) ** 2
        if g is not None:
            g_star = g_lo + span_g * position
            value += 0.3 * best * ((g - g_star) / span_g) ** 2
        return value
    return truth
