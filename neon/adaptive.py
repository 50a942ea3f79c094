"""The adaptive selection protocol (`sweep.search: adaptive`): choose the θs snapshot, w and the guidance scale
from a small fraction of the images the official protocol samples, as a pure walk over `measure(point, n)`.

What makes it cheap is what the problem gives for free:
- Every point is measured on the same seeds (common random numbers), so the *difference* of two points'
  objectives is far less noisy than either. Each measurement carries its leave-one-group-out values over K
  groups of its seeds (a jackknife), and `paired(a, b)` gives a − b with the jackknife std of that difference.
- FID(w) is unimodal near the optimum (the paper's Eq. 4): `line` brackets and shrinks along w instead of
  walking the whole list; guidance likewise, coordinate-wise.
- Neighbouring snapshots have nearly the same curve: snapshot k's walk starts at snapshot k−1's best point.

Two phases. Screen: every snapshot's walk at n_start images per point. Race: the snapshots' best points, on
the same seeds at n_start, 2·n_start, ... ≤ n_max images, joined by the leader's grid neighbours whenever the
leader has some not raced yet; after each round a point leaves the race when it is
clearly worse than the leader (difference > z·std) or clearly equivalent to a simpler one (the whole interval
difference ± z·std inside ± the indifference band: then the one closer to θr stays). What is still open when
n_max is reached is decided by the point estimate and recorded as undecided.

"Simpler" orders points by |w| (closer to θr), then earlier snapshot, then lower guidance: when the data cannot
tell two points apart, θneon changes θr the least. Everything here is deterministic given the measurements, so
a walk replayed from its record makes the same choice.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

Z = 2.0                   # a difference counts once it is z jackknife stds away from zero
INDIFFERENCE = 0.002      # relative band: points whose objectives differ by less than this fraction are equivalent


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The objective of one point on its first `n` images, with its leave-one-group-out values (K groups)."""
    value: float
    jackknife: tuple[float, ...]
    n: int


def jackknife_std(values: Sequence[float]) -> float:
    """The jackknife std of a statistic from its K leave-one-group-out values: √((K−1)/K · Σ_k (v_k − v̄)²)."""
    k = len(values)
    mean = sum(values) / k
    return math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in values))


def paired(a: Estimate, b: Estimate) -> tuple[float, float]:
    """(a − b, the jackknife std of that difference): both measured on the same seeds, cut into the same groups.
    Var = (K−1)/K · Σ_k (d_k − d̄)², d_k the difference with group k left out."""
    if a.n != b.n or len(a.jackknife) != len(b.jackknife):
        raise ValueError(f"paired: estimates on different images ({a.n} vs {b.n})")
    return a.value - b.value, jackknife_std([x - y for x, y in zip(a.jackknife, b.jackknife)])


@dataclasses.dataclass(frozen=True, order=True)
class Point:
    """Indices into the grids: snapshot, w, guidance (None: unguided)."""
    snapshot: int
    w: int
    g: int | None


Measure = Callable[[Point, int], Estimate]


@dataclasses.dataclass
class Choice:
    point: Point
    estimate: Estimate
    decided: bool                 # False: n_max reached with the race still open (chosen by point estimate)
    open: list[Point]             # the points still racing at the end
    screened: list[Point]         # each snapshot's best after its screening walk


