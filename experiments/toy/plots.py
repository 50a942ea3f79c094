"""The toy's figures as matplotlib Figures (no pyplot state): FID(w) curves, gradient cosines, sample scatter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from experiments.toy.gaussian import fid, target
from neon.checkpoint import atomic_open

TITLE = dict(diffusion="diffusion", ar="autoregressive")
SYMBOL = dict(diffusion="ζ", ar="τ")
UNIT = dict(diffusion="steps", ar="epochs")
KIND_COLOR = {"mode-seeking": "tab:red", "diversity-seeking": "tab:blue"}   # the same in every panel and figure
MERGE = "θneon = (1+w)·θr − w·θs\nw = 0 is θr, w > 0 steps away from θs, w < 0 towards it"


def mode_seeking(model: str, param: float) -> bool | None:
    """The sampler setting's kind: diffusion ζ > 1 and AR τ < 1 sharpen the samples; 1 is the model's own."""
    if param == 1:
        return None
    return param > 1 if model == "diffusion" else param < 1


def fid_curves(result: dict) -> Figure:
    """log10 FID vs w: one row of panels per model, one panel per self-training length, one curve per sampler."""
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lengths = {m: sorted({r["finetune_steps"] for r in rows if r["model"] == m}) for m in models}
    ncols = max(len(v) for v in lengths.values())
    fig = Figure(figsize=(5.2 * ncols, 4.2 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), ncols, squeeze=False)
    for i, model in enumerate(models):
        for j in range(ncols):
            axes[i, j].set_visible(j < len(lengths[model]))
        for ax, steps in zip(axes[i], lengths[model]):
            for r in (r for r in rows if r["model"] == model and r["finetune_steps"] == steps):
                kind = "mode-seeking" if r["mode_seeking"] else "diversity-seeking"
                color = KIND_COLOR[kind]
                ax.plot(r["w"], np.log10(r["fid"]), color=color, label=f"S at {SYMBOL[model]}={r['sampler_param']:g} "
                                                                       f"({kind})")
                ax.plot([r["best_w"]], [np.log10(r["best_fid"])], "o", color=color)
            ax.axvline(0, color="k", linestyle=":", linewidth=1)
            ax.axhline(np.log10(_base(rows, model)), color="gray", linewidth=0.8, linestyle="--",
                       label="base model θr")
            ax.set(title=f"{TITLE[model]}: θs after {steps} {UNIT[model]}", xlabel="merge weight w",
                   ylabel="log10 FID (lower is better)")
            ax.grid(True, linestyle="--", alpha=0.5)
            ax.legend(fontsize=8)
    fig.suptitle(f"{MERGE}\nlower FID is better; ● the best w of each curve", fontsize=10)
    return fig


def _base(rows: list[dict], model: str) -> float:
    return next(r["base_fid"] for r in rows if r["model"] == model)


def cosines(result: dict) -> Figure:
    """The Adam-preconditioned cosine between real and synthetic gradients at θr vs the sampler setting."""
    sweeps = result["cosine"]
    fig = Figure(figsize=(5.2 * len(sweeps), 4.3), layout="constrained")
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, c in zip(axes, sweeps):
        model = c["model"]
        ax.plot(c["sampler_param"], c["cos"], "-", color="0.6", linewidth=1)
        for param, cos in zip(c["sampler_param"], c["cos"]):
            kind = mode_seeking(model, param)
            ax.plot([param], [cos], "o", markersize=5,
                    color="k" if kind is None else KIND_COLOR["mode-seeking" if kind else "diversity-seeking"])
        ax.axhline(0, color="k", linestyle="--", linewidth=1)
        ax.axvline(1, color="k", linestyle=":", linewidth=1)
        lo, hi = ("diversity", "mode") if model == "diffusion" else ("mode", "diversity")
        ax.text(0.03, 0.95, f"← {lo}-seeking", transform=ax.transAxes, va="top", fontsize=8)
        ax.text(0.97, 0.95, f"{hi}-seeking →", transform=ax.transAxes, va="top", ha="right", fontsize=8)
        ax.set(title=f"{TITLE[model]}: gradient alignment at θr", xlabel=f"sampler {SYMBOL[model]}",
               ylabel="cos(g_d, g_s), Adam-preconditioned", ylim=(-1.05, 1.05))
        ax.grid(True, linestyle="--", alpha=0.5)
    fig.suptitle(cosine_takeaway(sweeps), fontsize=10)
    return fig


def cosine_takeaway(sweeps: list[dict]) -> str:
    """What the measured signs say, in one line (read from the numbers, never assumed)."""
    signs = {True: [], False: []}
    for c in sweeps:
        for param, cos in zip(c["sampler_param"], c["cos"]):
            kind = mode_seeking(c["model"], param)
            if kind is not None:
                signs[kind].append(cos)
    if signs[True] and signs[False] and max(signs[True]) < 0 < min(signs[False]):
        return ("mode-seeking S (red) pulls θ against the real-data gradient (cos < 0): Neon's w > 0 reverses that "
                "step;\ndiversity-seeking S (blue) pulls θ along it (cos > 0): there a w < 0 (towards θs) helps")
    neg = sum(v < 0 for v in signs[True])
    return f"cos < 0 for {neg} of {len(signs[True])} mode-seeking settings, > 0 for " \
           f"{sum(v > 0 for v in signs[False])} of {len(signs[False])} diversity-seeking ones"


def samples(result: dict) -> Figure:
    """Base vs Neon samples as their 2-σ covariance ellipses against the true one (dashed), with the FID of the
    points drawn; real training points as a faint backdrop (the ellipses carry the message: a scatter of three
    overlapping clouds of nearly the same shape is unreadable)."""
    shown = result["samples"]
    fig = Figure(figsize=(5.2 * len(shown), 5.2), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    mu, sigma = target()
    for ax, (model, s) in zip(axes, shown.items()):
        real = np.asarray(s["real"])
        ax.scatter(real[:, 0], real[:, 1], s=2, alpha=0.15, color="0.6", label="real training points")
        sets = [("base θr", s["base"], "tab:blue"), (f"Neon, w={s['w']:+.2f}", s["neon"], "tab:red")]
        for label, x, color in sets:
            x = np.asarray(x)
            _ellipse(ax, x.mean(0), np.cov(x.T), color, f"{label}: FID {_fid(x):.3f}", linewidth=2.2)
        _ellipse(ax, mu, sigma, "k", "true N(μ, Σ)", linestyle="--", linewidth=1.8)
        half = 3.2 * np.sqrt(np.diag(sigma)).max()
        ax.set(xlim=(mu[0] - half, mu[0] + half), ylim=(mu[1] - half, mu[1] + half))
        ax.set(title=f"{TITLE[model]}: θs at {SYMBOL[model]}={s['sampler_param']:g}, {s['finetune_steps']} "
                     f"{UNIT[model]}", xlabel="x1", ylabel="x2", aspect="equal")
        ax.legend(fontsize=8, loc="upper left")
    return fig


def _ellipse(ax, mean, cov, color, label, linestyle="-", linewidth=1.5):
    """The 2-σ ellipse of N(mean, cov)."""
    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
    ax.add_patch(Ellipse(mean, 4 * np.sqrt(vals[1]), 4 * np.sqrt(vals[0]), angle=angle, fill=False,
                         edgecolor=color, linestyle=linestyle, linewidth=linewidth, label=label))


def _fid(x: np.ndarray) -> float:
    return fid(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))


FIGURES = {"toy_fid_vs_w.png": fid_curves, "toy_cosine.png": cosines, "toy_samples.png": samples}


def save_figures(result: dict, out: Path, dpi: int = 110) -> list[Path]:
    """Every figure in FIGURES written atomically into `out` -> the paths."""
    paths = []
    for name, make in FIGURES.items():
        path = Path(out) / name
        with atomic_open(str(path)) as f:
            make(result).savefig(f, format="png", dpi=dpi)
        paths.append(path)
    return paths
