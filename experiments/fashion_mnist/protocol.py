"""What the study evaluates, where each choice is made, and what it reports.

Models (`Point`s), all sampled with the same deterministic sampler on the same seeds and labels:
  - θr itself;
  - each arm's merge θ = (1+w)·θr − w·θ_arm over its w grid (Neon is the ODE arm);
  - the continued fine-tuning baselines, each arm's fine-tuned θ as it is (w = −1): θ fine-tuned on real images
    (control) and θs itself (ODE arm), at the same compute as self-training;
  - θr sampled with the ODE arm's θs as guide, (1+ω)·D_θr − ω·D_θs at every denoiser evaluation (SIMS /
    autoguidance form, neon/guidance.py), over an ω grid;
  - Neon + guidance: θneon at the ODE arm's chosen w, sampled with the same guide, over an ω grid.
Every w and ω is chosen on the validation range (lowest classifier FD there); the chosen point is reported on the
report ranges as mean ± std and paired Δ to θr, range by range. The grid curves are kept on both.

There is no "θr with classifier-free guidance re-tuned" baseline: the model is trained without label dropout, so
it has no unconditional branch to guide with.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.fashion_mnist.config import ARMS, GUIDE_ARM, StudyConfig
from experiments.fashion_mnist.evaluate import choose, paired_row, sweep_rows

# The continued fine-tuning baselines: (arm, w = −1 → that arm's fine-tuned θ, unmerged).
BASELINES = {"finetune_real": "control", "selftrained": "ode"}
BASELINE_TITLES = {"finetune_real": "continued fine-tuning on real images (control θ)",
                   "selftrained": "continued fine-tuning on S (θs)"}


@dataclasses.dataclass(frozen=True)
class Point:
    """One evaluated model: θr merged with `arm`'s θ at w (arm 'base': θr; w = −1: the arm's θ as it is), sampled
    with the ODE arm's θs as guide at scale ω (`omega`) when `guided`."""
    name: str
    arm: str = "base"
    w: float = 0.0
    omega: float = 0.0
    guided: bool = False


def base_point() -> Point:
    return Point("base_w0")


def merge_point(arm: str, w: float) -> Point:
    return base_point() if w == 0 else Point(f"{arm}_w{w:g}", arm, float(w))


def guided_point(omega: float, neon_w: float | None = None) -> Point:
    """θr (neon_w None) or θneon at neon_w, with θs as guide at ω; ω = 0 samples the same images unguided."""
    if neon_w is None:
        return Point(f"guided_o{omega:g}", "base", 0.0, float(omega), True)
    return Point(f"neon_guided_w{neon_w:g}_o{omega:g}", GUIDE_ARM if neon_w != 0 else "base", float(neon_w),
                 float(omega), True)


def unconditional_points(cfg: StudyConfig) -> list[Point]:
    """Every model that does not depend on a choice: θr, the arms' grids, the baselines, the guided grid."""
    points = [base_point()]
    points += [merge_point(arm, w) for arm in ARMS for w in getattr(cfg.sweep, arm)]
    points += [merge_point(arm, -1.0) for arm in BASELINES.values()]
    points += [guided_point(omega) for omega in cfg.sweep.guided]
    return list(dict.fromkeys(points))      # w = 0 and a baseline already in an arm's grid are evaluated once


def neon_guided_points(cfg: StudyConfig, neon_w: float) -> list[Point]:
    return [guided_point(omega, neon_w) for omega in cfg.sweep.neon_guided]


# ---------------------------------------------------------------------------------------------------------
# The summary. `points`: {name: {"validation": metrics, "report": [metrics per report range], ...}}.

def arm_sweep(points: dict, arm: str, ws: list[float]) -> dict:
    base = points[base_point().name]
    rows = sweep_rows({float(w): points[merge_point(arm, w).name] for w in ws if w != 0}, base, "w")
    return {"rows": rows, "chosen": choose(rows, "w")}


def guided_sweep(points: dict, omegas: list[float], neon_w: float | None) -> dict:
    """ω = 0 is the unguided model (θr, or θneon at neon_w) unless the grid evaluated ω = 0 itself."""
    base = points[base_point().name]
    zero = base if neon_w is None else points[merge_point(GUIDE_ARM, neon_w).name]
    rows = sweep_rows({float(o): points[guided_point(o, neon_w).name] for o in omegas}, base, "omega", zero)
    return {"rows": rows, "chosen": choose(rows, "omega")}


