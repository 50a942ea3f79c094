"""The toy's figures as matplotlib Figures (no pyplot state): FID(w) curves, gradient cosines, sample scatter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from experiments.toy.gaussian import target
from neon.checkpoint import atomic_open

TITLE = dict(diffusion="diffusion", ar="autoregressive")
SYMBOL = dict(diffusion="ζ", ar="τ")
UNIT = dict(diffusion="steps", ar="epochs")


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
                line, = ax.plot(r["w"], np.log10(r["fid"]), label=f"{SYMBOL[model]}={r['sampler_param']:g} ({kind})")
                ax.plot([r["best_w"]], [np.log10(r["best_fid"])], "o", color=line.get_color())
            ax.axvline(0, color="k", linestyle=":", linewidth=1)
            ax.axhline(np.log10(_base(rows, model)), color="gray", linewidth=0.8, linestyle="--",
                       label="base model θr")
            ax.set(title=f"{TITLE[model]}: θs after {steps} {UNIT[model]}", xlabel="merge weight w",
                   ylabel="log10 FID")
            ax.grid(True, linestyle="--", alpha=0.5)
            ax.legend(fontsize=8)
    return fig


def _base(rows: list[dict], model: str) -> float:
    return next(r["base_fid"] for r in rows if r["model"] == model)


def cosines(result: dict) -> Figure:
    """The Adam-preconditioned cosine between real and synthetic gradients at θr vs the sampler setting."""
    sweeps = result["cosine"]
    fig = Figure(figsize=(5.2 * len(sweeps), 4.0), layout="constrained")
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, c in zip(axes, sweeps):
        model = c["model"]
        ax.plot(c["sampler_param"], c["cos"], "o-", markersize=3)
        ax.axhline(0, color="k", linestyle="--", linewidth=1)
        ax.axvline(1, color="k", linestyle=":", linewidth=1)
        lo, hi = ("diversity", "mode") if model == "diffusion" else ("mode", "diversity")
        ax.text(0.03, 0.95, f"← {lo}-seeking", transform=ax.transAxes, va="top", fontsize=8)
        ax.text(0.97, 0.95, f"{hi}-seeking →", transform=ax.transAxes, va="top", ha="right", fontsize=8)
        ax.set(title=f"{TITLE[model]}: gradient alignment at θr", xlabel=f"sampler {SYMBOL[model]}",
               ylabel="cos(g_d, g_s), Adam-preconditioned", ylim=(-1.05, 1.05))
        ax.grid(True, linestyle="--", alpha=0.5)
    return fig


def samples(result: dict) -> Figure:
    """Real vs base vs Neon samples, each with its 2-σ covariance ellipse (the true one dashed)."""
    shown = result["samples"]
    fig = Figure(figsize=(5.2 * len(shown), 5.0), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    mu, sigma = target()
    for ax, (model, s) in zip(axes, shown.items()):
        sets = [("real", s["real"], "tab:gray"), ("base θr", s["base"], "tab:blue"),
                (f"Neon, w={s['w']:+.2f}", s["neon"], "tab:red")]
        for label, x, color in sets:
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.25, color=color)
            _ellipse(ax, x.mean(0), np.cov(x.T), color, label)
        _ellipse(ax, mu, sigma, "k", "true N(μ, Σ)", linestyle="--")
        ax.set(title=f"{TITLE[model]}: θs at {SYMBOL[model]}={s['sampler_param']:g}, {s['finetune_steps']} "
                     f"{UNIT[model]}", xlabel="x1", ylabel="x2", aspect="equal")
        ax.legend(fontsize=8, loc="upper left")
    return fig


def _ellipse(ax, mean, cov, color, label, linestyle="-"):
    """The 2-σ ellipse of N(mean, cov)."""
    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
    ax.add_patch(Ellipse(mean, 4 * np.sqrt(vals[1]), 4 * np.sqrt(vals[0]), angle=angle, fill=False,
                         edgecolor=color, linestyle=linestyle, linewidth=1.5, label=label))


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
