"""The paper's 2-D Gaussian experiment (appendix): for a tiny diffusion model and a tiny autoregressive model,
self-train θr on its own samples at a mode-seeking and a diversity-seeking sampler setting, merge
θneon = (1+w)·θr − w·θs over a grid of w, and measure FID; plus the gradient-alignment sweep.

Settings are data (FULL reproduces the paper's curves, QUICK runs in well under a minute with the same logic).
Every random draw comes from a stage's own generator derived from the run seed; the real training points are
drawn with a fixed `data_seed` (42, as the official notebook).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from experiments.toy import ar as ar_lib
from experiments.toy import diffusion as diffusion_lib
from experiments.toy.alignment import gradient_moments, preconditioned_cosine
from experiments.toy.gaussian import BLOCK, fid, fid_from_sums, fresh_samples, stage_generator, sums, training_set
from experiments.toy.train import finetune, fit, init_model, state
from neon.merge import merge_state_dicts


def grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """np.linspace(lo, hi, n) rounded to 10 decimals, so w = 0 is exactly the base model."""
    return tuple(float(v) for v in np.round(np.linspace(lo, hi, n), 10))


@dataclass(frozen=True)
class DiffusionSettings:
    n_real: int = 1000                                  # real training points
    T: int = 1000                                       # training noise levels (cosine schedule, s = 0.008)
    base_steps: int = 10_000                            # full-batch Adam steps for θr
    base_lr: float = 1e-4
    sample_steps: int = 20                              # sampler grid (a fresh 20-step cosine schedule)
    eta: float = 1.0                                    # the notebook's η (its σ clamps to 0, see diffusion.py)
    zetas: tuple[float, ...] = (0.9, 1.1)               # self-training samplers: ζ < 1 diversity, ζ > 1 mode
    n_synthetic: int = 1000                             # |S|
    finetune_lr: float = 1e-5                           # fresh Adam for θs
    finetune_steps: tuple[int, ...] = (50, 250)         # θs snapshots that get merged (full-batch steps)
    w: tuple[float, ...] = grid(-2, 2, 101)             # merge weights
    n_fid: int = 1_000_000                              # samples per FID (same noise for every w)
    cos_zetas: tuple[float, ...] = grid(0.8, 1.2, 46)   # gradient-alignment sweep
    n_cos_real: int = 100_000                           # fresh real samples for g_d and v̂
    n_cos_synthetic: int = 100_000                      # samples for each g_s
    cos_passes: int = 16                                # passes (fresh t, ε) per gradient estimate
    batch: int = 2048


@dataclass(frozen=True)
class ARSettings:
    n_real: int = 100                                   # real training points
    base_epochs: int = 1000                             # full-batch Adam steps for θr
    base_lr: float = 5e-4
    taus: tuple[float, ...] = (0.5, 1.6)                # self-training temperatures: τ < 1 mode, τ > 1 diversity
    n_synthetic: int = 100_000                          # |S|
    finetune_lr: float = 1e-4
    finetune_epochs: tuple[int, ...] = (50, 250)        # θs snapshots that get merged (epochs over S)
    w: tuple[float, ...] = grid(-1, 1, 41)              # merge weights
    tau_eval: float = 1.0                               # the sampler FID is measured with
    n_fid: int = 50_000                                 # samples per FID (same noise for every w)
    cos_taus: tuple[float, ...] = grid(0.6, 1.4, 41)    # gradient-alignment sweep
    n_cos_real: int = 100_000
    n_cos_synthetic: int = 100_000
    batch: int = 2048


@dataclass(frozen=True)
class ToySettings:
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    ar: ARSettings = field(default_factory=ARSettings)
    data_seed: int = 42      # numpy seed of the real training points (fixed: see gaussian.training_set)
    n_show: int = 2000       # points per set in the scatter plot


FULL = ToySettings()

# Fewer samples and steps, same logic. The diffusion base keeps its 10,000 steps: with fewer (e.g. 3000) its
# error changes character — the FID direction still holds but the gradient cosines flip sign — so the quick run
# would no longer show the paper's picture. Everything after the base models is cut as far as outcomes stay clear.
QUICK = ToySettings(
    diffusion=DiffusionSettings(finetune_steps=(50,), w=grid(-2, 2, 21), n_fid=20_000,
                                cos_zetas=(0.9, 0.95, 1.0, 1.05, 1.1), n_cos_real=50_000, n_cos_synthetic=50_000,
                                cos_passes=4),
    ar=ARSettings(n_synthetic=10_000, finetune_epochs=(50,), cos_taus=(0.6, 0.8, 1.0, 1.2, 1.4)),
    n_show=1000,
)

ROW_KEYS = ("model", "sampler_param", "mode_seeking", "finetune_steps", "base_fid", "best_w", "best_fid", "w", "fid")


def make_row(model: str, sampler_param: float, mode_seeking: bool, finetune_steps: int, base_fid: float,
             ws: tuple[float, ...], fids: list[float]) -> dict:
    """One row of toy_results.json: a whole FID(w) curve and its minimum."""
    best = int(np.argmin(fids))
    return dict(model=model, sampler_param=float(sampler_param), mode_seeking=bool(mode_seeking),
                finetune_steps=int(finetune_steps), base_fid=float(base_fid), best_w=float(ws[best]),
                best_fid=float(fids[best]), w=[float(w) for w in ws], fid=[float(f) for f in fids])


def sweep_w(model: nn.Module, theta_r: dict, theta_s: dict, ws: tuple[float, ...],
            evaluate: Callable[[nn.Module], float], desc: str, progress: bool) -> list[float]:
    """FID of θneon = (1+w)·θr − w·θs for each w (merged with the core's merge); model is left at θr."""
    fids = []
    for w in tqdm(ws, desc=desc, disable=not progress, leave=False):
        model.load_state_dict(merge_state_dicts(theta_r, theta_s, w))
        fids.append(evaluate(model))
    model.load_state_dict(theta_r)
    return fids


def parallel_map(fn: Callable, items: list, workers: int, desc: str = "", progress: bool = False) -> list:
    """[fn(item) for item in items] on `workers` threads, each running torch on one thread (torch releases the
    GIL inside its ops; its own thread pool would wait at a barrier after every small op)."""
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress, leave=False))


