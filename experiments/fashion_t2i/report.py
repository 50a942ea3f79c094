"""The text-to-image study's outputs: the Fashion-MNIST study's (table.md, study.json, fd_vs_w.png, samples.png,
experiments/fashion_mnist/report.py) plus prompt adherence — the classifier's accuracy on the class each image's
prompt asked for — paired with θr range by range like FD, and a grid of θr vs θneon per prompt (prompt_samples.png)."""
from __future__ import annotations

import json
import os

import numpy as np

from experiments.fashion_mnist.config import GUIDE_ARM
from experiments.fashion_mnist.evaluate import mean_std
from experiments.fashion_mnist.protocol import base_point, guided_point, merge_point
from experiments.fashion_mnist.report import sweeps, write_report
from neon.checkpoint import atomic_open, atomic_path
from neon.images import NpzImages

ADHERENCE = "label_accuracy"     # image_set_metrics' name: argmax of the classifier == the prompt's class


def adherence_row(report: list[dict], base: list[dict]) -> dict:
    """Prompt adherence of a model over the report ranges and its paired difference to θr (the same seeds and
    prompts range by range): mean ± std across ranges."""
    values = [m[ADHERENCE] for m in report]
    diffs = [m[ADHERENCE] - b[ADHERENCE] for m, b in zip(report, base, strict=True)]
    return {"adherence": dict(zip(("mean", "std"), mean_std(values))),
            "adherence_diff": dict(zip(("mean", "std"), mean_std(diffs))), "adherence_values": values}


def adherence_markdown(doc: dict, evaluation: dict) -> str:
    base = evaluation["report"]["base_w0"]
    lines = ["Prompt adherence (the classifier's accuracy on the class the prompt asked for; its test accuracy on "
             f"real images is {doc['classifier']['test_accuracy']:.3f}), the same models, ranges and images; "
             "Δ = adherence(model) − adherence(θr) per range (positive = better than θr):", "",
             "| model | chosen on validation | val. adherence | adherence | Δ adherence |", "|---|---|---:|---:|---:|"]
    for r in doc["comparison"]:
        row = adherence_row(evaluation["report"][r["point"]], base)
        r.update(row)
        lines.append(f"| {r['model']} | {r['setting']} | {r['validation'][ADHERENCE]:.3f} "
                     f"| {row['adherence']['mean']:.3f} ± {row['adherence']['std']:.3f} "
                     f"| {row['adherence_diff']['mean']:+.3f} ± {row['adherence_diff']['std']:.3f} |")
    lines += ["", "Prompt adherence of every grid point on the validation range (← = chosen by classifier FD); Δ to "
              "θr on the same range:", "", "| grid | x | adherence | Δ adherence |", "|---|---:|---:|---:|"]
    val = evaluation["validation"]
    for name, x, point, chosen in grid_points(doc):
        a = val[point][ADHERENCE]
        lines.append(f"| {name} | {x}{' ←' if chosen else ''} | {a:.3f} | {a - val['base_w0'][ADHERENCE]:+.3f} |")
    return "\n".join(lines) + "\n"


def grid_points(doc: dict) -> list[tuple[str, str, str, bool]]:
    """(grid, "w = …" or "ω = …", the point evaluated there, chosen?) for every row of every searched grid."""
    out = []
    neon_w = doc["guidance"]["neon_guided"]["neon_w"]
    for name, (axis, sweep) in sweeps(doc).items():
        for r in sweep["rows"]:
            x = r[axis]
            if axis == "w":
                point = merge_point(name, x)
            elif x == 0:                       # ω = 0: the unguided model (θr, or θneon for the Neon grid)
                point = base_point() if name == "guided" else merge_point(GUIDE_ARM, neon_w)
            else:
                point = guided_point(x, None if name == "guided" else neon_w)
            label = f"{'ω' if axis == 'omega' else 'w'} = {x:+.2f}"
            out.append((name, label, point.name, x == sweep["chosen"][axis]))
    return out


def plot_prompt_samples(eval_folder: str, panels: list[tuple[str, str]], prompts: list[str], path: str,
                        per_prompt: int = 3) -> None:
    """For each panel (title, point name), the first `per_prompt` report images of every prompt: the same seeds
    in every panel, one column per prompt."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels) * per_prompt, len(prompts), figsize=(1.1 * len(prompts),
                             1.15 * len(panels) * per_prompt + 0.6), dpi=110, squeeze=False)
    for p, (title, name) in enumerate(panels):
        s = NpzImages(os.path.join(eval_folder, f"{name}.npz"))
        images, labels = s.read(0, len(s)), s.labels
        for c, prompt in enumerate(prompts):
            idx = np.flatnonzero(labels == c)[:per_prompt]
            for k, i in enumerate(idx):
                ax = axes[p * per_prompt + k, c]
                ax.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if p == 0 and k == 0:
                    ax.set_title(prompt.replace("a photo of a ", "…"), fontsize=7)
                if c == 0 and k == 0:
                    ax.set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_text_report(out: str, run_doc: dict, cfg, evaluation: dict, training_sets: dict, smoke: bool,
                      wall_seconds: float, prompts: list[str]) -> dict:
    doc = write_report(out, run_doc, cfg, evaluation, training_sets, smoke, wall_seconds)
    table = adherence_markdown(doc, evaluation)
    stages = run_doc["stages"]
    doc["vae"] = {k: stages["vae"].get(k) for k in ("reconstruction_mse", "scaling_factor", "final_loss", "seconds")}
    doc["prompts"] = prompts
    with open(os.path.join(out, "table.md")) as f:
        before = f.read()
    with atomic_open(os.path.join(out, "table.md"), "w") as f:
        f.write(before + "\n" + table)
    with atomic_open(os.path.join(out, "study.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    neon = doc["arms"][GUIDE_ARM]["chosen"]
    panels = [("θr", "base_w0")] + ([(f"θneon\nw = {neon['w']:+g}", neon["point"])] if neon["w"] != 0 else [])
    plot_prompt_samples(os.path.join(evaluation["folder"], "report"), panels, prompts,
                        os.path.join(out, "prompt_samples.png"))
    print("\n" + table, end="")
    return doc
