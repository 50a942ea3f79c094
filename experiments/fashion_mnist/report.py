"""The study's outputs: the tables (printed and saved as table.md), study.json, the FD-vs-w/ω plot, sample grid."""
from __future__ import annotations

import json
import os

import numpy as np

from experiments.fashion_mnist.config import ARMS, GUIDE_ARM, StudyConfig
from experiments.fashion_mnist.protocol import summarize
from neon.checkpoint import atomic_open, atomic_path
from neon.images import NpzImages, image_grid

SWEEP_STYLES = {"ode": ("C0", "o-", "Neon (ODE arm), x = w"), "control": ("C2", "o-", "control arm, x = w"),
                "diverse": ("C3", "o-", "diverse arm, x = w"), "guided": ("C1", "s--", "θr guided by θs, x = ω"),
                "neon_guided": ("C4", "^--", "Neon + θs guidance, x = ω")}
NO_CFG = ("θr with classifier-free guidance re-tuned: does not apply — the model is trained without label dropout "
          "and has no unconditional branch.")


def sweeps(summary: dict) -> dict[str, tuple[str, dict]]:
    """Every searched grid: name -> (axis, {"rows", "chosen"})."""
    out = {arm: ("w", summary["arms"][arm]) for arm in ARMS}
    out.update({name: ("omega", summary["guidance"][name]) for name in ("guided", "neon_guided")})
    return out


