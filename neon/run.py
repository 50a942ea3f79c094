"""`neon run CONFIG.yaml`: the whole method from one config — sample S → self-train θs → sweep w → final FID.

The sweep runs once per chosen self-training snapshot (`sweep.snapshot`), each followed by the final evaluation
of θneon at that snapshot's best point; θneon is saved from the snapshot with the best final metric, and θr is
evaluated with its own published sampler settings (`final.base_sampler`). Final seeds are apart from the sweep's.
Every stage writes into one run folder, keyed in `run.json` by the inputs it reads (neon/record.py): a rerun of
the same command resumes a killed run, and a rerun after an edit redoes exactly the stages whose inputs changed
(and those downstream), saying so in one line per stage. `run.json` records the config, package versions, and
each stage's result.
`--smoke` runs the same stages with the family's tiny random network and the config's `smoke:` overrides.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import torch

from neon import dist, hub, paths
from neon.adaptive_sweep import adaptive_select
from neon.baselines import run_baselines, summary_lines
from neon.checkpoint import load_state_dict
from neon.config import (
    METHOD_KIND,
    OBJECTIVE_LABELS,
    RunConfig,
    check_classes,
    check_seed_overlap,
    class_count,
    config_kind,
    final_seed_offset,
    format_metric,
    load_config,
    objective_key,
    seed_range,
)
from neon.errors import NeonError
from neon.evaluate import FIDMetric, stand_in_stats
from neon.family import Bundle, Family, get_family
from neon.lora import neon_lora, truncate
from neon.lora_train import read_factors
from neon.merge import merge_state_dicts
from neon.model_card import write_model_card
from neon.pipeline_folder import is_pipeline_folder, write_folder
from neon.record import RECORD, RunRecord, Stage, Upstream, flatten
from neon.registry import Registry
from neon.repeats import paired_difference, per_range
from neon.sampling import draw_labels, exclusive, plan_seeds, sample_to_npz
from neon.score import Point, Scorer
from neon.selftrain import CACHE_FILE, check_finetune_config, encode_examples, finetune, lora_path
from neon.snapshot_sweep import (
    best_entry,
    final_result,
    select_snapshots,
    selection_cost,
    snapshot_name,
    snapshot_points,
    sweep_snapshot,
    write_summary,
)
from neon.sweep import metrics_label, point_label, state_dict_copy

LORA_DIR = "neon_lora"   # θneon as a LoRA on θr, written when self-training trained adapters (finetune.lora)


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "numpy", "torch-fidelity", "timm", "diffusers", "neon-selftrain"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    out["world_size"] = dist.world_size()
    return out


def load_base(family: Family, cfg: RunConfig, smoke: bool, device) -> tuple[Bundle, str | None]:
    """θr and its file: the configured checkpoint, or with --smoke the family's tiny network (no file)."""
    if smoke and not cfg.base:
        return family.tiny(device, seed=0, **cfg.load_args), None
    if not cfg.base:
        raise NeonError("base: no checkpoint configured (set base, or use --smoke)")
    path = cfg.base
    if not (os.path.isfile(path) or is_pipeline_folder(path)):
        # a remote name the family fetches (a Hub repo id): its local copy, already in the cache after
        # check_run_inputs; the card still names the base as the config does
        path = None if os.path.exists(cfg.base) else family.resolve_remote(cfg.base, cfg.load_args)
        if path is None:
            raise NeonError(f"base: checkpoint {cfg.base} not found (bash download_models.sh fetches the released "
                            "ones)")
    return family.load(path, device, **cfg.load_args), path


def run_metric(cfg: RunConfig, out: str, device, synthetic: str, texts: list[str] | None = None):
    """The sweep/final metric. With no reference statistics (smoke runs only), statistics of the synthetic set
    itself stand in, so the wiring is exercised; such numbers mean nothing and are labelled so in run.json."""
    ref = cfg.ref_stats
    if ref is None:
        ref = stand_in_stats(cfg.metrics.detector, cfg.metrics.weights, synthetic,
                             os.path.join(out, "smoke_ref_stats.npz"), device, cfg.synthetic.batch)
    elif not os.path.isfile(ref):
        raise NeonError(f"ref_stats: {ref} not found (bash download_models.sh fetches the reference statistics)")
    metric = FIDMetric.from_config(cfg.metrics, ref, device, synthetic if cfg.ref_stats is None else None, out,
                                   cfg.synthetic.batch, texts)
    return metric, ref