class Adaptive:
    """One selection: `run()` walks every snapshot at n_start, then races their best points."""

    def __init__(self, measure: Measure, snapshots: int, w: Sequence[float], guidance: Sequence[float] | None,
                 n_start: int, n_max: int, z: float = Z, indifference: float = INDIFFERENCE):
        if snapshots < 1 or not w or (guidance is not None and not guidance):
            raise ValueError("adaptive: needs at least one snapshot, one w and (when guided) one guidance scale")
        if not 0 < n_start <= n_max:
            raise ValueError(f"adaptive: needs 0 < n_start ≤ n_max, got {n_start} and {n_max}")
        self.measure, self.snapshots, self.z, self.indifference = measure, snapshots, z, indifference
        self.w, self.guidance = sorted(w), None if guidance is None else sorted(guidance)
        self.n_start, self.n_max = n_start, n_max

    # -- order and comparisons -------------------------------------------------------------------------------

    def simplicity(self, p: Point) -> tuple:
        return (abs(self.w[p.w]), p.snapshot, -math.inf if p.g is None else self.guidance[p.g], p.w)

    def band(self, leader: Estimate) -> float:
        return self.indifference * abs(leader.value)

    def better(self, a: Point, b: Point, n: int) -> bool:
        """a beats b at n images: lower by more than the indifference band, or within it and simpler."""
        ea, eb = self.measure(a, n), self.measure(b, n)
        d, _ = paired(ea, eb)
        if abs(d) <= self.band(eb):
            return self.simplicity(a) < self.simplicity(b)
        return d < 0

    # -- screening: bracket and shrink along one axis, coordinate-wise -------------------------------------

    def line(self, p: Point, axis: str) -> Point:
        """The best point along `axis` ('w' or 'g') through p at n_start: step downhill with doubling steps until
        the objective rises (a bracket), then shrink the bracket by probing the midpoint of its larger side."""
        size = len(self.w if axis == "w" else self.guidance)
        at = lambda i: dataclasses.replace(p, **{axis: i})
        i = getattr(p, axis)
        n = self.n_start
        step_dir = [d for d in (-1, 1) if 0 <= i + d < size and self.better(at(i + d), at(i), n)]
        if not step_dir:
            return p
        d = min(step_dir, key=lambda s: self.simplicity(at(i + s)))   # both better: the simpler side first
        if len(step_dir) == 2 and self.better(at(i - d), at(i + d), n):
            d = -d
        lo, best, step = i, i + d, 1                 # lo: behind the best; hi: ahead of it
        while True:
            step *= 2
            nxt = min(max(best + d * step, 0), size - 1)
            if nxt == best or not self.better(at(nxt), at(best), n):
                hi = nxt
                break
            lo, best = best, nxt
        lo, hi = min(lo, hi), max(lo, hi)
        while hi - lo > 2:
            left, right = best - lo, hi - best
            probe = (lo + best) // 2 if left >= right else (best + hi + 1) // 2
            if probe in (lo, best, hi):
                break
            if self.better(at(probe), at(best), n):
                lo, hi = (lo, best) if probe < best else (best, hi)
                best = probe
            elif probe < best:
                lo = probe
            else:
                hi = probe
        return at(best)

    def screen(self, start: Point) -> Point:
        """Coordinate-wise lines (w, then guidance) from `start` until neither moves (at most 4 rounds)."""
        p = start
        for _ in range(4):
            q = self.line(p, "w")
            if self.guidance is not None:
                q = self.line(q, "g")
            if q == p:
                break
            p = q
        return p

    # -- racing ----------------------------------------------------------------------------------------------

    def neighbours(self, p: Point) -> list[Point]:
        """The grid points next to p along w and along guidance, same snapshot."""
        out = [dataclasses.replace(p, w=p.w + d) for d in (-1, 1) if 0 <= p.w + d < len(self.w)]
        if p.g is not None:
            out += [dataclasses.replace(p, g=p.g + d) for d in (-1, 1) if 0 <= p.g + d < len(self.guidance)]
        return out

    def race(self, points: list[Point]) -> Choice:
        """Race `points` at n_start, 2·n_start, ... ≤ n_max. The leader's grid neighbours join the race at the
        current count until the leader is a local minimum among the points raced, so a w picked on few images
        is checked against its neighbours on as many images as decide it."""
        alive, raced, n = set(points), set(points), self.n_start
        while True:
            est = {p: self.measure(p, n) for p in sorted(alive, key=self.simplicity)}
            leader = min(alive, key=lambda p: (est[p].value, self.simplicity(p)))
            keep = set()
            for p in sorted(alive, key=self.simplicity):
                d, s = paired(est[p], est[leader])
                worse = p != leader and d > self.z * s
                same = p != leader and abs(d) + self.z * s <= self.band(est[leader])
                if same and self.simplicity(p) < self.simplicity(leader):
                    leader = p   # the leader is equivalent to a simpler point: that one leads from now on
                elif not (worse or same):
                    keep.add(p)
            alive = keep | {leader}
            joining = [q for q in self.neighbours(leader) if q not in raced]
            if joining:
                raced.update(joining)
                alive.update(joining)
                continue
            if len(alive) == 1 or n >= self.n_max:
                break
            n = min(2 * n, self.n_max)
        return Choice(leader, est[leader], len(alive) == 1, sorted(alive, key=self.simplicity), points)

    def run(self) -> Choice:
        start = Point(0, min(range(len(self.w)), key=lambda i: (abs(self.w[i]), i)),
                      None if self.guidance is None else (len(self.guidance) - 1) // 2)
        screened = []
        for s in range(self.snapshots):
            start = self.screen(dataclasses.replace(start, snapshot=s))
            screened.append(start)
        return self.race(screened)
