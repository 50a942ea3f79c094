"""What the study evaluates, where each choice is made, and what it reports.

Models (`Point`s), all sampled with the same deterministic sampler on the same seeds and labels:
  - θr itself;
  - each arm's merge θ = (1+w)·θr − w·θ_arm over its w grid (Neon is the ODE arm);
  - the continued fine-tuning baselines, each arm's fine-tuned θ as it is (w = −1): θ fine-tuned on real images
    (control) and θs itself (ODE arm), at the same compute as self-training;
  - θr sampled with the ODE arm's θs as guide, (1+ω)·D_θr − ω·D_θs at every denoiser evaluation (SIMS /
    autoguidance form, neon/guidance.py), over an ω grid;
  - Neon + guidance: θneon at the ODE arm's chosen w, sampled with the same guide, over an ω grid.
Every grid point is measured on the validation range, where each w and ω is chosen (lowest classifier FD); θr and
the chosen models are then measured on the report ranges: mean ± std and paired Δ to θr, range by range. The
grid curves are therefore validation-range curves (one range, no error bars).

There is no "θr with classifier-free guidance re-tuned" baseline: the model is trained without label dropout, so
it has no unconditional branch to guide with.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.fashion_mnist.config import ARMS, GUIDE_ARM, StudyConfig
from experiments.fashion_mnist.evaluate import choose, improvement, paired_row, sweep_rows

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
# Choices (validation range) and the summary (report ranges). `validation`: {point name: metrics};
# `report`: {point name: [metrics per report range]}.

def arm_sweep(validation: dict, arm: str, ws: list[float]) -> dict:
    base = validation[base_point().name]
    rows = sweep_rows({float(w): validation[merge_point(arm, w).name] for w in ws if w != 0}, base, "w")
    chosen = choose(rows, "w")
    return {"rows": rows, "chosen": chosen, "point": merge_point(arm, chosen)}


def guided_sweep(validation: dict, omegas: list[float], neon_w: float | None) -> dict:
    """ω = 0 is the unguided model (θr, or θneon at neon_w) unless the grid evaluated ω = 0 itself."""
    base = validation[base_point().name]
    unguided = base_point() if neon_w is None else merge_point(GUIDE_ARM, neon_w)
    rows = sweep_rows({float(o): validation[guided_point(o, neon_w).name] for o in omegas}, base, "omega",
                      validation[unguided.name])
    chosen = choose(rows, "omega")
    point = guided_point(chosen, neon_w) if chosen in omegas else unguided
    return {"rows": rows, "chosen": chosen, "point": point}


def neon_w(validation: dict, cfg: StudyConfig) -> float:
    """The ODE arm's w chosen on the validation range: where the guided Neon grid is centred."""
    return arm_sweep(validation, GUIDE_ARM, cfg.sweep.ode)["chosen"]


def all_sweeps(validation: dict, cfg: StudyConfig) -> dict[str, dict]:
    """Every grid searched on the validation range: the arms (x = w), `guided` and `neon_guided` (x = ω)."""
    out = {arm: arm_sweep(validation, arm, getattr(cfg.sweep, arm)) for arm in ARMS}
    out["guided"] = guided_sweep(validation, cfg.sweep.guided, None)
    out["neon_guided"] = guided_sweep(validation, cfg.sweep.neon_guided, out[GUIDE_ARM]["chosen"])
    return out


def comparison_points(sweeps: dict) -> list[tuple[str, str, Point]]:
    """The headline table's models, each at its chosen setting: (model, setting, point)."""
    w = sweeps[GUIDE_ARM]["chosen"]
    rows = [("θr", "", base_point()), ("Neon (S from the ODE sampler)", f"w = {w:+g}", sweeps[GUIDE_ARM]["point"])]
    rows += [(BASELINE_TITLES[b], "w = -1", merge_point(arm, -1.0)) for b, arm in BASELINES.items()]
    rows.append(("θr guided by θs", f"ω = {sweeps['guided']['chosen']:+g}", sweeps["guided"]["point"]))
    rows.append(("Neon + θs guidance", f"w = {w:+g}, ω = {sweeps['neon_guided']['chosen']:+g}",
                 sweeps["neon_guided"]["point"]))
    rows += [(f"{arm} arm merged", f"w = {sweeps[arm]['chosen']:+g}", sweeps[arm]["point"])
             for arm in ARMS if arm != GUIDE_ARM]
    return rows


def report_points(validation: dict, cfg: StudyConfig) -> list[Point]:
    """What the report ranges measure: θr and every model of the comparison, once each."""
    return list(dict.fromkeys(p for _, _, p in comparison_points(all_sweeps(validation, cfg))))


def summarize(validation: dict, report: dict, cfg: StudyConfig) -> dict:
    """The grids on the validation range with their choices, and the chosen models on the report ranges (paired
    with θr range by range); Neon + guidance is also paired with Neon alone."""
    sweeps = all_sweeps(validation, cfg)
    base = report[base_point().name]
    comparison = [{"model": model, "setting": setting, "point": p.name, "validation": validation[p.name],
                   **paired_row(report[p.name], base)} for model, setting, p in comparison_points(sweeps)]
    out = {}
    for name, sw in sweeps.items():
        row = paired_row(report[sw["point"].name], base)
        out[name] = {"rows": sw["rows"], "chosen": {"w" if name in ARMS else "omega": sw["chosen"],
                                                    "point": sw["point"].name, **row, **improvement(row)}}
    neon = sweeps[GUIDE_ARM]["point"].name
    out["neon_guided"].update(neon_w=sweeps[GUIDE_ARM]["chosen"],
                              vs_neon=paired_row(report[sweeps["neon_guided"]["point"].name], report[neon]))
    baselines = {b: {"point": merge_point(arm, -1.0).name, "validation": validation[merge_point(arm, -1.0).name],
                     **paired_row(report[merge_point(arm, -1.0).name], base)} for b, arm in BASELINES.items()}
    return {"arms": {arm: out[arm] for arm in ARMS}, "baselines": baselines,
            "guidance": {"guided": out["guided"], "neon_guided": out["neon_guided"]}, "comparison": comparison}


def guidance_cost(records: list[dict]) -> dict:
    """What θs guidance costs at sampling time, measured on this run: network evaluations per image (counted
    calls of θr's and the guide's networks) and sampling CPU seconds per image, guided (ω ≠ 0) vs unguided.
    records: one per sampled point and range set, with "guided", "omega", "images", "network_calls",
    "sampling_cpu_seconds"."""
    guided = [r for r in records if r["guided"] and r["omega"] != 0]
    plain = [r for r in records if not r["guided"]]

    def per_image(rs, field):
        return float(np.sum([r[field] for r in rs]) / np.sum([r["images"] for r in rs])) if rs else None

    nfe_g, nfe_p = per_image(guided, "network_calls"), per_image(plain, "network_calls")
    cpu_g, cpu_p = per_image(guided, "sampling_cpu_seconds"), per_image(plain, "sampling_cpu_seconds")
    return {"network_evaluations_per_image": {"guided": nfe_g, "unguided": nfe_p},
            "network_evaluations_ratio": nfe_g / nfe_p if nfe_g and nfe_p else None,
            "sampling_cpu_seconds_per_image": {"guided": cpu_g, "unguided": cpu_p},
            "sampling_cpu_ratio": cpu_g / cpu_p if cpu_g and cpu_p else None}