def check_run_inputs(cfg: RunConfig, smoke: bool, out: str) -> None:
    """What a run needs from the start, checked before its folder exists: a refused run leaves nothing."""
    paths.output_folder(out)
    ours = {RECORD, RECORD + ".lock"}   # the lock a killed run leaves behind is taken over, not foreign
    if os.path.isdir(out) and set(os.listdir(out)) - ours and not os.path.isfile(os.path.join(out, RECORD)):
        raise NeonError(f"--out {out}: a folder with files but no run.json (not a run folder of neon run); "
                        "choose a new or empty folder")
    if not cfg.base and not smoke:
        raise NeonError("base: no checkpoint configured (set base, or use --smoke)")
    base = cfg.base
    if base is not None and not os.path.exists(base) and \
            get_family(cfg.family).resolve_remote(base, cfg.load_args) is not None:
        base = None   # a remote name (a Hub repo id) the family has fetched, or found in its cache, just now
    dinov2, m = cfg.metrics.fd_dinov2, cfg.metrics
    detector = None if m.weights in (None, "fid-helper") else m.weights
    for field, path, what in (("base", base, "checkpoint"), ("metrics.weights", detector, "detector weights file"),
                              ("ref_stats", cfg.ref_stats, "statistics file"),
                              ("metrics.real_features", cfg.metrics.real_features, "features file"),
                              ("metrics.fd_dinov2.weights", dinov2 and dinov2.weights, "weights file"),
                              ("metrics.fd_dinov2.ref_stats", dinov2 and dinov2.ref_stats, "statistics file")):
        if path is not None and os.path.isdir(path) and not (field == "base" and is_pipeline_folder(path)):
            raise NeonError(f"{field}: {path} is a folder, expected a {what}")
        if path is not None and not (os.path.isfile(path) or field == "base" and is_pipeline_folder(path)):
            raise NeonError(f"{field}: {what} {path} not found (bash download_models.sh fetches the released ones)")
    check_finetune_config(cfg.finetune)
    if m.weights is None and m.detector == "inception-v3-compat":
        # torch-fidelity downloads its weights when the metric is built, after S and self-training: fetch them now,
        # once every file the run names is known to be there
        from neon.metrics.features import fetch_compat_weights
        fetch_compat_weights()


def run(config: str, out: str, smoke: bool = False) -> dict:
    cfg = load_config(paths.input_file(config, "config file"), smoke=smoke)
    family = get_family(cfg.family)
    device = dist.init()
    check_run_inputs(cfg, smoke, out)
    with paths.made_folder(out), exclusive(os.path.join(out, RECORD)):   # one neon run per folder at a time
        return _run(family, cfg, out, smoke, device, config)


