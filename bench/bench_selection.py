"""Two selection protocols where the truth is measurable: the official exhaustive sweep against neon.adaptive's
walk, by the images each samples and by the true metric of what each chooses. Cases: the 2-D Gaussian toy, and
(full mode) both Fashion-MNIST studies (bench/selection_studies.py: their θr and ODE-arm snapshots, classifier FD).

    python bench/bench_selection.py [--quick] [--only toy|studies] [--studies DIR] [--seed S] [--threads N]
                                    [--json OUT]

Each case is a real Neon pipeline of experiments/toy (θr, S and the θs snapshots made by its own functions with
its own seeds): diffusion at ζ = 0.9 and 1.1, AR at τ = 0.5 and 1.6, each with the self-training lengths
(50, 250) as its snapshots and the toy's w grid. Features are the 2-D points themselves and the reference is the
true Gaussian, so FID is closed form and a large "report" set of fresh noise gives each chosen model's truth.

- official: every w of every snapshot at N_SWEEP images (the same noise for every w), each snapshot's best w
  again at N_FINAL images on other noise, the lowest final FID wins.
  Images: snapshots × len(w) × N_SWEEP + snapshots × N_FINAL.
- new: neon.adaptive.Adaptive from n_start = N_SWEEP/16 to n_max = N_SWEEP on the first images of the same
  sweep noise (common random numbers). Images: each distinct network's largest n (θr, w = 0, counts once).

Goal per case: new/official images ≤ 0.10 and the new choice not significantly worse on the report set
(new − official < 2σ, σ the paired jackknife std of neon.adaptive.paired, or ≤ 0). The exit code is 0 either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
from tqdm import tqdm

from experiments.toy import ar as ar_lib
from experiments.toy import diffusion as diffusion_lib
from experiments.toy.experiment import FULL, QUICK, ToySettings
from experiments.toy.gaussian import fid, stage_generator, target, training_set
from experiments.toy.train import finetune, fit, init_model, state
from neon.adaptive import Adaptive, Choice, Estimate, Point, Z, paired
from neon.merge import merge_state_dicts
from neon.metrics import frechet_distance, gaussian_from_features
from neon.metrics.jackknife import frechet_jackknife
from neon.search import official_search

GROUPS = 8            # jackknife groups, as the adaptive sweep's default
GOAL_RATIO = 0.10     # new/official images
DIVERGED = 1e12       # the FID given to a network whose samples are not finite (keeps paired() free of inf − inf)


@dataclass(frozen=True)
class BenchSettings:
    toy: ToySettings
    n_sweep: int = 10_000            # official images per (snapshot, w): the paper's sweep
    n_final: int = 50_000            # official images per snapshot's best w: the paper's final FID (1:5)
    n_report_diffusion: int = 1_000_000
    n_report_ar: int = 200_000


LENGTHS = dict(finetune_steps=(50, 250))   # both self-training lengths are the snapshots, in both modes

QUICK_BENCH = BenchSettings(
    toy=dataclasses.replace(QUICK, diffusion=dataclasses.replace(QUICK.diffusion, **LENGTHS),
                            ar=dataclasses.replace(QUICK.ar, finetune_epochs=LENGTHS["finetune_steps"])),
    n_report_diffusion=200_000)
FULL_BENCH = BenchSettings(toy=FULL)

Draw = Callable[[dict, torch.Tensor], torch.Tensor]   # (state dict, noise (N, 2)) -> samples (N, 2)


@dataclass
class Case:
    name: str                                 # e.g. "diffusion ζ=1.1 (mode-seeking)"
    family: str                               # "diffusion" or "ar": also the noise streams' tag
    param: float                              # the self-training sampler's ζ or τ
    theta_r: dict
    snapshots: list[tuple[int, dict]]         # (self-training length, θs), shortest first
    w: tuple[float, ...]                      # sorted merge weights
    draw: Draw                                # inputs (noise rows or seeds) -> features, row by row
    inputs: Callable[[str, int], torch.Tensor]   # (purpose, n) -> the first n inputs of that purpose's stream
    reference: tuple = dataclasses.field(default_factory=target)   # (μ, Σ) the features are measured against
    distance: Callable[[torch.Tensor], float] = fid   # the FD of features to `reference` (inf if not finite)

    def theta_neon(self, snapshot: int, w: float) -> dict:
        return self.theta_r if w == 0 else merge_state_dicts(self.theta_r, self.snapshots[snapshot][1], w)


def _tag(x: float) -> str:
    return f"{x:.6g}"


def toy_inputs(seed: int, family: str, param: float) -> Callable[[str, int], torch.Tensor]:
    """(purpose, n) -> (n, 2) standard normal noise, a disjoint stream per purpose ('select', 'final', 'report')."""
    return lambda purpose, n: torch.randn(n, 2, generator=stage_generator(seed, family, _tag(param), "bench",
                                                                          purpose))


# -- the cases: θr, S and θs exactly as experiments/toy/experiment.py makes them (same stages, same seeds) -------

def diffusion_cases(s, seed: int, data_seed: int, progress: bool) -> list[Case]:
    gen = partial(stage_generator, seed, "diffusion")
    schedule = diffusion_lib.cosine_schedule(s.T)
    loss_with = lambda g: (lambda model, x: diffusion_lib.eps_loss(model, x, schedule, g))
    model = init_model(diffusion_lib.EpsMLP, gen("init"))
    fit(model, loss_with(gen("train")), training_set(s.n_real, data_seed), s.base_steps, s.base_lr, s.batch,
        desc="diffusion θr", progress=progress)
    theta_r = state(model)
    draw = lambda sd, noise: diffusion_lib.sample(diffusion_lib.weights(sd), noise, 1.0, s.sample_steps, s.eta)
    cases = []
    for zeta in s.zetas:
        x_T = torch.randn(s.n_synthetic, 2, generator=gen("synthetic", _tag(zeta)))
        synthetic = diffusion_lib.sample(model, x_T, zeta, s.sample_steps, s.eta)
        snaps = finetune(model, loss_with(gen("finetune", _tag(zeta))), synthetic, s.finetune_steps, s.finetune_lr,
                         s.batch, desc=f"diffusion θs ζ={zeta:g}", progress=progress)
        kind = "mode-seeking" if zeta > 1 else "diversity"
        cases.append(Case(f"diffusion ζ={zeta:g} ({kind})", "diffusion", zeta, theta_r, sorted(snaps.items()),
                          tuple(sorted(s.w)), draw, toy_inputs(seed, "diffusion", zeta)))
    return cases


def ar_cases(s, seed: int, data_seed: int, progress: bool) -> list[Case]:
    gen = partial(stage_generator, seed, "ar")
    nll = lambda model, x: model.nll(x)
    model = init_model(ar_lib.ARGaussian2D, gen("init"))
    fit(model, nll, training_set(s.n_real, data_seed), s.base_epochs, s.base_lr, s.batch, desc="AR θr",
        progress=progress)
    theta_r = state(model)
    evaluator = ar_lib.ARGaussian2D()

    def draw(sd: dict, noise: torch.Tensor) -> torch.Tensor:
        evaluator.load_state_dict(sd)   # one module per family: AR cases run on one thread, in turn
        return evaluator.sample(noise, s.tau_eval)

    cases = []
    for tau in s.taus:
        synthetic = model.sample(torch.randn(s.n_synthetic, 2, generator=gen("synthetic", _tag(tau))), tau)
        snaps = finetune(model, nll, synthetic, s.finetune_epochs, s.finetune_lr, s.batch,
                         desc=f"AR θs τ={tau:g}", progress=progress)
        kind = "mode-seeking" if tau < 1 else "diversity"
        cases.append(Case(f"AR τ={tau:g} ({kind})", "ar", tau, theta_r, sorted(snaps.items()), tuple(sorted(s.w)),
                          draw, toy_inputs(seed, "ar", tau)))
    return cases


def estimate(x: torch.Tensor, reference: tuple) -> Estimate:
    """FD of features x: (n, d) to the reference (μ, Σ) with its leave-one-group-out values."""
    n = x.shape[0]
    if not torch.isfinite(x).all():
        return Estimate(DIVERGED, (DIVERGED,) * GROUPS, n)
    value, jack = frechet_jackknife(x.double(), *reference, groups=GROUPS)
    return Estimate(value, jack, n)


# -- the Fashion-MNIST studies: θr and the ODE arm's snapshots made by the study's own stages ----------------------

@dataclass(frozen=True)
class StudyBench:
    name: str
    config: str                  # the study's config, relative to the project root
    folder: str                  # its study folder under --studies (prepared once, then reused)
    n_sweep: int = 1_000         # official images per (snapshot, w)
    n_final: int = 5_000         # official images per snapshot's best w (1:5, as the paper)
    n_report: int = 10_000       # fresh seeds per chosen model


STUDIES = (StudyBench("Fashion-MNIST EDM (ODE arm)", "configs/fashion_mnist_16.yaml", "fashion_mnist_16"),
           StudyBench("Fashion-MNIST diffusers (ODE)", "configs/fashion_mnist_diffusers.yaml",
                      "fashion_mnist_diffusers"))


def study_case(sb: StudyBench, root: str, smoke: bool = False) -> Case:
    """θr, every snapshot of the ODE arm's self-training and its w grid (with w = 0) from the study's config;
    features and reference are its classifier's (classifier FD, the study's metric)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import selection_studies as studies  # bench/ is not a package

    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    st = studies.prepare(os.path.join(project, sb.config), os.path.join(root, sb.folder), smoke)
    mu, sigma = st["reference"]

    def distance(x: torch.Tensor) -> float:
        return math.inf if not torch.isfinite(x).all() else frechet_distance(*gaussian_from_features(x), mu, sigma)

    w = tuple(sorted({0.0, *map(float, st["config"].sweep.ode)}))
    return Case(sb.name, "study", 1.0, st["theta_r"], studies.load_snapshots(st, None), w, studies.StudyDraw(st),
                lambda purpose, n: studies.seeds(purpose, n), (mu, sigma), distance)