def summarize(points: dict, cfg: StudyConfig) -> dict:
    """The arms' sweeps, the baselines, the guided sweeps (each chosen on the validation range) and the comparison
    of the chosen models on the report ranges."""
    base = points[base_point().name]
    arms = {arm: arm_sweep(points, arm, getattr(cfg.sweep, arm)) for arm in ARMS}
    neon_w = arms[GUIDE_ARM]["chosen"]["w"]
    baselines = {name: with_validation(points[merge_point(arm, -1.0).name], base) for name, arm in BASELINES.items()}
    guided = guided_sweep(points, cfg.sweep.guided, None)
    neon_guided = guided_sweep(points, cfg.sweep.neon_guided, neon_w)
    neon = points[merge_point(GUIDE_ARM, neon_w).name]
    chosen_ng = points[guided_point(neon_guided["chosen"]["omega"], neon_w).name] \
        if neon_guided["chosen"]["omega"] != 0 else neon
    neon_guided.update(neon_w=neon_w, vs_neon=paired_row(chosen_ng["report"], neon["report"]))
    return {"arms": arms, "baselines": baselines, "guidance": {"guided": guided, "neon_guided": neon_guided},
            "comparison": comparison(points, arms, baselines, guided, neon_guided),
            "guidance_cost": guidance_cost(points)}


def with_validation(point: dict, base: dict) -> dict:
    row = paired_row(point["report"], base["report"])
    row["validation"] = {m: point["validation"][m] for m in ("classifier_fd", "pixel_fd")}
    return row


def comparison(points: dict, arms: dict, baselines: dict, guided: dict, neon_guided: dict) -> list[dict]:
    """The headline table: θr, Neon at its chosen w, each baseline at its chosen setting, the other arms."""
    base = points[base_point().name]

    def entry(model: str, setting: str, name: str) -> dict:
        return {"model": model, "setting": setting, "point": name, **with_validation(points[name], base)}

    w, omega, omega_ng = arms[GUIDE_ARM]["chosen"]["w"], guided["chosen"]["omega"], neon_guided["chosen"]["omega"]
    rows = [entry("θr", "", base_point().name),
            entry("Neon (S from the ODE sampler)", f"w = {w:+g}", merge_point(GUIDE_ARM, w).name)]
    rows += [entry(BASELINE_TITLES[b], "w = -1", merge_point(arm, -1.0).name) for b, arm in BASELINES.items()]
    rows.append(entry("θr guided by θs", f"ω = {omega:+g}", guided_point(omega).name if omega else "base_w0"))
    ng = guided_point(omega_ng, w).name if omega_ng else merge_point(GUIDE_ARM, w).name
    rows.append(entry("Neon + θs guidance", f"w = {w:+g}, ω = {omega_ng:+g}", ng))
    for arm in ARMS:
        if arm != GUIDE_ARM:
            wa = arms[arm]["chosen"]["w"]
            rows.append(entry(f"{arm} arm merged", f"w = {wa:+g}", merge_point(arm, wa).name))
    return rows


def guidance_cost(points: dict) -> dict:
    """What θs guidance costs at sampling time, measured on this run: network evaluations per image (counted
    calls of θr's and the guide's networks) and sampling CPU seconds per image, guided (ω ≠ 0) vs unguided."""
    guided = [p for p in points.values() if p["guided"] and p["omega"] != 0]
    plain = [p for p in points.values() if not p["guided"]]

    def per_image(ps, field):
        return float(np.sum([p[field] for p in ps]) / np.sum([p["images"] for p in ps])) if ps else None

    nfe_g, nfe_p = per_image(guided, "network_calls"), per_image(plain, "network_calls")
    cpu_g, cpu_p = per_image(guided, "sampling_cpu_seconds"), per_image(plain, "sampling_cpu_seconds")
    return {"network_evaluations_per_image": {"guided": nfe_g, "unguided": nfe_p},
            "network_evaluations_ratio": nfe_g / nfe_p if nfe_g and nfe_p else None,
            "sampling_cpu_seconds_per_image": {"guided": cpu_g, "unguided": cpu_p},
            "sampling_cpu_ratio": cpu_g / cpu_p if cpu_g and cpu_p else None}