def stages(cfg: RunConfig, rec: RunRecord, base_path: str | None, smoke: bool, neon_name: str) -> list[Stage]:
    """The run's stages as the record keys them: what each reads (config fields, file bytes, the stages
    upstream), where its result lives in run.json and which files of the run folder it writes."""
    c, m = cfg.to_dict(), cfg.metrics
    files = {"ref_stats": cfg.ref_stats, "metrics.weights": m.weights, "metrics.real_features": m.real_features,
             "metrics.clip": m.clip,
             "metrics.fd_dinov2.weights": m.fd_dinov2 and m.fd_dinov2.weights,
             "metrics.fd_dinov2.ref_stats": m.fd_dinov2 and m.fd_dinov2.ref_stats}
    read = {f"{field}.sha256": rec.digest(path) for field, path in files.items() if path}
    point_files = ("sweep/snapshot-??????????.json", "sweep/snapshot-??????????.png",
                   "sweep/snapshot-??????????_*.png", "smoke_*.npz")
    # A load argument naming a file (a prompt set, a user's LoRA, a VAE) keys S by its bytes, as the base does.
    load_files = {f"load_args.{k}.sha256": rec.digest(v) for k, v in c["load_args"].items()
                  if isinstance(v, str) and os.path.exists(v)}
    out = [Stage("sample", {"family": cfg.family, "smoke": smoke, "base": cfg.base,
                            "base.sha256": rec.digest(base_path), **flatten(c["load_args"], "load_args"), **load_files,
                            **flatten(c["synthetic"], "synthetic")},
                 ("sample",), ("synthetic.npz", "synthetic.npz.*")),
           Stage("finetune", {**flatten(c["finetune"], "finetune"), "after": Upstream("sample")},
                 ("finetune",), ("finetune",)),
           Stage("sweep", {**flatten(c["sweep"], "sweep"), **flatten(c["metrics"], "metrics"),
                           "ref_stats": cfg.ref_stats, **read, "after": Upstream("finetune")},
                 ("sweep",), point_files),
           Stage("select", {**flatten(c["final"], "final"), "after": Upstream("sweep")},
                 ("sweep",), ("sweep/*-final.json", "sweep.json", "sweep.png", neon_name, LORA_DIR)),
           Stage("final", {**flatten(c["final"], "final"), "after": Upstream("select")}, ("final",))]
    for name in cfg.baselines.enabled():
        inputs = flatten(c["baselines"][name], f"baselines.{name}")
        if name == "continued_finetune":
            real = cfg.baselines.continued_finetune.real_data
            inputs.update({**flatten(c["finetune"], "finetune"), "real_data.sha256": rec.digest(real)})
        out.append(Stage(f"baselines.{name}", {**inputs, "after": Upstream("final")}, ("baselines", name),
                         (f"baselines/{name}.json", f"baselines/{name}-sweep.json", f"baselines/{name}",
                          "baselines_*.png")))
    return out