def run_studies(root: str, progress: bool) -> list[dict]:
    rows = []
    for sb in STUDIES:
        case = study_case(sb, root)
        rows.append(run_case(case, sb.n_sweep, sb.n_final, sb.n_report, progress))
    return rows


# -- protocol 1: the official exhaustive sweep ------------------------------------------------------------------

def official_protocol(case: Case, select: torch.Tensor, final: torch.Tensor, progress: bool = False) -> dict:
    """Every (snapshot, w) on all of `select`, each snapshot's best w on `final`; lowest final FID wins."""
    images, rows = 0, []
    bar = tqdm(total=len(case.snapshots) * len(case.w), desc=f"official {case.name}", disable=not progress,
               leave=False)
    for k, (length, _) in enumerate(case.snapshots):
        def objective(w: float, _g: None, k: int = k) -> float:   # k bound now: called within this loop
            nonlocal images
            images += select.shape[0]
            bar.update()
            return case.distance(case.draw(case.theta_neon(k, w), select))

        w_best, _, sweep_fid = official_search(objective, case.w, None, tolerance=None)   # the whole grid
        images += final.shape[0]
        rows.append(dict(length=length, w=w_best, sweep_fid=sweep_fid,
                         final_fid=case.distance(case.draw(case.theta_neon(k, w_best), final))))
    k = min(range(len(rows)), key=lambda i: (rows[i]["final_fid"], i))   # a tie keeps the shorter self-training
    bar.close()
    return dict(images=images, snapshot=k, w=rows[k]["w"], snapshots=rows)