class FIDSampler:
    """Samples the diffusion FID sets — every network from the same noise x_T: (N, 2), with the ζ = 1 sampler —
    in `workers` processes that receive x_T once, or in this process for workers = 1 (the same numbers).

    Processes, not threads: the work is many small products with Python between them, and threads wait for each
    other's interpreter lock (in one A/B on 2 cores: 2 processes 1.26–1.30× the matmul floor, 2 threads 1.28–1.36×).
    """

    def __init__(self, x_T: torch.Tensor, s: DiffusionSettings, workers: int = 1, rows: int = 4096):
        self.n, self.rows = x_T.shape[0], max(1, rows // BLOCK) * BLOCK   # whole blocks of sums()
        self.workers = workers
        args = (x_T.numpy(), s.sample_steps, s.eta)
        if workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_set_noise, initargs=args)
        else:
            self.pool = None
            self.noise = args

    def __enter__(self) -> FIDSampler:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)

    def fids(self, states: list[dict], desc: str = "diffusion FID", progress: bool = False) -> list[float]:
        """FID of each EpsMLP state dict. The rows are cut into chunks of `rows`, small enough that a chunk's
        activations stay in cache and large enough that each layer is one efficient product; a task is up to 64
        chunks of one network. Each chunk's result depends on its rows alone, so the FIDs do not depend on
        `workers`."""
        # numpy, not tensors: torch would pass each tensor through a shared-memory file of its own
        nets = [{k: v.detach().float().numpy() for k, v in sd.items()} for sd in states]
        span = self.rows * max(1, min(64, self.n // (self.rows * self.workers * 4)))
        starts = range(0, self.n, span)
        jobs = [(net, start, min(start + span, self.n), self.rows) for net in nets for start in starts]
        run = self.pool.map(_fid_sums, jobs) if self.pool else map(partial(_fid_sums, noise=self.noise), jobs)
        parts = list(tqdm(run, total=len(jobs), desc=desc, disable=not progress, leave=False))
        mine = lambda k: parts[k * len(starts):(k + 1) * len(starts)]
        return [fid_from_sums(self.n, torch.cat([p[0] for p in mine(k)]), torch.cat([p[1] for p in mine(k)]))
                for k in range(len(nets))]


_NOISE: tuple = ()   # in a FIDSampler's worker process: (x_T, sample_steps, eta), sent once


def _set_noise(*noise) -> None:
    global _NOISE
    torch.set_num_threads(1)
    _NOISE = noise


def _fid_sums(job: tuple, noise: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One task: a network's samples from rows [start, stop) of x_T, `rows` at a time -> their sums()."""
    state, start, stop, rows = job
    net = diffusion_lib.weights({k: torch.from_numpy(v) for k, v in state.items()})
    x_T, sample_steps, eta = noise or _NOISE
    x_T = torch.from_numpy(x_T)
    s1, s2 = sums(diffusion_lib.sample(net, x_T[start:stop], 1.0, sample_steps, eta, chunk=rows)[None])
    return s1[0], s2[0]


def _tag(x: float) -> str:
    return f"{x:.6g}"


def _best_neon(rows: list[dict]) -> dict:
    """The row the scatter plot shows: mode-seeking, longest self-training."""
    return max((r for r in rows if r["mode_seeking"]), key=lambda r: r["finetune_steps"])


def _best_neon_model(model: nn.Module, theta_r: dict, thetas: dict, rows: list[dict]) -> tuple[dict, nn.Module]:
    """The row shown in the samples plot, and a copy of `model` holding its θneon at the row's best w."""
    shown = _best_neon(rows)
    neon = copy.deepcopy(model)
    theta_s = thetas[(shown["sampler_param"], shown["finetune_steps"])]
    neon.load_state_dict(merge_state_dicts(theta_r, theta_s, shown["best_w"]))
    return shown, neon


def run_diffusion(s: DiffusionSettings, seed: int, data_seed: int, n_show: int, progress: bool = True,
                  workers: int = 1) -> dict:
    """θr on the real points; per ζ: S, θs snapshots, FID(w) curves; the cosine sweep; scatter-plot samples."""
    gen = partial(stage_generator, seed, "diffusion")
    schedule = diffusion_lib.cosine_schedule(s.T)
    loss_with = lambda g: (lambda model, x: diffusion_lib.eps_loss(model, x, schedule, g))
    draw = lambda model, n, zeta, tag: diffusion_lib.sample(
        model, torch.randn(n, 2, generator=gen(tag, _tag(zeta))), zeta, s.sample_steps, s.eta)
    timings = {}

    t0 = time.perf_counter()
    model = init_model(diffusion_lib.EpsMLP, gen("init"))
    fit(model, loss_with(gen("train")), training_set(s.n_real, data_seed), s.base_steps, s.base_lr, s.batch,
        desc="diffusion 1/3: θr", progress=progress)
    theta_r = state(model)
    timings["base_training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_T = torch.randn(s.n_fid, 2, generator=gen("fid"))   # the same noise for every w, setting and step
    with FIDSampler(x_T, s, workers) as sampler:
        evaluate_many = lambda states, desc="diffusion 2/3: FID θr": sampler.fids(states, desc, progress)
        (base_fid,) = evaluate_many([theta_r])
        rows, thetas = [], {}
        for zeta in s.zetas:
            synthetic = draw(model, s.n_synthetic, zeta, "synthetic")
            snapshots = finetune(model, loss_with(gen("finetune", _tag(zeta))), synthetic, s.finetune_steps,
                                 s.finetune_lr, s.batch, desc=f"diffusion 2/3: θs ζ={zeta:g}", progress=progress)
            for steps, theta_s in sorted(snapshots.items()):
                fids = evaluate_many([merge_state_dicts(theta_r, theta_s, w) for w in s.w],
                                     f"diffusion 2/3: FID(w) ζ={zeta:g} {steps} steps")
                rows.append(make_row("diffusion", zeta, zeta > 1, steps, base_fid, s.w, fids))
                thetas[(zeta, steps)] = theta_s
    timings["neon_sweeps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_real = fresh_samples(s.n_cos_real, gen("cos-real"))
    g_d, v_hat = gradient_moments(model, loss_with(gen("cos-real-loss")), x_real, s.batch, s.cos_passes)

    def cosine(zeta: float) -> float:   # each ζ on its own copy of θr: gradient_moments sets train/eval mode
        theta = copy.deepcopy(model)
        x_syn = draw(theta, s.n_cos_synthetic, zeta, "cos-synthetic")
        g_s, _ = gradient_moments(theta, loss_with(gen("cos-synthetic-loss", _tag(zeta))), x_syn, s.batch,
                                  s.cos_passes)
        return preconditioned_cosine(g_d, g_s, v_hat)

    cosines = parallel_map(cosine, list(s.cos_zetas), workers, "diffusion 3/3: cos(g_d, g_s)", progress)
    timings["gradient_cosine"] = time.perf_counter() - t0

    shown, neon = _best_neon_model(model, theta_r, thetas, rows)
    show = lambda m: diffusion_lib.sample(m, x_T[:n_show], 1.0, s.sample_steps, s.eta).numpy()
    samples = dict(real=fresh_samples(n_show, gen("show-real")).numpy(), base=show(model), neon=show(neon),
                   w=shown["best_w"], sampler_param=shown["sampler_param"], finetune_steps=shown["finetune_steps"])
    return dict(rows=rows, cosine=dict(model="diffusion", param="zeta", sampler_param=list(s.cos_zetas), cos=cosines),
                samples=samples, timings_s=timings)


def run_ar(s: ARSettings, seed: int, data_seed: int, n_show: int, progress: bool = True) -> dict:
    """The same steps as run_diffusion for the autoregressive model, with temperature τ as the sampler knob."""
    gen = partial(stage_generator, seed, "ar")
    nll = lambda model, x: model.nll(x)
    draw = lambda model, n, tau, tag: model.sample(torch.randn(n, 2, generator=gen(tag, _tag(tau))), tau)
    timings = {}

    t0 = time.perf_counter()
    model = init_model(ar_lib.ARGaussian2D, gen("init"))
    fit(model, nll, training_set(s.n_real, data_seed), s.base_epochs, s.base_lr, s.batch, desc="AR 1/3: θr",
        progress=progress)
    theta_r = state(model)
    timings["base_training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eps = torch.randn(s.n_fid, 2, generator=gen("fid"))   # the same noise for every w, setting and epoch
    evaluate = lambda m: fid(m.sample(eps, s.tau_eval))
    base_fid = evaluate(model)
    rows, thetas = [], {}
    for tau in s.taus:
        synthetic = draw(model, s.n_synthetic, tau, "synthetic")
        snapshots = finetune(model, nll, synthetic, s.finetune_epochs, s.finetune_lr, s.batch,
                             desc=f"AR 2/3: θs τ={tau:g}", progress=progress)
        for epochs, theta_s in sorted(snapshots.items()):
            fids = sweep_w(model, theta_r, theta_s, s.w, evaluate, f"AR 2/3: FID(w) τ={tau:g} {epochs} epochs",
                           progress)
            rows.append(make_row("ar", tau, tau < 1, epochs, base_fid, s.w, fids))
            thetas[(tau, epochs)] = theta_s
    timings["neon_sweeps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x_real = fresh_samples(s.n_cos_real, gen("cos-real"))
    g_d, v_hat = gradient_moments(model, nll, x_real, s.batch)
    cosines = []
    for tau in tqdm(s.cos_taus, desc="AR 3/3: cos(g_d, g_s)", disable=not progress, leave=False):
        g_s, _ = gradient_moments(model, nll, draw(model, s.n_cos_synthetic, tau, "cos-synthetic"), s.batch)
        cosines.append(preconditioned_cosine(g_d, g_s, v_hat))
    timings["gradient_cosine"] = time.perf_counter() - t0

    shown, neon = _best_neon_model(model, theta_r, thetas, rows)
    samples = dict(real=fresh_samples(n_show, gen("show-real")).numpy(),
                   base=model.sample(eps[:n_show], s.tau_eval).numpy(),
                   neon=neon.sample(eps[:n_show], s.tau_eval).numpy(),
                   w=shown["best_w"], sampler_param=shown["sampler_param"], finetune_steps=shown["finetune_steps"])
    return dict(rows=rows, cosine=dict(model="ar", param="tau", sampler_param=list(s.cos_taus), cos=cosines),
                samples=samples, timings_s=timings)


def run_toy(quick: bool = False, seed: int = 0, progress: bool = True, settings: ToySettings | None = None,
            threads: int = 1) -> dict:
    """Both models end to end -> a result dict: `rows` (one per model × sampler setting × self-training length),
    `cosine` (one sweep per model), `samples` (numpy arrays for the scatter plot), `settings`, `timings_s`.

    threads: parallel workers — processes for the diffusion FID sampling, which is most of the work, threads for
    the gradient-cosine sweep, and with threads > 1 the AR model's run on a thread of its own beside the diffusion
    run. Torch itself runs on one thread throughout (restored afterwards): every product here is small, and a
    torch thread pool spends its time waiting at each op's barrier. The results do not depend on `threads`.
    """
    settings = settings or (QUICK if quick else FULL)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        # The AR model's run is serial and small: beside the diffusion run it fills the cores the diffusion run
        # leaves idle (its base training, its self-training). Every draw comes from a stage's own generator, so
        # running the two side by side changes no number.
        run_ar_now = partial(run_ar, settings.ar, seed, settings.data_seed, settings.n_show, progress)
        with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as side:
            ar = side.submit(run_ar_now) if threads > 1 else None
            diffusion = run_diffusion(settings.diffusion, seed, settings.data_seed, settings.n_show, progress,
                                      workers=threads)
            runs = dict(diffusion=diffusion, ar=ar.result() if ar else run_ar_now())
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return dict(quick=bool(quick), seed=int(seed), data_seed=settings.data_seed, threads=int(threads),
                versions=dict(torch=torch.__version__, numpy=np.__version__),
                settings=dataclasses.asdict(settings),
                rows=[row for run in runs.values() for row in run["rows"]],
                cosine=[run["cosine"] for run in runs.values()],
                samples={name: run["samples"] for name, run in runs.items()},
                timings_s={**{name: run["timings_s"] for name, run in runs.items()}, "total": total})


def format_table(result: dict) -> str:
    """The summary table: one line per row of the result, FIDs with their log10 (the paper plots log10 FID)."""
    symbol = dict(diffusion="ζ", ar="τ")
    unit = dict(diffusion="steps", ar="epochs")
    head = (f"{'model':<10} {'setting':<22} {'self-train':>11} {'base FID (log10)':>18} {'best w':>7} "
            f"{'FID at best w (log10)':>22} {'improvement':>12}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        kind = "mode-seeking" if r["mode_seeking"] else "diversity"
        setting = f"{symbol[r['model']]}={r['sampler_param']:g} ({kind})"
        fmt = lambda f: f"{f:.4f} ({math.log10(f):+.2f})" if 0 < f < math.inf else str(f)
        gain = f"{100 * (1 - r['best_fid'] / r['base_fid']):.0f}%" if r["base_fid"] > 0 else "-"
        lines.append(f"{r['model']:<10} {setting:<22} {str(r['finetune_steps']) + ' ' + unit[r['model']]:>11} "
                     f"{fmt(r['base_fid']):>18} {r['best_w']:>+7.2f} {fmt(r['best_fid']):>22} {gain:>12}")
    cos = "; ".join(f"{c['model']}: " + ", ".join(
        f"{symbol[c['model']]}={c['sampler_param'][i]:.3g} {c['cos'][i]:+.2f}" for i in _spread(len(c["cos"])))
        for c in result["cosine"])
    return "\n".join(lines) + f"\ngradient cosine at θr — {cos}"


def _spread(n: int, k: int = 7) -> list[int]:
    """At most k indices spread evenly over range(n), ends included (the plot shows every point)."""
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, min(n, k)))})
