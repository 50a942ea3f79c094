"""The study's outputs: the table (printed and saved as table.md), study.json, FD-vs-w plot, sample grid."""
from __future__ import annotations

import json
import os

import numpy as np

from experiments.fashion_mnist.config import ARMS, StudyConfig
from experiments.fashion_mnist.evaluate import best_row, summarize_arm
from neon.checkpoint import atomic_open, atomic_path
from neon.images import NpzImages, image_grid

ARM_TITLES = {"ode": "Neon, S from the ODE sampler (Heun, deterministic)",
              "control": "control, fine-tuned on real training images",
              "diverse": "sign test, S from a diversity-seeking sampler"}
ARM_COLORS = {"ode": "C0", "control": "C2", "diverse": "C3"}


def summarize(points: dict) -> dict:
    base = points["base_w0"]["blocks"]
    out = {}
    for arm in ARMS:
        per_w = {p["w"]: p["blocks"] for p in points.values() if p["arm"] == arm}
        rows = summarize_arm(per_w, base)
        out[arm] = {"rows": rows, "best": best_row(rows)}
    return out


def _pm(d: dict, digits: int) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def table_markdown(summary: dict, n_seeds: int, n_images: int) -> str:
    lines = [(f"Paired evaluation: {n_seeds} evaluation seeds × {n_images} images, the same seeds for every model. "
              "mean ± std across evaluation seeds; Δ = FD(w) − FD(w=0) per seed (negative = better than θr)."), "",
             "| arm | w | classifier FD | Δ classifier FD | pixel FD | Δ pixel FD |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        for r in summary[arm]["rows"]:
            lines.append(f"| {arm} | {r['w']:+.2f} | {_pm(r['classifier_fd'], 3)} | {_pm(r['classifier_fd_diff'], 3)} "
                         f"| {_pm(r['pixel_fd'], 4)} | {_pm(r['pixel_fd_diff'], 4)} |")
    lines.append("")
    for arm in ARMS:
        b = summary[arm]["best"]
        lines.append(f"- best w ({arm}): {b['w']:+g}, classifier FD {b['fd']:.3f}, paired improvement "
                     f"{b['improvement']:.3f} ± {b['improvement_std']:.3f} (ratio {b['ratio']:.1f})")
    return "\n".join(lines) + "\n"


def plot_fd_vs_w(summary: dict, path: str, n_seeds: int, n_images: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    panels = (("classifier_fd", "classifier FD (vs test split)"),
              ("classifier_fd_diff", "Δ classifier FD vs w = 0 (paired)"),
              ("pixel_fd", "pixel FD (vs test split)"))
    for ax, (metric, title) in zip(axes, panels):
        for arm in ARMS:
            rows = summary[arm]["rows"]
            ax.errorbar([r["w"] for r in rows], [r[metric]["mean"] for r in rows],
                        yerr=[r[metric]["std"] for r in rows], fmt="o-", ms=4, capsize=3, color=ARM_COLORS[arm],
                        label=f"{arm}: best w = {summary[arm]['best']['w']:+g}")
        ax.axvline(0, color="0.6", lw=0.8)
        if metric.endswith("_diff"):
            ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("w   (θneon = (1+w)·θr − w·θs)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Neon on Fashion-MNIST 16×16 — mean ± std over {n_seeds} evaluation seeds × {n_images} images",
                 fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_samples(eval_folder: str, best_w: float, path: str, count: int = 30, real: np.ndarray | None = None) -> None:
    """θr and θneon (the ODE arm's best w) on the same seeds and labels (the first images of evaluation seed 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("θr (w = 0)", NpzImages(os.path.join(eval_folder, "base_w0.npz")).read(0, count))]
    neon_file = os.path.join(eval_folder, f"ode_w{best_w:g}.npz")
    if best_w != 0 and os.path.isfile(neon_file):
        panels.append((f"θneon (w = {best_w:+g}), same seeds", NpzImages(neon_file).read(0, count)))
    if real is not None:
        panels.append(("real test images (same classes)", real[:count]))
    cols = 10
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, len(panels) * (0.4 + 0.64 * rows)), dpi=110)
    for ax, (title, images) in zip(np.atleast_1d(axes), panels):
        ax.imshow(image_grid(images, cols)[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def real_like(test_path: str, labels: np.ndarray, count: int) -> np.ndarray:
    """The first test images of each requested class, in the order of `labels`."""
    test = NpzImages(test_path)
    images, test_labels = test.read(0, len(test)), test.labels
    used = {c: 0 for c in np.unique(labels)}
    out = []
    for c in labels[:count]:
        idx = np.flatnonzero(test_labels == c)[used[c]]
        used[c] += 1
        out.append(images[idx])
    return np.stack(out)


def training_set_lines(training_sets: dict, reference_trace: float | None) -> str:
    ref = "" if reference_trace is None else f"; test split: {reference_trace:.1f}"
    lines = [f"training sets of the arms (feature spread = trace of the classifier-feature covariance{ref}):"]
    for arm, m in training_sets.items():
        lines.append(f"  {arm:>8}: classifier FD {m['classifier_fd']:.3f}, feature spread {m['feature_trace']:.1f}, "
                     f"confidence {m['confidence']:.3f}, pixel std {m['pixel_std']:.3f}")
    return "\n".join(lines) + "\n"


def write_report(out: str, run_doc: dict, cfg: StudyConfig, evaluation: dict, training_sets: dict, smoke: bool,
                 wall_seconds: float) -> dict:
    stages = run_doc["stages"]
    summary = summarize(evaluation["points"])
    blocks = evaluation["blocks"]
    n_seeds, n_images = len(blocks), blocks[0][1] - blocks[0][0] + 1
    best_ode = summary["ode"]["best"]
    criterion = {"required_ratio": cfg.required_ratio, "best_w": best_ode["w"], "ratio": best_ode["ratio"],
                 "met": bool(best_ode["w"] > 0 and best_ode["ratio"] >= cfg.required_ratio)}
    compute = {name: st.get("seconds") for name, st in stages.items()}
    doc = {"smoke": smoke, "config": run_doc["config"], "versions": run_doc["versions"],
           "classifier": {k: stages["classifier"][k] for k in ("test_accuracy", "feature_dim", "train_images")},
           "base": {k: stages["base"].get(k) for k in ("parameters", "final_loss", "theta_r")},
           "training_sets": training_sets,   # per arm: FD to the test split, feature spread, confidence, ...
           "selftrain": {arm: {k: stages[f"selftrain_{arm}"].get(k) for k in ("relative_change", "final_loss")}
                         for arm in ARMS},
           "evaluation": {"seed_ranges": blocks, "images_per_seed": n_images, "sampler": cfg.evaluation.sampler},
           "arms": summary, "criterion": criterion,
           "seconds": {"stages": compute, "total_compute": round(sum(v or 0 for v in compute.values()), 1),
                       "this_invocation_wall": round(wall_seconds, 1)}}
    if smoke:
        doc["note"] = "smoke run: tiny model and counts; the numbers mean nothing"
    table = table_markdown(summary, n_seeds, n_images)
    facts = (f"\nclassifier test accuracy: {doc['classifier']['test_accuracy']:.4f} "
             f"({doc['classifier']['feature_dim']}-d features)\n"
             f"θr: {doc['base']['parameters']:,} parameters; total compute {doc['seconds']['total_compute']:.0f} s, "
             f"this invocation {wall_seconds:.0f} s wall\n"
             f"success criterion (ODE best-w improvement ≥ {cfg.required_ratio:g}× its std): "
             f"{'met' if criterion['met'] else 'NOT met'} (ratio {criterion['ratio']:.2f} at w = {best_ode['w']:+g})\n")
    facts += training_set_lines(training_sets, evaluation.get("reference_trace"))
    with atomic_open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + facts)
    with atomic_open(os.path.join(out, "study.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    plot_fd_vs_w(summary, os.path.join(out, "fd_vs_w.png"), n_seeds, n_images)
    base_labels = NpzImages(os.path.join(evaluation["folder"], "base_w0.npz")).labels
    real = real_like(stages["data"]["paths"]["test"], base_labels, 30) if base_labels is not None else None
    plot_samples(evaluation["folder"], best_ode["w"], os.path.join(out, "samples.png"), real=real)
    print(table + facts + ("(smoke run: the numbers mean nothing)\n" if smoke else ""), end="")
    return doc