# -- protocol 2: the adaptive walk ------------------------------------------------------------------------------

class Measure:
    """measure(point, n) for neon.adaptive: FID of the point's first n samples of the `select` noise (the same
    rows for every point), cached; samples are kept per network, so raising n to 2n samples n more."""

    def __init__(self, case: Case, select: torch.Tensor):
        self.case, self.select = case, select
        self.samples: dict[tuple, torch.Tensor] = {}
        self.estimates: dict[tuple, Estimate] = {}

    def network(self, p: Point) -> tuple:
        w = self.case.w[p.w]
        return (None if w == 0 else p.snapshot), w   # w = 0 is θr whatever the snapshot: one network

    def first(self, p: Point, n: int) -> torch.Tensor:
        key = self.network(p)
        have = self.samples.get(key, self.select[:0])
        if have.shape[0] < n:
            more = self.case.draw(self.case.theta_neon(p.snapshot, key[1]), self.select[have.shape[0]:n])
            have = self.samples[key] = torch.cat([have, more])
        return have[:n]

    def __call__(self, p: Point, n: int) -> Estimate:
        key = (self.network(p), n)
        if key not in self.estimates:
            self.estimates[key] = estimate(self.first(p, n), self.case.reference)
        return self.estimates[key]

    @property
    def images(self) -> int:
        return sum(x.shape[0] for x in self.samples.values())


