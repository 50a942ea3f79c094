"""Sweep metrics against the merge weight w: the paper's Fig. 4 (precision falls as w grows, recall rises then
falls) and any one recorded number (FID, FD_DINOv2, KID, IS) vs w. Each figure is written atomically.

    plot_precision_recall(points, 'sweep_precision_recall.png')   # points: sweep.json's "points"
    plot_metric_vs_w(points, 'kid_mean', 'sweep_kid_mean.png')
"""
from __future__ import annotations

import json
import math
import os

from neon.checkpoint import atomic_path

W_LABEL = "merge weight w   (θneon = (1+w)·θr − w·θs)"


def _curves(points: list[dict], key: str, cfg_key: str) -> list[tuple[str, list[dict]]]:
    """(label, points sorted by w) per guidance scale × setting, keeping only points that recorded `key`."""
    curves: dict[tuple[str, float | None], list[dict]] = {}
    for p in points:
        if p.get(key) is not None:
            curves.setdefault((json.dumps(p.get("setting", {}), sort_keys=True), p.get("cfg")), []).append(p)
    out = []
    for (setting, c), pts in sorted(curves.items(), key=lambda kv: (kv[0][0], -math.inf if kv[0][1] is None
                                                                    else kv[0][1])):
        parts = [f"{k}={v}" for k, v in sorted(json.loads(setting).items())]
        out.append((" ".join(parts + ([] if c is None else [f"{cfg_key}={c:g}"])), sorted(pts, key=lambda p: p["w"])))
    return out


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_metric_vs_w(points: list[dict], key: str, path: str, ylabel: str | None = None, cfg_key: str = "cfg") -> bool:
    """`key` (e.g. 'kid_mean') vs w, one curve per guidance scale / setting; False (nothing written) when no
    point recorded it."""
    curves = _curves(points, key, cfg_key)
    if not curves:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, pts in curves:
        ax.plot([p["w"] for p in pts], [p[key] for p in pts], "o-", ms=3, label=label or "θneon")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel(W_LABEL)
    ax.set_ylabel(ylabel or f"{key} ({curves[0][1][0].get('num_images', '?')} images)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


def plot_precision_recall(points: list[dict], path: str, cfg_key: str = "cfg") -> bool:
    """Precision (left) and recall (right) vs w, one curve per guidance scale / setting, w = 0 (θr) marked;
    False (nothing written) when no point recorded precision and recall."""
    curves = _curves([p for p in points if p.get("recall") is not None], "precision", cfg_key)
    if not curves:
        return False
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=120, sharex=True)
    for ax, key in zip(axes, ("precision", "recall")):
        for label, pts in curves:
            ax.plot([p["w"] for p in pts], [p[key] for p in pts], "o-", ms=3, label=label or "θneon")
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_xlabel(W_LABEL)
        ax.set_ylabel(f"{key} (k-NN, {curves[0][1][0].get('num_images', '?')} images)")
        ax.set_title(key.capitalize(), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(plt, fig, path)
    return True


# One figure per metric the sweep may record, whichever of them is its objective: (key, file suffix, axis label).
# The CLIP score (prompt adherence, higher is better) is drawn beside the distances on the same w axis.
METRIC_FIGURES = (("fid", "fid", "FID"), ("fd_dinov2", "fd_dinov2", "FD_DINOv2"), ("kid_mean", "kid", "KID"),
                  ("clip_score", "clip_score", "CLIP score, higher is better"))


def plot_sweep_metrics(points: list[dict], sweep_path: str, cfg_key: str = "cfg") -> list[str]:
    """Next to sweep.json: `<stem>_precision_recall.png`, and `<stem>_fid.png`, `<stem>_fd_dinov2.png`,
    `<stem>_kid.png`, `<stem>_clip_score.png`, each when the points recorded it. Returns the files written."""
    stem = os.path.splitext(sweep_path)[0]
    written = []
    if plot_precision_recall(points, stem + "_precision_recall.png", cfg_key):
        written.append(stem + "_precision_recall.png")
    for key, suffix, label in METRIC_FIGURES:
        n = next((p.get("num_images") for p in points if p.get(key) is not None), "?")
        if plot_metric_vs_w(points, key, f"{stem}_{suffix}.png", f"{label} ({n} images)", cfg_key):
            written.append(f"{stem}_{suffix}.png")
    return written


# ---------------------------------------------------------------------------------------------------------
# The baselines beside Neon (neon/baselines.py).

def _best_along(points: list[dict], key: str = "fid") -> tuple[list[float], list[float]]:
    """(x, lowest `key` at x) of sweep points, x their 'w' (ω for a guide sweep), each x at its best guidance
    scale / setting."""
    best: dict[float, float] = {}
    for p in points:
        best[p["w"]] = min(best.get(p["w"], math.inf), p[key])
    xs = sorted(best)
    return xs, [best[x] for x in xs]


def plot_guide_sweeps(neon_points: list[dict], sweeps: dict[str, list[dict]], path: str, cfg_key: str = "cfg",
                      neon_w: float | None = None, key: str = "fid") -> bool:
    """The sweep objective `key` (FID by default) vs ω of the guide baselines ('self_guidance', 'neon_guidance')
    beside Neon's objective vs w, each x at its best guidance scale; θr re-tuned over the guidance grid
    ('guidance_retune') as a level line; `neon_w`, θneon's chosen w, names the guided merge. False (nothing
    written) when there is nothing to draw besides Neon."""
    guides = {n: p for n, p in sweeps.items() if n != "guidance_retune" and p}
    retune = sweeps.get("guidance_retune") or []
    if not guides and not retune:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.2, 4.0), dpi=120)
    if neon_points:
        ax.plot(*_best_along(neon_points, key), "o-", ms=4, color="k", label="θneon(w): merge weight w")
    at = "" if neon_w is None else f" (w = {neon_w:g})"
    labels = {"self_guidance": "θr guided by θs: ω", "neon_guidance": f"θneon{at} guided by θs: ω"}
    for i, (name, pts) in enumerate(sorted(guides.items())):
        ax.plot(*_best_along(pts, key), "s--", ms=4, color=f"C{i}", label=labels.get(name, name))
    if retune:
        best = min(retune, key=lambda p: p[key])
        ax.axhline(best[key], color="C3", ls=":", label=f"θr at its best {cfg_key} = {best['cfg']:g} (re-tuned)")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("w (merge)  or  ω (guide scale: (1+ω)·out_θr − ω·out_θs)")
    counts = {p.get("num_images") for pts in [neon_points, retune, *guides.values()] for p in pts}
    label = {k: name for k, _, name in METRIC_FIGURES}.get(key, key)
    ax.set_ylabel(f"sweep {label} ({', '.join(str(c) for c in sorted(c for c in counts if c))} images)")
    ax.set_title("sweep objective, same seeds" + (f", each point at its best {cfg_key}" if retune else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


def plot_final_comparison(rows: list[tuple[str, dict]], path: str, key: str = "fid") -> bool:
    """A horizontal bar per model (θr, θneon, each baseline): its final `key` with the value printed, the best
    one in dark. rows: (label, final result); False (nothing written) when fewer than two recorded `key`."""
    rows = [(label, r) for label, r in rows if r.get(key) is not None]
    if len(rows) < 2:
        return False
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.2, 0.9 + 0.45 * len(rows)), dpi=120)
    values = [r[key] for _, r in rows]
    best = min(values)
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=["0.2" if v == best else "0.65" for v in values], height=0.6)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.4g}", va="center", fontsize=8)
    ax.set_yticks(y, [label for label, _ in rows], fontsize=8)
    ax.set_xlim(0, max(values) * 1.18)
    counts = sorted({r.get("num_images") for _, r in rows if r.get("num_images")})
    ax.set_xlabel(f"final {key.upper() if key == 'fid' else key} ({', '.join(map(str, counts))} images, final seeds; "
                  "lower is better)")
    ax.grid(alpha=0.3, axis="x")
    _save(plt, fig, path)
    return True
