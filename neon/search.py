"""How the sweep walks the (w, guidance) plane: the search algorithms, as pure functions of an objective.

`objective(w, guidance) -> fid` evaluates one point (guidance is None for unguided models); the caller caches,
so asking for a point twice costs nothing and the walk may revisit points exactly as the official scripts do.
Each search returns its best point as `(w, guidance, fid)`: the first point, in visiting order, whose FID no
later point beats (strictly lower FID replaces the best; a tie keeps the earlier point).

- `grid_search`: per guidance scale, w in increasing order with an early stop against the best FID so far,
  then a ±refine cross around the best point.
- `official_search`: the paper's protocol, as the official Neon scripts run it (SinaAlemohammad/Neon @76496c3:
  edm/cal_metrics_all.py, VAR/VAR_imagenet_{256,512}/run_var_imagenet_*.sh, xAR/run_xar{b,l}.sh,
  imm/run_imm_imagenet_256.sh). w is the outer loop and the guidance scale the inner one, both in the given
  order; which rule stops each loop and how the best point is refined are parameters (the scripts differ).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction

Objective = Callable[[float, "float | None"], float]
Best = tuple[float, "float | None", float]      # (w, guidance, fid)

STOP_RULES = ("previous", "best")
REFINE_PATTERNS = ("3x3", "cross")
REFINE_CENTRES = ("frozen", "moving")


class _Tracker:
    """Calls the objective and keeps the best point: a strictly lower FID replaces it, a tie keeps the earlier."""

    def __init__(self, objective: Objective):
        self.objective, self.best = objective, None

    def __call__(self, w: float, guidance: float | None) -> float:
        fid = self.objective(w, guidance)
        if self.best is None or fid < self.best[2]:
            self.best = (w, guidance, fid)
        return fid


def grid_search(objective: Objective, w: Sequence[float], guidance: Sequence[float] | None,
                tolerance: float | None = None, refine: float | None = None) -> Best:
    """Per guidance scale (outer), w in increasing order (inner), stopping once FID rises more than `tolerance`
    above the lowest FID of that guidance scale; then best ± `refine` along w (and along guidance)."""
    visit = _Tracker(objective)
    for g in guidance or [None]:
        lowest = math.inf
        for w_i in sorted(w):
            fid = visit(w_i, g)
            if tolerance is not None and fid > lowest + tolerance:
                break  # FID is climbing away from its minimum along w
            lowest = min(lowest, fid)
    if refine:
        b_w, b_g, _ = visit.best
        neighbours = [(b_w - refine, b_g), (b_w + refine, b_g)]
        if b_g is not None:
            neighbours += [(b_w, b_g - refine), (b_w, b_g + refine)]
        for n_w, n_g in neighbours:
            visit(round(n_w, 6), None if n_g is None else round(n_g, 6))
    return visit.best


def official_search(objective: Objective, w: Sequence[float], guidance: Sequence[float] | None,
                    tolerance: float | None, stop: str = "previous", refine: float | None = None,
                    pattern: str = "3x3", centre: str = "frozen", decimals: int | None = None) -> Best:
    """The official scripts' walk: w outer, guidance inner, each in the given order.

    Inner loop: stops right after a point whose FID is more than `tolerance` above the lowest FID of this w's
    earlier points. Outer loop: stops right after a w whose lowest FID is more than `tolerance` above the
    reference, which is the previous w's lowest FID (`stop='previous'`) or the lowest of all earlier w
    (`stop='best'`); FIDs are compared as the decimals they print as, as bc does in the scripts (see `_above`).
    `tolerance=None` walks the whole grid. Then, if `refine` is set, `refine_best` tries the
    neighbours of the best point. Unguided (`guidance=None`): one point per w, so only the outer rule acts."""
    if tolerance is not None and stop not in STOP_RULES:   # without a tolerance no rule stops the walk
        raise ValueError(f"stop: expected one of {STOP_RULES}, got {stop!r}")
    visit = _Tracker(objective)
    reference = math.inf
    for w_i in w:
        lowest = math.inf                      # this w's lowest FID so far
        for g in guidance or [None]:
            fid = visit(w_i, g)
            climbed = tolerance is not None and _above(fid, lowest, tolerance)
            lowest = min(lowest, fid)
            if climbed:
                break
        if tolerance is not None and _above(lowest, reference, tolerance):
            break
        reference = lowest if stop == "previous" else min(reference, lowest)
    if refine:
        refine_best(visit, refine, pattern, centre, decimals)
    return visit.best


def refine_best(visit: _Tracker, step: float, pattern: str, centre: str, decimals: int | None) -> None:
    """Try the neighbours of the best point at ±`step`: offsets dw in (−step, 0, +step) outer, dg likewise inner,
    skipping (0, 0); `pattern='cross'` also skips the diagonals. A neighbour's coordinates are printed to
    `decimals` places as C's printf does (`printf_round`; None: the exact decimal sum), and one with w ≤ 0 or
    guidance ≤ 0 is skipped. `centre='frozen'`: the neighbours of the best point of the walk;
    `centre='moving'`: each row's w and each neighbour's guidance are taken from the best point at that moment,
    so a better neighbour moves the rest of the pattern (the VAR-d16 script's loop reads its running best)."""
    if pattern not in REFINE_PATTERNS:
        raise ValueError(f"pattern: expected one of {REFINE_PATTERNS}, got {pattern!r}")
    if centre not in REFINE_CENTRES:
        raise ValueError(f"centre: expected one of {REFINE_CENTRES}, got {centre!r}")
    frozen = visit.best
    steps = (-_dec(step), Decimal(0), _dec(step))
    for dw in steps:
        c_w = (frozen if centre == "frozen" else visit.best)[0]
        w_n = _shift(c_w, dw, decimals)
        if w_n <= 0:
            continue
        for dg in (steps if frozen[1] is not None else (Decimal(0),)):
            if (dw == 0 and dg == 0) or (pattern == "cross" and dw != 0 and dg != 0):
                continue
            c_g = (frozen if centre == "frozen" else visit.best)[1]
            g_n = None if c_g is None else _shift(c_g, dg, decimals)
            if g_n is not None and g_n <= 0:
                continue
            visit(w_n, g_n)


def _above(fid: float, reference: float, tolerance: float) -> bool:
    """fid > reference + tolerance, exactly in decimal (bash's bc on the printed numbers) rather than in binary:
    2.04 is not above 2.01 + 0.03, though in float64 it is. (EDM's Python loop compares in float64 and IMM's awk
    rounds the threshold to 8 decimals; they differ from this only when FID − reference equals the tolerance.)"""
    if not (math.isfinite(fid) and math.isfinite(reference)):
        return fid > reference + tolerance
    return _dec(fid) > _dec(reference) + _dec(tolerance)


def _dec(x: float) -> Decimal:
    """The decimal a config value was written as (repr gives the shortest string that reads back as x)."""
    return Decimal(repr(float(x)))


def _shift(x: float, d: Decimal, decimals: int | None) -> float:
    # The scripts add in decimal (bc) and print the sum with printf, so 1.35 + 0.1 is exactly 1.45 before rounding.
    total = _dec(x) + d
    return float(total if decimals is None else printf_round(total, decimals))


def printf_round(x: Decimal, decimals: int) -> Decimal:
    """What `printf '%.{decimals}f' x` prints for the decimal string x in bash on x86-64 Linux: the string is read
    into an 80-bit long double (64-bit significand, nearest) and that binary value is rounded half to even. So
    `printf '%.1f' 1.45` prints 1.5 but `printf '%.1f' 1.15` prints 1.1, which neither decimal rounding nor
    float64 reproduces for every x.x5."""
    f = Fraction(x)
    if f == 0:
        return Decimal(0).scaleb(-decimals)
    sign, f = (-1 if f < 0 else 1), abs(f)
    e = f.numerator.bit_length() - f.denominator.bit_length()   # 2**e <= f < 2**(e + 1) after the fix-up
    if Fraction(2) ** e > f:
        e -= 1
    scale = Fraction(2) ** (63 - e)                              # 64 significant bits
    long_double = Fraction(_round_half_even(f * scale)) / scale
    return Decimal(sign * _round_half_even(long_double * 10 ** decimals)).scaleb(-decimals)


def _round_half_even(q: Fraction) -> int:
    n, r = divmod(q, 1)
    return n + 1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and n % 2) else n
