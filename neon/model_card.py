"""MODEL_CARD.md beside θneon: what a merged model is and how to reproduce it, so it can be shared as it is.

Everything comes from the run's record (run.json: the config and each stage's result) and the sweep's points
(sweep.json); nothing is measured here.
"""
from __future__ import annotations

import json
import os

from neon.checkpoint import atomic_open
from neon.config import OBJECTIVE_LABELS, metric_digits, objective_key

PAPER = "Neon: Negative Extrapolation from Self-Training (arXiv 2510.03597)"


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if not isinstance(value, float):
        return str(value)
    return "0" if round(value, digits) == 0 else f"{value:.{digits}f}"   # never '-0.0000'


def _signed(value: float, digits: int) -> str:
    return "0" if round(value, digits) == 0 else f"{value:+.{digits}f}"


def _kv(mapping: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "defaults"


def _objective(doc: dict) -> str:
    """The result key the sweep minimised ('fid' for a run recorded before the choice existed)."""
    return objective_key(doc["config"]["sweep"].get("objective", "fid"))


def sweep_table(points: list[dict], cfg_key: str, key: str = "fid") -> list[str]:
    """One Markdown row per evaluated point, in the sweep's order: the objective `key` first, then every other
    metric some point recorded (FID, FD_DINOv2, KID), then IS."""
    keys = [key] + [k for k in OBJECTIVE_LABELS if k != key and any(p.get(k) is not None for p in points)]
    names = " | ".join(OBJECTIVE_LABELS[k] for k in keys)
    rows = [f"| w | {cfg_key} | setting | {names} | IS | images |", "|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for p in points:
        setting = _kv(p["setting"]) if p.get("setting") else "–"
        values = " | ".join(_number(p.get(k), metric_digits(k)) for k in keys)
        rows.append(f"| {p['w']:g} | {_number(p.get('cfg'), 3)} | {setting} | {values} "
                    f"| {_number(p.get('is_mean'), 3)} | {p.get('num_images', '–')} |")
    return rows


def _where(r: dict, cfg_key: str) -> str:
    """'w = 0.5, cfg = 1.5, steps=8' of a point."""
    parts = [f"w = {r['w']:g}"] + ([f"{cfg_key} = {r['cfg']:g}"] if r.get("cfg") is not None else [])
    return ", ".join(parts + ([_kv(r["setting"])] if r.get("setting") else []))


def recipe(doc: dict) -> list[str]:
    cfg, stages = doc["config"], doc["stages"]
    syn, ft, sw = cfg["synthetic"], cfg["finetune"], cfg["sweep"]
    count = (stages.get("sample") or {}).get("num_images", "?")   # absent when S was given, not drawn
    size = f"{syn['per_class']} per class, {count} in all" if syn.get("per_class") else f"{count} images"
    base = f"`{cfg['base']}`" if cfg["base"] else "the family's tiny random network (a smoke run)"
    return [f"- base model θr: {base} (family `{cfg['family']}`, load arguments {_kv(cfg['load_args'])})",
            f"- synthetic set S: {size}, labels {syn['labels']}, seeds from {syn['seed_offset']}, "
            f"sampler {_kv(syn['sampler'])}",
            f"- self-training θs: lr {ft['lr']:g}, batch {ft['batch']}, {ft['total_images']} images seen, warm-up "
            f"{ft['warmup_images']} images, EMA {ft['ema'] or 'none'}, optimizer {_kv(ft['optimizer'])} over the "
            f"family's defaults, loss {_kv(ft['loss_args'])}, seed {ft['seed']}: `{stages['sweep']['theta_s']}`",
            f"- sweep: {sw['num_images']} images per point{_seeds(stages['sweep'])}, sampler {_kv(sw['sampler'])}, "
            f"snapshots {sw['snapshot']}, reference statistics `{stages['sweep']['ref_stats']}`",
            *selection_line(stages["sweep"].get("selection"))]


def selection_line(s: dict | None) -> list[str]:
    """Which protocol chose the point, and what choosing it cost."""
    if not s:
        return []
    how = {"adaptive": "adaptive (screen every snapshot on few images, race the best points on the same seeds)",
           "official": "official (the paper's grid walk and a final evaluation per snapshot)",
           "grid": "grid (per guidance scale, increasing w, early stop)"}.get(s["protocol"], s["protocol"])
    open_ = "" if s.get("decided", True) else "; undecided at the largest count, chosen by the point estimate"
    return [f"- selection: {how}: {s['images']:,} images sampled over {s['evaluations']} measurements, "
            f"{s['seconds']:g} s{open_}"]


def _seeds(r: dict) -> str:
    return f" (seeds {r['seeds'][0]}–{r['seeds'][1]})" if r.get("seeds") else ""


def snapshot_table(doc: dict) -> list[str]:
    """One Markdown row per swept θs snapshot: its best sweep point and the final objective there."""
    swept, cfg_key = doc["stages"]["sweep"], doc["config"]["sweep"]["cfg_key"]
    entries = swept.get("snapshots") or []
    if not entries:
        return []
    key = _objective(doc)
    name, digits = OBJECTIVE_LABELS[key], metric_digits(key)
    rows = [f"| snapshot | images seen | best point | sweep {name} | final {name} |", "|---|---|---|---|---|"]
    for e in entries:
        mark = " (best)" if e["snapshot"] == swept["best"].get("snapshot") else ""
        rows.append(f"| {e['snapshot']}{mark} | {e.get('images', '–')} | {_where(e['best'], cfg_key)} "
                    f"| {_number(e['best'].get(key), digits)} | {_number((e.get('final') or {}).get(key), digits)} |")
    return ["## Snapshots", "", f"Best snapshot (lowest final {name}): {swept['best'].get('snapshot', '–')}", "",
            *rows, ""]


def _scores(r: dict) -> str:
    """'FID 12.3456 ± 0.0100, KID 0.001234 ± 0.000100': every recorded metric, ± its std over the seed ranges."""
    std = r.get("std") or {}
    parts = []
    for k in OBJECTIVE_LABELS:
        if r.get(k) is not None:
            spread = f" ± {_number(std[k], metric_digits(k))}" if std.get(k) is not None else ""
            parts.append(f"{OBJECTIVE_LABELS[k]} {_number(r[k], metric_digits(k))}{spread}")
    return ", ".join(parts)


def final_lines(doc: dict) -> list[str]:
    final, cfg_key = doc["stages"].get("final", {}), doc["config"]["sweep"]["cfg_key"]
    repeats = max(1, int(final.get("repeats") or 1))
    lines = [f"Mean ± std over {repeats} disjoint seed ranges (each range in the table below).", ""] \
        if repeats > 1 else []
    for name in ("base", "neon"):
        r = final.get(name)
        if r:
            score = f", IS {_number(r['is_mean'], 3)}" if r.get("is_mean") is not None else ""
            sampler = f", sampler {_kv(r['sampler'])}" if "sampler" in r else ""
            per = " per range" if repeats > 1 else ""
            lines.append(f"- {name}: {_scores(r)}{score} on {r['num_images']} images{per}{_seeds(r)} "
                         f"({_where(r, cfg_key)}{sampler})")
    return lines + delta_lines(final)


def delta_lines(final: dict) -> list[str]:
    """Per seed range: θr, θneon and their paired difference θneon − θr for every metric; then the mean ± std
    of each column when there are several ranges."""
    delta, base, neon = final.get("delta") or {}, final.get("base"), final.get("neon")
    keys = [k for k in OBJECTIVE_LABELS if k in delta]
    if not keys or not base:
        return []
    pairs = list(zip(base.get("ranges") or [base], neon.get("ranges") or [neon]))
    head = " | ".join(f"θr {OBJECTIVE_LABELS[k]} | θneon {OBJECTIVE_LABELS[k]} | Δ {OBJECTIVE_LABELS[k]}" for k in keys)
    rows = ["", "Per seed range (θr and θneon on the same seeds; Δ = θneon − θr, paired):", "",
            f"| seeds | {head} |", "|---|" + "---|" * (3 * len(keys))]
    for i, (b, n) in enumerate(pairs):
        cells = [f"{_number(b[k], metric_digits(k))} | {_number(n[k], metric_digits(k))} | "
                 f"{_signed(delta[k]['per_range'][i], metric_digits(k))}" for k in keys]
        rows.append(f"| {n['seeds'][0]}–{n['seeds'][1]} | " + " | ".join(cells) + " |")
    if len(pairs) > 1:
        def spread(r, k):
            return f"{_number(r[k], metric_digits(k))} ± {_number(r['std'][k], metric_digits(k))}"
        cells = [f"{spread(base, k)} | {spread(neon, k)} | {_signed(delta[k]['mean'], metric_digits(k))} ± "
                 f"{_number(delta[k]['std'], metric_digits(k))}" for k in keys]
        rows.append("| mean ± std | " + " | ".join(cells) + " |")
    return rows


BASELINE_WHAT = {"guidance_retune": "θr alone, its guidance re-tuned on the sweep's grid",
                 "continued_finetune": "θr fine-tuned with the same recipe (w = −1)",
                 "self_guidance": "θr guided by θs at sampling time (ω)",
                 "neon_guidance": "θneon guided by θs at sampling time (ω)"}


def baselines_table(doc: dict) -> list[str]:
    """θr, θneon and every baseline the run computed, one Markdown row each, on the same final seeds."""
    baselines = doc["stages"].get("baselines") or {}
    if not baselines:
        return []
    final, cfg_key = doc["stages"].get("final") or {}, doc["config"]["sweep"]["cfg_key"]
    rows = ["| model | what | chosen point | final FID | images | sampling cost |", "|---|---|---|---|---|---|"]
    for name, what, r in (("θr", "the base model at its own sampler", final.get("base")),
                          ("θneon", "the merge (1+w)·θr − w·θs", final.get("neon"))):
        if r:
            rows.append(f"| {name} | {what} | {_where(r, cfg_key)} | {_number(r.get('fid'))} | {r['num_images']} "
                        "| 1× |")
    for name, b in baselines.items():
        r, cost = b["final"], b.get("cost")
        where = _where(r, cfg_key).replace("w = ", "ω = ", 1) if "omega" in r else _where(r, cfg_key)
        spent = f"{cost['network_evaluations_vs_neon']:g}× ({cost['seconds']} s vs {cost['neon_seconds']} s)" \
            if cost else "1×"
        rows.append(f"| {name} | {BASELINE_WHAT.get(name, name)} | {where} | {_number(r.get('fid'))} "
                    f"| {r['num_images']} | {spent} |")
    return ["## Baselines", "", "The same final seeds for every row. Sampling cost: network evaluations per image "
            "relative to θneon's, and the measured seconds of the final evaluation. baselines_sweep.png draws each "
            "guide's sweep beside Neon's; baselines_final.png the final FIDs.", "", *rows, ""]


def _of(doc: dict) -> str:
    snapshot = doc["stages"]["sweep"]["best"].get("snapshot")
    return f" of θs = {snapshot}" if snapshot else ""


def _sweep_intro(doc: dict) -> list[str]:
    snapshot = doc["stages"]["sweep"]["best"].get("snapshot")
    return [f"The points of the best snapshot, {snapshot}:", ""] if snapshot else []


def card_text(doc: dict, points: list[dict], config_path: str, neon_path: str) -> str:
    cfg = doc["config"]
    smoke = " --smoke" if doc.get("smoke") else ""
    lines = [f"# {os.path.basename(neon_path)}: θneon of {cfg['base'] or 'the tiny smoke-test network'}", "",
             cfg.get("description") or "", "",
             f"Made with {PAPER}: θneon = (1+w)·θr − w·θs, where θs is θr briefly self-trained on its own samples.",
             "", "## Recipe", "", *recipe(doc), "", "## Sweep", "", *_sweep_intro(doc),
             *sweep_table(points, cfg["sweep"]["cfg_key"], _objective(doc)),
             "", f"Chosen: {_where(doc['stages']['sweep']['best'], cfg['sweep']['cfg_key'])}{_of(doc)}", "",
             *snapshot_table(doc), "## Final evaluation", "", *final_lines(doc), "",
             *baselines_table(doc), "## Reproduce", "",
             f"    neon run {config_path}{smoke}",
             ""]
    if smoke:
        lines += ["A smoke run: a tiny random network, and statistics of S stand in for the reference, so the "
                  "numbers mean nothing.", ""]
    versions = doc.get("versions", {})
    lines.append("Software: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform"))
    return "\n".join(lines) + "\n"


def write_model_card(out: str, doc: dict, config_path: str, neon_path: str) -> str:
    """Write `out/MODEL_CARD.md` (atomically) from the run record and `out/sweep.json`; returns its path."""
    sweep_path = os.path.join(out, "sweep.json")
    points = []
    if os.path.isfile(sweep_path):
        with open(sweep_path) as f:
            points = json.load(f).get("points", [])
    path = os.path.join(out, "MODEL_CARD.md")
    with atomic_open(path, "w") as f:
        f.write(card_text(doc, points, config_path, neon_path))
    return path