def _run(family: Family, cfg: RunConfig, out: str, smoke: bool, device, config: str) -> dict:
    bundle, base_path = load_base(family, cfg, smoke, device)
    check_seed_overlap(cfg, bundle.num_classes)   # again with the model's class count, before anything is written
    for section in ("synthetic", "sweep", "final"):
        check_classes(getattr(cfg, section).classes, f"{section}.classes", bundle.num_classes)
    suffix = "" if family.SAVES_FOLDERS else os.path.splitext(base_path)[1] if base_path else ".pth"
    neon_path = os.path.join(out, "neon" + suffix)
    rec = RunRecord(out, cfg.to_dict(), {"smoke": smoke, "versions": _versions()})
    for line in rec.plan(stages(cfg, rec, base_path, smoke, os.path.basename(neon_path))):
        if dist.is_main():
            print(line)
    step = Steps(4 + len(cfg.baselines.enabled()))

    # 1. The synthetic set S, drawn from θr with its usual (mode-seeking) sampler.
    synthetic = os.path.join(out, "synthetic.npz")
    if not rec.stage("sample"):
        s = cfg.synthetic
        t0 = time.time()
        seeds = plan_seeds(s.num_images, s.per_class, class_count(s, bundle.num_classes), s.seed_offset)
        step(1, f"sample: S, {len(seeds):,} images from θr")
        if not os.path.isfile(synthetic):   # else: a killed run had joined S but not recorded it yet
            labels = draw_labels(family, bundle, seeds, s.labels, classes=s.classes)
            sample_to_npz(family, bundle, seeds, labels, synthetic, s.batch, s.sampler)
        rec.record("sample", {"path": synthetic, "num_images": len(seeds), "seconds": round(time.time() - t0, 1)})

    # 2. Self-training: θs.
    ft_dir = os.path.join(out, "finetune")
    if not (rec.stage("finetune") or {}).get("snapshots"):
        t0 = time.time()
        step(2, f"self-training: θr fine-tuned on S for {cfg.finetune.total_images:,} images")
        examples = encode_examples(family, bundle, synthetic, os.path.join(ft_dir, CACHE_FILE), cfg.synthetic.batch,
                                   cfg.finetune.cache_dtype)
        snapshots = finetune(family, bundle, examples, cfg.finetune, ft_dir)   # trains a copy: bundle keeps θr
        rec.record("finetune", {"snapshots": snapshots, "seconds": round(time.time() - t0, 1)})
    snapshots = select_snapshots(rec.stage("finetune")["snapshots"], cfg.sweep.snapshot)

    # 3. The sweep over w (× guidance scale), for every chosen θs snapshot, each with its final evaluation.
    metric, ref = run_metric(cfg, out, device, synthetic, family.label_texts(bundle))
    theta_r = state_dict_copy(bundle.net)
    scorer = Scorer(family, bundle, metric, theta_r)   # the one way weights enter bundle.net (neon/score.py)
    offset = final_seed_offset(cfg, bundle.num_classes)
    if not (rec.stage("sweep") or {}).get("best"):
        t0 = time.time()
        step(3, f"selection ({cfg.sweep.search}): w{' × ' + cfg.sweep.cfg_key if cfg.sweep.cfg else ''} over "
                f"{len(snapshots)} θs snapshot{'s' if len(snapshots) > 1 else ''}, then θneon's final evaluation")
        if cfg.sweep.search == "adaptive":   # one walk over every snapshot, a final for the chosen point only
            entries = adaptive_select(scorer, snapshots, cfg, out, offset)
        else:                                # the official protocol: each snapshot swept, then its final
            entries = [sweep_snapshot(scorer, path, cfg, out, offset) for path in snapshots]
        key = objective_key(cfg.sweep.objective)
        doc = write_summary(out, entries, cfg.sweep.cfg_key, key)
        first, last = seed_range(cfg.sweep.num_images, cfg.sweep.per_class, cfg.sweep.seed_offset,
                                 class_count(cfg.sweep, bundle.num_classes))
        rec.record("sweep", {"best": doc["best"], "theta_s": best_entry(entries, key)["path"], "ref_stats": ref,
                             "objective": cfg.sweep.objective,
                             "snapshots": doc["snapshots"], "seeds": [first, last],
                             "points": sum(len(snapshot_points(out, e)) for e in entries),
                             "selection": selection_cost(entries, out, cfg),
                             "seconds": round(time.time() - t0, 1)})
    swept = rec.stage("sweep")

    # 4. θneon at the best snapshot's point, saved in the family's container; θr's final evaluation with its own
    # sampler settings, on the same final seeds as θneon's (evaluated with the snapshot above).
    # Rank 0 alone decides and writes, then every rank meets: a rank that looked for the file after rank 0 wrote
    # it would otherwise skip a barrier the others wait at.
    if dist.is_main() and not os.path.exists(neon_path):  # a file, or a folder for pipeline-folder families
        theta_s = load_state_dict(swept["theta_s"], bool(cfg.load_args.get("trust_architecture")))
        with scorer.holding(merge_state_dicts(theta_r, theta_s, swept["best"]["w"])):
            family.save(bundle, neon_path)
    if dist.is_main() and (cfg.finetune.lora or bundle.lora) and not os.path.exists(os.path.join(out, LORA_DIR)):
        save_neon_lora(family, bundle, swept, os.path.join(out, LORA_DIR), (cfg.finetune.lora or {}).get("out_rank"))
    dist.barrier()
    if not rec.stage("final"):
        step(4, "final evaluation: θr on the final seeds" if cfg.final.evaluate_base else "final evaluation")
        rec.record("final", final_evaluation(scorer, cfg, swept, out, offset))
    run_baselines(scorer, cfg, rec, out, offset, step)   # 5. what Neon must beat, if asked
    if dist.is_main():
        write_model_card(out, rec.doc, config, neon_path)
        summarize(rec.doc, cfg)
    return rec.doc