def start_images(n_sweep: int) -> int:
    """N_SWEEP/16, but at least 4 images per jackknife group (only tiny test settings need the floor)."""
    return max(n_sweep // 16, 4 * GROUPS)


def adaptive_protocol(case: Case, select: torch.Tensor) -> dict:
    measure = Measure(case, select)
    n_max = select.shape[0]
    choice: Choice = Adaptive(measure, len(case.snapshots), case.w, None, start_images(n_max), n_max).run()
    return dict(images=measure.images, snapshot=choice.point.snapshot, w=case.w[choice.point.w],
                decided=choice.decided, open=len(choice.open), evaluations=len(measure.estimates))


# -- the truth: the chosen models on fresh report noise ---------------------------------------------------------

def own_std(e: Estimate) -> float:
    """The jackknife std of one estimate: its paired std against a constant."""
    return paired(e, Estimate(0.0, (0.0,) * len(e.jackknife), e.n))[1]


def report(case: Case, chosen: dict[str, tuple[int, float]], report_noise: torch.Tensor) -> dict:
    """FID ± jackknife std of each chosen (snapshot, w) on the same report noise, and new − official paired."""
    est: dict[tuple, Estimate] = {}
    for snapshot, w in chosen.values():
        key = (None if w == 0 else snapshot, w)
        if key not in est:
            est[key] = estimate(case.draw(case.theta_neon(snapshot, w), report_noise), case.reference)
    at = {name: est[(None if w == 0 else s, w)] for name, (s, w) in chosen.items()}
    d, sd = paired(at["new"], at["official"])
    return dict(n=report_noise.shape[0], fid={k: e.value for k, e in at.items()},
                std={k: own_std(e) for k, e in at.items()},
                difference=d, difference_std=sd)


def run_case(case: Case, n_sweep: int, n_final: int, n_report: int, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    select = case.inputs("select", n_sweep)
    official = official_protocol(case, select, case.inputs("final", n_final), progress)
    t1 = time.perf_counter()
    new = adaptive_protocol(case, select)
    t2 = time.perf_counter()
    truth = report(case, dict(theta_r=(0, 0.0), official=(official["snapshot"], official["w"]),
                              new=(new["snapshot"], new["w"])), case.inputs("report", n_report))
    lengths = [length for length, _ in case.snapshots]
    for protocol in (official, new):
        protocol["length"] = lengths[protocol["snapshot"]]
    ratio = new["images"] / official["images"]
    d, sd = truth["difference"], truth["difference_std"]
    not_worse = d <= 0 or d < Z * sd
    return dict(case=case.name, family=case.family, param=case.param, lengths=lengths, w=list(case.w),
                n_sweep=n_sweep, n_final=n_final, official=official, new=new, ratio=ratio, report=truth,
                not_worse=not_worse,
                passed=ratio <= GOAL_RATIO and not_worse,
                seconds=dict(official=t1 - t0, new=t2 - t1, report=time.perf_counter() - t2))


def run_bench(b: BenchSettings, seed: int = 0, threads: int = 1, progress: bool = True) -> dict:
    """Both families' cases end to end -> {'cases': [run_case(...)], 'settings', 'passed', 'timings_s'}.
    threads > 1: the AR family on a thread beside the diffusion one (every draw has its own generator, so the
    numbers do not depend on it); torch on one thread throughout, as the toy runs (its products are small)."""
    t = b.toy
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def family(make, s) -> list[dict]:
        cases = make(s, seed, t.data_seed, progress)
        n_report = b.n_report_diffusion if make is diffusion_cases else b.n_report_ar
        return [run_case(c, b.n_sweep, b.n_final, n_report, progress)
                for c in tqdm(cases, desc="cases", disable=not progress, leave=False)]

    try:
        with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as side:
            ar = side.submit(family, ar_cases, t.ar) if threads > 1 else None
            rows = family(diffusion_cases, t.diffusion)
            rows += ar.result() if ar else family(ar_cases, t.ar)
    finally:
        torch.set_num_threads(before)
    n_start = start_images(b.n_sweep)
    return dict(seed=seed, threads=threads, cases=rows, passed=sum(r["passed"] for r in rows),
                settings=dict(n_sweep=b.n_sweep, n_final=b.n_final, n_start=n_start, n_max=b.n_sweep,
                              groups=GROUPS, z=Z, goal_ratio=GOAL_RATIO, n_report_diffusion=b.n_report_diffusion,
                              n_report_ar=b.n_report_ar, diffusion_base_steps=t.diffusion.base_steps,
                              diffusion_w=len(t.diffusion.w), ar_w=len(t.ar.w)),
                timings_s=dict(total=time.perf_counter() - t0))


# -- printing ---------------------------------------------------------------------------------------------------

def settings_lines(s: dict) -> list[str]:
    lines = []
    if "n_sweep" in s:
        lines.append(f"toy: official {s['n_sweep']} images per (snapshot, w), {s['n_final']} per snapshot's final "
                     f"(1:5); new: n_start {s['n_start']}, n_max {s['n_max']}, {s['groups']} jackknife groups, "
                     f"z {s['z']:g}; w grid: diffusion {s['diffusion_w']}, AR {s['ar_w']}; report: "
                     f"{s['n_report_diffusion']} diffusion, {s['n_report_ar']} AR fresh samples; FID in closed form")
    for sb in s.get("studies", ()):
        lines.append(f"{sb['name']}: official {sb['n_sweep']} images per (snapshot, w), {sb['n_final']} per "
                     f"snapshot's final; new: n_start {start_images(sb['n_sweep'])}, n_max {sb['n_sweep']}; "
                     f"report {sb['n_report']} fresh seeds; classifier FD (the study's metric), len = images of "
                     f"self-training")
    return lines


def format_table(result: dict) -> str:
    s = result["settings"]
    head = (f"{'case':<29} {'official imgs':>13} {'new imgs':>9} {'ratio':>6}  {'official (len, w)':>17} "
            f"{'new (len, w)':>15} {'FID θr':>8} {'FID official':>12} {'FID new':>8} {'new − official':>18}  goal")
    lines = settings_lines(s) + [head, "-" * len(head)]
    for r in result["cases"]:
        o, n, f = r["official"], r["new"], r["report"]
        diff = f"{f['difference']:+.5f} ± {f['difference_std']:.5f}"
        undecided = "" if n["decided"] else "*"
        lines.append(f"{r['case']:<29} {o['images']:>13} {n['images']:>9} {r['ratio']:>6.3f}  "
                     f"{'(' + str(o['length']) + ', ' + format(o['w'], '+.2f') + ')':>17} "
                     f"{'(' + str(n['length']) + ', ' + format(n['w'], '+.2f') + ')' + undecided:>15} "
                     f"{f['fid']['theta_r']:>8.5f} {f['fid']['official']:>12.5f} {f['fid']['new']:>8.5f} "
                     f"{diff:>18}  {'PASS' if r['passed'] else 'FAIL'}")
    lines.append(f"(* the race reached n_max undecided; goal: ratio ≤ {GOAL_RATIO:g} and new − official "
                 f"< {Z:g}σ or ≤ 0)")
    k = len(result["cases"])
    mean_ratio = sum(r["ratio"] for r in result["cases"]) / max(k, 1)
    lines.append(f"summary: {result['passed']}/{k} cases PASS; mean image ratio {mean_ratio:.3f}; "
                 f"new significantly worse in {sum(not r['not_worse'] for r in result['cases'])}; "
                 f"wall {result['timings_s']['total']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the toy's QUICK settings (200k diffusion report samples)")
    p.add_argument("--seed", type=int, default=0, help="run seed (the real training points keep data_seed 42)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="2+: AR beside diffusion")
    p.add_argument("--json", help="also write the result dict here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--only", choices=("toy", "studies"), help="full mode: only the toy cases, or only the studies")
    p.add_argument("--studies", default="runs/bench_selection", metavar="DIR",
                   help="where the Fashion-MNIST study folders are prepared and reused (full mode)")
    args = p.parse_args(argv)
    if args.quick and args.only == "studies":
        p.error("--quick runs the toy cases only")
    b = QUICK_BENCH if args.quick else FULL_BENCH
    progress = not args.no_progress
    if args.only == "studies":
        result = dict(seed=args.seed, threads=args.threads, cases=[], settings={}, timings_s=dict(total=0.0))
    else:
        result = run_bench(b, args.seed, args.threads, progress)
    if not args.quick and args.only != "toy":
        t0 = time.perf_counter()
        result["cases"] += run_studies(args.studies, progress)
        result["timings_s"]["studies"] = time.perf_counter() - t0
        result["timings_s"]["total"] += result["timings_s"]["studies"]
        result["settings"]["studies"] = [dataclasses.asdict(sb) for sb in STUDIES]
    result["passed"] = sum(r["passed"] for r in result["cases"])
    result["quick"] = args.quick
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)   # a benchmark: the verdict is in the table and the result dict, not the exit code