def _pm(d: dict, digits: int) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def table_markdown(summary: dict, ranges: dict, n_images: int) -> str:
    report = [k for k in ranges if k != "validation"]
    val = ranges["validation"]
    spans = ", ".join(f"{ranges[k][0]}–{ranges[k][1]}" for k in report)
    lines = [(f"Each model at its setting chosen on the validation range (seeds {val[0]}–{val[1]}), measured on "
              f"{len(report)} report ranges × {n_images} images ({spans}), "
              "the same seeds and labels for every model. mean ± std across report ranges; Δ = FD(model) − FD(θr) "
              "per range (negative = better than θr)."), "",
             "| model | chosen on validation | val. classifier FD | classifier FD | Δ classifier FD | pixel FD | "
             "Δ pixel FD |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary["comparison"]:
        lines.append(f"| {r['model']} | {r['setting']} | {r['validation']['classifier_fd']:.3f} "
                     f"| {_pm(r['classifier_fd'], 3)} | {_pm(r['classifier_fd_diff'], 3)} "
                     f"| {_pm(r['pixel_fd'], 4)} | {_pm(r['pixel_fd_diff'], 4)} |")
    ng = summary["guidance"]["neon_guided"]
    lines += ["", f"Neon + guidance vs Neon alone (paired, report ranges): Δ classifier FD "
                  f"{_pm(ng['vs_neon']['classifier_fd_diff'], 3)}, Δ pixel FD {_pm(ng['vs_neon']['pixel_fd_diff'], 4)}",
              guidance_cost_line(summary["guidance_cost"]), NO_CFG, "",
              f"Every grid point on the validation range (seeds {val[0]}–{val[1]}; ← = chosen); Δ to θr on the same "
              "range:", "",
              "| grid | x | classifier FD | Δ classifier FD | pixel FD | Δ pixel FD |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, (axis, sweep) in sweeps(summary).items():
        for r in sweep["rows"]:
            mark = " ←" if r[axis] == sweep["chosen"][axis] else ""
            lines.append(f"| {name} | {'ω' if axis == 'omega' else 'w'} = {r[axis]:+.2f}{mark} "
                         f"| {r['classifier_fd']:.3f} | {r['classifier_fd_diff']:+.3f} "
                         f"| {r['pixel_fd']:.4f} | {r['pixel_fd_diff']:+.4f} |")
    lines.append("")
    for name, (axis, sweep) in sweeps(summary).items():
        c = sweep["chosen"]
        lines.append(f"- chosen {'ω' if axis == 'omega' else 'w'} ({name}): {c[axis]:+g}; report ranges: classifier FD "
                     f"{_pm(c['classifier_fd'], 3)}, paired improvement over θr {c['improvement']:.3f} ± "
                     f"{c['improvement_std']:.3f} (ratio {c['ratio']:.1f})")
    return "\n".join(lines) + "\n"


def guidance_cost_line(cost: dict) -> str:
    nfe, cpu = cost["network_evaluations_per_image"], cost["sampling_cpu_seconds_per_image"]
    if cost["network_evaluations_ratio"] is None:
        return "guidance cost: no guided point with ω ≠ 0 was sampled"
    return (f"guidance cost (measured): {nfe['guided']:.0f} network evaluations per image guided vs "
            f"{nfe['unguided']:.0f} unguided (×{cost['network_evaluations_ratio']:.2f}); sampling CPU time per image "
            f"×{cost['sampling_cpu_ratio']:.2f} ({1e3 * cpu['guided']:.1f} ms vs {1e3 * cpu['unguided']:.1f} ms)")


def plot_fd_vs_w(summary: dict, path: str, ranges: dict, n_images: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=110, gridspec_kw={"width_ratios": [1, 1, 1.2]})
    n_report = len(ranges) - 1
    val = ranges["validation"]
    panels = ((axes[0], list(ARMS), "w   (θ = (1+w)·θr − w·θ_arm)", "weight merges"),
              (axes[1], ["guided", "neon_guided"], "ω   ((1+ω)·D − ω·D_θs at every step)", "θs as sampling-time guide"))
    for ax, names, xlabel, title in panels:
        for name in names:
            axis, sweep = sweeps(summary)[name]
            color, fmt, label = SWEEP_STYLES[name]
            rows = sweep["rows"]
            ax.plot([r[axis] for r in rows], [r["classifier_fd_diff"] for r in rows], fmt, ms=4, color=color,
                    label=label)
            chosen = next(r for r in rows if r[axis] == sweep["chosen"][axis])
            ax.plot([chosen[axis]], [chosen["classifier_fd_diff"]], "*", ms=13, color=color, mec="k", mew=0.6)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Δ classifier FD vs θr")
        ax.set_title(f"{title}\nvalidation range (seeds {val[0]}–{val[1]}), ★ = chosen", fontsize=9.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    rows = summary["comparison"]
    ys = np.arange(len(rows))[::-1]
    colors = ["0.6", "C0", "C5", "C5", "C1", "C4"] + ["0.75"] * max(0, len(rows) - 6)
    axes[2].barh(ys, [r["classifier_fd_diff"]["mean"] for r in rows],
                 xerr=[r["classifier_fd_diff"]["std"] for r in rows], color=colors[:len(rows)], capsize=3)
    axes[2].set_yticks(ys, [f"{r['model']} {r['setting']}".strip() for r in rows], fontsize=7.5)
    axes[2].axvline(0, color="0.4", lw=0.8)
    axes[2].set_xlabel("Δ classifier FD vs θr (paired; negative = better)")
    axes[2].set_title(f"each model at its chosen setting\n{n_report} report ranges (mean ± std)", fontsize=9.5)
    axes[2].grid(alpha=0.3, axis="x")
    fig.suptitle(f"Neon and its baselines on Fashion-MNIST 16×16 — w, ω chosen on a validation range of {n_images} "
                 f"images, reported on {n_report} disjoint ranges × {n_images}", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_samples(eval_folder: str, panels: list[tuple[str, str]], path: str, count: int = 30,
                 real: np.ndarray | None = None) -> None:
    """panels: (title, point name) of models sampled on the same seeds and labels (their first `count` images in
    `eval_folder`), then `real` test images of the same classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [(title, NpzImages(os.path.join(eval_folder, f"{name}.npz")).read(0, count)) for title, name in panels]
    if real is not None:
        shown.append(("real test images (same classes)", real[:count]))
    cols = 10
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(len(shown), 1, figsize=(6.4, len(shown) * (0.4 + 0.64 * rows)), dpi=110)
    for ax, (title, images) in zip(np.atleast_1d(axes), shown):
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
    summary = summarize(evaluation["validation"], evaluation["report"], cfg)
    summary["guidance_cost"] = evaluation["guidance_cost"]
    ranges = evaluation["ranges"]
    n_images = ranges["validation"][1] - ranges["validation"][0] + 1
    chosen = summary["arms"][GUIDE_ARM]["chosen"]
    criterion = {"required_ratio": cfg.required_ratio, "chosen_w": chosen["w"], "ratio": chosen["ratio"],
                 "met": bool(chosen["w"] > 0 and chosen["ratio"] >= cfg.required_ratio)}
    compute = {name: st.get("seconds") for name, st in stages.items()}
    doc = {"smoke": smoke, "config": run_doc["config"], "versions": run_doc["versions"],
           "classifier": {k: stages["classifier"][k] for k in ("test_accuracy", "feature_dim", "train_images")},
           "base": {k: stages["base"].get(k) for k in ("parameters", "final_loss", "theta_r")},
           "training_sets": training_sets,   # per arm: FD to the test split, feature spread, confidence, ...
           "selftrain": {arm: {k: stages[f"selftrain_{arm}"].get(k) for k in ("relative_change", "final_loss")}
                         for arm in ARMS},
           "evaluation": {"ranges": ranges, "images_per_range": n_images, "sampler": cfg.evaluation.sampler,
                          "chosen_on": "validation range", "grid_curves": "validation range",
                          "chosen_models": "report ranges"},
           **summary, "no_cfg_baseline": NO_CFG, "criterion": criterion,
           "seconds": {"stages": compute, "total_compute": round(sum(v or 0 for v in compute.values()), 1),
                       "this_invocation_wall": round(wall_seconds, 1)}}
    if smoke:
        doc["note"] = "smoke run: tiny model and counts; the numbers mean nothing"
    table = table_markdown(summary, ranges, n_images)
    facts = (f"\nclassifier test accuracy: {doc['classifier']['test_accuracy']:.4f} "
             f"({doc['classifier']['feature_dim']}-d features)\n"
             f"θr: {doc['base']['parameters']:,} parameters; total compute {doc['seconds']['total_compute']:.0f} s, "
             f"this invocation {wall_seconds:.0f} s wall\n"
             f"success criterion (Neon's w chosen on the validation range, w > 0, with a paired improvement on the "
             f"report ranges ≥ {cfg.required_ratio:g}× its std): {'met' if criterion['met'] else 'NOT met'} "
             f"(ratio {criterion['ratio']:.2f} at w = {chosen['w']:+g})\n")
    facts += training_set_lines(training_sets, evaluation.get("reference_trace"))
    with atomic_open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + facts)
    with atomic_open(os.path.join(out, "study.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    plot_fd_vs_w(summary, os.path.join(out, "fd_vs_w.png"), ranges, n_images)
    folder = os.path.join(evaluation["folder"], "report")
    base_labels = NpzImages(os.path.join(folder, "base_w0.npz")).labels
    real = real_like(stages["data"]["paths"]["test"], base_labels, 30) if base_labels is not None else None
    plot_samples(folder, sample_panels(summary), os.path.join(out, "samples.png"), real=real)
    print(table + facts + ("(smoke run: the numbers mean nothing)\n" if smoke else ""), end="")
    return doc


def sample_panels(summary: dict) -> list[tuple[str, str]]:
    """θr, Neon at its chosen w and θr guided at its chosen ω (each shown once)."""
    rows = summary["comparison"]
    panels = {rows[0]["point"]: "θr"}
    for r in rows[1:]:
        if r["model"] in ("Neon (S from the ODE sampler)", "θr guided by θs"):
            panels.setdefault(r["point"], f"{r['model']}, {r['setting']}, same seeds")
    return [(title, name) for name, title in panels.items()]