def save_neon_lora(family: Family, bundle, swept: dict, folder: str, out_rank: int | None = None) -> None:
    """θneon as one LoRA, in the layouts the family's users load: −w·ΔW_s on θr for a fresh LoRA, or
    (1+w)·ΔW_r − w·ΔW_s on the base when θr is base + ΔW_r (exact, by rank concatenation: neon.lora.neon_lora).
    out_rank: cut each adapter to this rank by SVD instead, its relative error (Frobenius) said and written to
    `folder`/truncation.json."""
    loras = neon_lora(bundle.lora, read_factors(lora_path(swept["theta_s"])), swept["best"]["w"])
    errors = {}
    if out_rank is not None:
        for name in loras:
            loras[name], errors[name] = truncate(loras[name], out_rank)
        print(f"θneon's LoRA cut to rank {out_rank}: relative error of ΔW at most {max(errors.values()):.3g} "
              f"(mean {sum(errors.values()) / len(errors):.3g}; {LORA_DIR}/truncation.json)")

    def fill(tmp: str) -> None:
        family.save_lora(bundle, loras, tmp)
        if errors:
            with open(os.path.join(tmp, "truncation.json"), "w") as f:
                json.dump({"rank": out_rank, "relative_error": errors}, f, indent=1)
    write_folder(folder, fill)


class Steps:
    """step(k, what): prints 'stage k of n: what' (main rank) as a stage that is not reused begins."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, k: int, what: str) -> None:
        if dist.is_main():
            print(f"stage {k} of {self.n}: {what}", flush=True)


def base_sampler_args(cfg: RunConfig, setting: dict) -> dict:
    """θr's sampler arguments: its published settings (final.base_sampler, else final.sampler as written), with
    the setting of a sweep grid (e.g. IMM's step count) applied."""
    base = cfg.final.base_sampler if cfg.final.base_sampler is not None else cfg.final.sampler
    return {**base, **setting}


def final_evaluation(scorer: Scorer, cfg: RunConfig, swept: dict, out: str, offset: int) -> dict:
    """θr at its own sampler settings, beside θneon's final evaluation at the best
    snapshot's point (made during the sweep stage), and 'delta': θneon − θr per final seed range, mean ± std
    (neon.repeats.paired_difference). With a sweep grid, each setting under 'per_setting'."""
    entry = next(e for e in swept["snapshots"] if e["snapshot"] == swept["best"]["snapshot"])
    with open(os.path.join(out, "sweep", f"{snapshot_name(entry['snapshot'])}-final.json")) as f:
        neon = json.load(f).get("final_per_setting") or [entry["final"]]
    pairs = []
    for result in neon:
        pair = {"setting": result["setting"], "neon": result}
        if cfg.final.evaluate_base:
            args = base_sampler_args(cfg, result["setting"])
            at = {"w": 0.0, "cfg": args.get(cfg.sweep.cfg_key), "setting": result["setting"]}
            pair["base"] = {**at, **final_result(scorer, Point(at, None, args), cfg, offset, "final base")}
            pair["delta"] = paired_difference(result, pair["base"])
        pairs.append(pair)
    overall = next(p for p in pairs if p["setting"] == entry["final"]["setting"])
    doc = {"snapshot": entry["snapshot"], "base": overall.get("base"), "neon": overall["neon"],
           "delta": overall.get("delta"), "repeats": cfg.final.repeats}
    return {**doc, "per_setting": pairs} if len(pairs) > 1 else doc


def summarize(doc: dict, cfg: RunConfig) -> None:
    swept, final = doc["stages"].get("sweep", {}), doc["stages"].get("final", {})
    key = objective_key(cfg.sweep.objective)
    for e in swept.get("snapshots", []):
        b = e["best"]
        final_txt = f", final {metrics_label(e['final'], key)}" if "final" in e else ""
        print(f"{e['snapshot']}: best {point_label(b['w'], b['cfg'], b.get('setting', {}), cfg.sweep.cfg_key)} "
              f"sweep {metrics_label(b, key)} ({b.get('num_images', cfg.sweep.num_images)} images){final_txt}")
    if swept.get("selection"):
        s = swept["selection"]
        print(f"selection: {s['protocol']}, {s['images']:,} images over {s['evaluations']} measurements, "
              f"{s['seconds']:g} s" + ("" if s["decided"] else " (still open at the largest count: chose the "
                                                              "lowest estimate)"))
    if final.get("snapshot"):
        by = "chosen by the adaptive race" if (swept.get("selection") or {}).get("protocol") == "adaptive" \
            else f"by the final {cfg.sweep.objective}"
        print(f"best snapshot: {final['snapshot']} ({by})")
    for pair in final.get("per_setting") or [final]:
        for name in ("base", "neon"):
            if pair.get(name):
                r = pair[name]
                where = point_label(r["w"], r["cfg"], r.get("setting", {}), cfg.sweep.cfg_key)
                ranges = per_range(r)
                seeds = f", seeds {r['seeds'][0]}–{r['seeds'][1]}" if r.get("seeds") else ""
                count = f"{r['num_images']} images" + (f" per range, mean ± std of {len(ranges)} ranges"
                                                       if len(ranges) > 1 else "")
                print(f"{name:>5}: {where}  {metrics_label(r, key)} on {count}{seeds}")
                if len(ranges) > 1:
                    print("       per range: " + "; ".join(f"{x['seeds'][0]}–{x['seeds'][1]} {OBJECTIVE_LABELS[key]} "
                                                          f"{format_metric(key, x[key])}" for x in ranges))
        for k, d in (pair.get("delta") or {}).items():
            if k in OBJECTIVE_LABELS:
                std = "" if d["std"] is None else f" ± {format_metric(k, d['std'])}"
                print(f"    Δ θneon − θr {OBJECTIVE_LABELS[k]} {format_metric(k, d['mean'], sign=True)}{std} "
                      "(paired by seed range: " + ", ".join(format_metric(k, v, sign=True) for v in d["per_range"])
                      + ")")
    for line in summary_lines(doc, cfg.sweep.cfg_key):
        print(f"baseline {line}")
    if swept.get("best") and swept["best"]["w"] == 0:
        print("θneon = θr: w = 0 won the sweep, so Neon changed nothing" + (
            " (expected in a smoke run: S's own statistics stand in for the reference, and θr drew S, so θr "
            "scores best)" if doc.get("smoke") else ""))
    if doc.get("smoke"):
        print("(smoke run: statistics of S stand in for the reference; the numbers mean nothing)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file from configs/")
    p.add_argument("--out", help="run folder (default runs/<config name>[-smoke])")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random network and tiny counts from the config's smoke section (CPU, ~half a minute)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="after the run, upload θneon's folder (a pipeline) with MODEL_CARD.md as its README.md to "
                        "this Hugging Face Hub model repo (created if missing; needs `hf auth login` or $HF_TOKEN)")


# Config kinds other than the method's (experiments such as experiments/fashion_mnist) register a runner,
# `runner(config_path, out, smoke=...)`, under their kind in the `neon.runs` entry-point group.
RUNNERS = Registry("neon.runs", "config kind")


def run_main(args) -> None:
    paths.input_file(args.config, "config file")
    name = os.path.splitext(os.path.basename(args.config))[0] + ("-smoke" if args.smoke else "")
    out = args.out or os.path.join("runs", name)
    kind = config_kind(args.config)
    repo = getattr(args, "push_to_hub", None)
    if repo is not None:   # what can be checked offline, before anything runs
        if kind != METHOD_KIND:
            raise NeonError(f"--push-to-hub: a config of kind {kind!r} has no θneon to push")
        hub.check_repo_id(repo)
        hub.check_base_is_folder(load_config(args.config, smoke=args.smoke).base)
    if kind == METHOD_KIND:
        run(args.config, out, smoke=args.smoke)
        if repo is not None and dist.is_main():
            print(f"pushed {hub.push_run(out, repo)} to the Hub repo {repo}")
    else:  # an experiment's own stages: a refusal still leaves no empty run folder
        with paths.made_folder(out):
            RUNNERS.get(kind)(args.config, out, smoke=args.smoke)
