"""The stages of the Fashion-MNIST study, each cached in the run folder.

Every stage writes into its own sub-folder of the run folder and is identified by a key: a hash of its settings
and of the keys of the stages it depends on. A rerun skips every stage whose key is unchanged and finished; a
stage whose settings (or whose inputs) changed is redone from scratch, and so is everything downstream of it.
A training stage killed half-way resumes from the core loop's own `train_state.pt`.

    data ─► classifier (+ reference statistics of the test split)
      └───► base θr (trained from scratch) ─► S_ode, S_diverse ─► θs per arm ─► paired evaluation ─► report
      └───► real subset (control) ────────────────────────────────┘     (validation range: w, ω chosen;
                                                                         report ranges: mean ± std, paired Δ)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

from experiments.fashion_mnist.classifier import load_classifier, predict, save_classifier, train_classifier
from experiments.fashion_mnist.config import ARMS, GUIDE_ARM, StudyConfig, load_study
from experiments.fashion_mnist.datasets import load_fashion_mnist
from experiments.fashion_mnist.evaluate import image_set_metrics, reference_statistics
from experiments.fashion_mnist.protocol import (
    Point,
    guidance_cost,
    neon_guided_points,
    neon_w,
    report_points,
    unconditional_points,
)
from experiments.fashion_mnist.report import write_report
from neon.checkpoint import atomic_open, load_state_dict
from neon.errors import NeonError
from neon.family import Bundle, Family, get_family
from neon.guidance import with_guide
from neon.images import NpzImages, save_images_npz
from neon.merge import merge_state_dicts
from neon.sampling import draw_labels, generate, plan_seeds, sample_to_npz
from neon.selftrain import encode_examples, finetune, last_log_entry

KEY_FILE = "stage_key"


def log(msg: str) -> None:
    print(msg, flush=True)


class StudyRecord:
    """run.json: the config, versions, and each stage's key and result (atomically rewritten)."""

    def __init__(self, out: str, config: dict, smoke: bool):
        self.out = out
        self.path = os.path.join(out, "run.json")
        stages = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                stages = json.load(f).get("stages", {})
        self.doc = {"config": config, "smoke": smoke, "versions": versions(), "stages": stages}

    @staticmethod
    def key(settings, *upstream: str) -> str:
        blob = json.dumps([settings, list(upstream)], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def begin(self, name: str, key: str) -> tuple[str, dict | None]:
        """(the stage's folder, its recorded result if it finished with this key). A folder made with another
        key is removed, so a stage never mixes outputs of two settings."""
        folder = os.path.join(self.out, name)
        key_file = os.path.join(folder, KEY_FILE)
        stored = None
        if os.path.isfile(key_file):
            with open(key_file) as f:
                stored = f.read().strip()
        if os.path.isdir(folder) and stored != key:
            if stored is None and os.listdir(folder):
                raise NeonError(f"{folder} exists and was not written by this study: choose another --out")
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        if stored != key:
            with atomic_open(key_file, "w") as f:
                f.write(key)
        done = self.doc["stages"].get(name)
        return folder, (done if done and done.get("key") == key else None)

    def record(self, name: str, key: str, result: dict) -> dict:
        self.doc["stages"][name] = {"key": key, **result}
        with atomic_open(self.path, "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        return self.doc["stages"][name]


def versions() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


@contextlib.contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Stages.

def stage_data(cfg: StudyConfig, rec: StudyRecord) -> tuple[dict[str, str], str]:
    """The train and test splits at 16×16 as ADM-style .npz (uint8 NHWC + labels)."""
    key = rec.key({"root": cfg.data_root, "preprocess": "pad 28->32, 2x2 mean, uint8"})
    folder, done = rec.begin("data", key)
    paths = {split: os.path.join(folder, f"{split}.npz") for split in ("train", "test")}
    if not done:
        t0 = time.time()
        counts = {}
        for split, path in paths.items():
            images, labels = load_fashion_mnist(split, cfg.data_root)
            save_images_npz(path, images, labels)
            counts[split] = len(images)
        rec.record("data", key, {"paths": paths, "images": counts, "seconds": round(time.time() - t0, 1)})
        log(f"data: {counts['train']} train / {counts['test']} test images at 16×16 ({time.time() - t0:.0f} s)")
    return paths, key


def read_all(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    s = NpzImages(path)
    return s.read(0, len(s)), s.labels


def stage_classifier(cfg: StudyConfig, rec: StudyRecord, data: dict, data_key: str):
    """The feature CNN and the reference statistics of the test split in its feature space and in pixels."""
    c = cfg.classifier
    key = rec.key(dataclasses.asdict(c), data_key)
    folder, done = rec.begin("classifier", key)
    net_path, ref_path = os.path.join(folder, "classifier.pt"), os.path.join(folder, "reference_stats.npz")
    if not done:
        t0 = time.time()
        images, labels = read_all(data["train"])
        if c.max_images:
            images, labels = images[:c.max_images], labels[:c.max_images]
        net = train_classifier(images, labels, c.width, c.epochs, c.batch, c.lr, c.seed, log=log)
        test_images, test_labels = read_all(data["test"])
        _, probs = predict(net, test_images)
        accuracy = float((probs.argmax(1) == test_labels).mean())
        save_classifier(net, net_path, test_accuracy=accuracy)
        with atomic_open(ref_path, "wb") as f:
            np.savez(f, **reference_statistics(net, test_images))
        done = rec.record("classifier", key, {
            "path": net_path, "reference": ref_path, "test_accuracy": accuracy, "train_images": len(images),
            "feature_dim": 4 * c.width, "seconds": round(time.time() - t0, 1)})
        log(f"classifier: test accuracy {accuracy:.4f}, {4 * c.width}-d features ({time.time() - t0:.0f} s)")
    net, _ = load_classifier(net_path)
    with np.load(ref_path) as z:
        ref = {k: z[k] for k in z.files}
    return net, ref, key


def stage_base(family: Family, cfg: StudyConfig, rec: StudyRecord, data: dict, data_key: str):
    """θr: the family's network built from scratch and trained on the train split by the core's loop."""
    m = cfg.model
    key = rec.key({"family": cfg.family, "model": dataclasses.asdict(m), "train": dataclasses.asdict(cfg.base)},
                  data_key)
    folder, done = rec.begin("base", key)
    if not done:
        t0 = time.time()
        train = NpzImages(data["train"])
        bundle = family.build("cpu", seed=m.seed, resolution=train.shape[1], img_channels=train.shape[3],
                              num_classes=int(train.labels.max()) + 1 if m.conditional else 0,
                              model_channels=m.model_channels, channel_mult=list(m.channel_mult),
                              num_blocks=m.num_blocks, attn_resolutions=list(m.attn_resolutions), dropout=m.dropout)
        params = sum(p.numel() for p in bundle.net.parameters())
        log(f"base: training {params:,}-parameter {type(bundle.net).__name__} ({cfg.family} family) from scratch on "
            f"{len(train)} images")
        examples = encode_examples(family, bundle, data["train"], None, batch=4096)
        snapshots = finetune(family, bundle, examples, cfg.base, folder, desc="training θr")
        done = rec.record("base", key, {"theta_r": snapshots[-1], "parameters": params,
                                        "final_loss": last_loss(folder), "seconds": round(time.time() - t0, 1)})
        log(f"base: done ({time.time() - t0:.0f} s)")
    return family.load(done["theta_r"], "cpu"), done, key


def last_loss(folder: str) -> float | None:
    entry = last_log_entry(folder)
    return entry["loss"] if entry else None


def stage_synthetic(family: Family, bundle: Bundle, cfg: StudyConfig, rec: StudyRecord, name: str, sampler: dict,
                    base_key: str):
    """S: one image per seed (balanced labels) from θr with `sampler`."""
    s = cfg.synthetic
    key = rec.key({"num_images": s.num_images, "seed_offset": s.seed_offset, "sampler": sampler}, base_key)
    folder, done = rec.begin(name, key)
    path = os.path.join(folder, "images.npz")
    if not done:
        t0 = time.time()
        seeds = plan_seeds(s.num_images, None, bundle.num_classes, s.seed_offset)
        labels = draw_labels(family, bundle, seeds, "per_class" if bundle.conditional else "none")
        if not os.path.isfile(path):   # a finished .npz is complete (atomic); only its record may be missing
            sample_to_npz(family, bundle, seeds, labels, path, s.batch, sampler)
        done = rec.record(name, key, {"path": path, "sampler": sampler, "num_images": len(seeds),
                                      "seconds": round(time.time() - t0, 1)})
        log(f"{name}: {len(seeds)} images with {sampler} ({time.time() - t0:.0f} s)")
    return path, key


def training_set_facts(sets: dict[str, str], clf, ref) -> dict[str, dict]:
    """Descriptive metrics of each arm's training set — how mode- or diversity-seeking it is (feature spread,
    classifier confidence, pixel std) — for the report; never used to choose anything."""
    facts = {}
    for arm, path in sets.items():
        images, labels = read_all(path)
        facts[arm] = image_set_metrics(clf, images, ref, labels)
    return facts


def stage_real_subset(cfg: StudyConfig, rec: StudyRecord, data: dict, data_key: str):
    """The control's training set: `control.num_images` real training images, drawn without replacement."""
    c = cfg.control
    key = rec.key(dataclasses.asdict(c), data_key)
    folder, done = rec.begin("real_subset", key)
    path = os.path.join(folder, "images.npz")
    if not done:
        t0 = time.time()
        images, labels = read_all(data["train"])
        if c.num_images > len(images):
            raise NeonError(f"study.control.num_images: {c.num_images} > {len(images)} training images")
        index = np.sort(np.random.default_rng(c.seed).choice(len(images), c.num_images, replace=False))
        save_images_npz(path, images[index], labels[index], index.astype(np.int64))
        done = rec.record("real_subset", key, {"path": path, "num_images": c.num_images,
                                               "seconds": round(time.time() - t0, 1)})
    return path, key


def stage_selftrain(family: Family, bundle: Bundle, theta_r: dict, cfg: StudyConfig, rec: StudyRecord, arm: str,
                    data_path: str, data_key: str):
    """θ for one arm: θr fine-tuned on that arm's set by the core's loop (the same settings for every arm)."""
    key = rec.key(dataclasses.asdict(cfg.selftrain), data_key)
    name = f"selftrain_{arm}"
    folder, done = rec.begin(name, key)
    if not done:
        t0 = time.time()
        bundle.net.load_state_dict(theta_r)
        examples = encode_examples(family, bundle, data_path, None, batch=cfg.synthetic.batch)
        snapshots = finetune(family, bundle, examples, cfg.selftrain, folder)
        bundle.net.load_state_dict(theta_r)
        theta = load_state_dict(snapshots[-1])
        done = rec.record(name, key, {"theta": snapshots[-1], "relative_change": relative_change(theta_r, theta),
                                      "final_loss": last_loss(folder), "seconds": round(time.time() - t0, 1)})
        log(f"{name}: |θ − θr| / |θr| = {done['relative_change']:.2e} ({time.time() - t0:.0f} s)")
    return load_state_dict(done["theta"]), key


def relative_change(theta_r: dict, theta: dict) -> float:
    num = sum(float((theta[k].double() - v.double()).square().sum()) for k, v in theta_r.items()
              if v.is_floating_point())
    den = sum(float(v.double().square().sum()) for v in theta_r.values() if v.is_floating_point())
    return (num / den) ** 0.5


def evaluation_ranges(family: Family, bundle: Bundle, cfg: StudyConfig) -> list[tuple[str, list[int], np.ndarray]]:
    """(name, seeds, labels) of the validation range, then of each report range: consecutive seeds, balanced
    labels, no seed in two ranges."""
    e = cfg.evaluation
    n = e.per_class * bundle.num_classes if bundle.conditional else e.num_images
    validation = e.validation_offset if e.validation_offset is not None else e.seed_offset + e.repeats * n
    starts = [("validation", validation)] + [(f"report {b + 1}", e.seed_offset + b * n) for b in range(e.repeats)]
    ranges = []
    for name, start in starts:
        seeds = plan_seeds(n, None, bundle.num_classes, start)
        ranges.append((name, seeds, draw_labels(family, bundle, seeds, "per_class" if bundle.conditional else "none")))
    every = [s for _, seeds, _ in ranges for s in seeds]
    if len(set(every)) != len(every):
        raise NeonError(f"study.evaluation.validation_offset: the validation range {validation}… overlaps a report "
                        f"range ({e.seed_offset}…{e.seed_offset + e.repeats * n - 1})")
    return ranges


@contextlib.contextmanager
def count_network_images(*modules: torch.nn.Module | None):
    """A one-item list holding how many images all calls of `modules` processed (Σ batch sizes): per sampled
    image, the network evaluations its sampler made."""
    count = [0]

    def hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        count[0] += int(x.shape[0])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules if m is not None]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def evaluate_point(family: Family, bundle: Bundle, guided: Bundle, weights: dict, point: Point, ranges: list,
                   cfg: StudyConfig, clf, ref) -> tuple[dict, np.ndarray]:
    """Sample `point`'s model (bundle.net carrying `weights`) on each of `ranges` and measure each range's images.
    -> ({"metrics": [per range], "images", "network_calls", "sampling_cpu_seconds"}, the images of all ranges)."""
    e = cfg.evaluation
    bundle.net.load_state_dict(weights)
    sampler = {**e.sampler, "guide_scale": point.omega} if point.guided else e.sampler
    results, images, cpu = [], [], 0.0
    with count_network_images(bundle.net, guided.guide if point.guided else None) as calls:
        for _, seeds, labels in ranges:
            t0 = time.process_time()
            x = np.concatenate([img for _, _, img in generate(family, guided if point.guided else bundle, seeds,
                                                               labels, e.batch, sampler)])
            cpu += time.process_time() - t0
            results.append(image_set_metrics(clf, x, ref, labels))
            images.append(x)
    record = {"metrics": results, "images": sum(len(x) for x in images), "network_calls": calls[0],
              "sampling_cpu_seconds": round(cpu, 3)}
    return record, np.concatenate(images)


def point_weights(point: Point, theta_r: dict, thetas: dict) -> dict:
    if point.arm == "base":
        return theta_r
    if point.w == -1:            # the arm's fine-tuned θ as it is (what (1+w)·θr − w·θ gives at w = −1)
        return thetas[point.arm]
    return merge_state_dicts(theta_r, thetas[point.arm], point.w)


def stage_evaluate(family: Family, bundle: Bundle, theta_r: dict, thetas: dict, cfg: StudyConfig,
                   rec: StudyRecord, clf, ref, upstream: list[str], arm_keys: dict) -> dict:
    """Every grid point on the validation range, where w and ω are chosen (the guided Neon grid at the ODE arm's
    chosen w); then θr and the chosen models on the report ranges. The same seeds and labels for every model in
    a range set. Points are saved as they finish, so a killed run resumes."""
    e = cfg.evaluation
    key = rec.key(dataclasses.asdict(e), *upstream)
    folder, done = rec.begin("eval", key)
    points_path = os.path.join(folder, "points.json")
    points = {}
    if os.path.isfile(points_path):
        with open(points_path) as f:
            points = json.load(f)
    ranges = evaluation_ranges(family, bundle, cfg)
    sets = {"validation": ranges[:1], "report": ranges[1:]}
    guided = with_guide(bundle, thetas[GUIDE_ARM], f"θs of the {GUIDE_ARM} arm")
    computed, asked = False, []

    def run(todo: list[Point], where: str) -> dict[str, list[dict]]:
        nonlocal computed
        out = {}
        os.makedirs(os.path.join(folder, where), exist_ok=True)
        for point in todo:
            asked.append(point.name)
            point_key = rec.key([dataclasses.asdict(point), where], key, arm_keys.get(point.arm, ""),
                                arm_keys[GUIDE_ARM] if point.guided else "")
            entry = points.setdefault(point.name, dataclasses.asdict(point))
            if entry.get(where, {}).get("key") != point_key:
                t0 = time.time()
                record, images = evaluate_point(family, bundle, guided, point_weights(point, theta_r, thetas), point,
                                                sets[where], cfg, clf, ref)
                bundle.net.load_state_dict(theta_r)
                seeds = np.concatenate([np.asarray(s, dtype=np.int64) for _, s, _ in sets[where]])
                labels = None if ranges[0][2] is None else np.concatenate([lab for _, _, lab in sets[where]])
                save_images_npz(os.path.join(folder, where, f"{point.name}.npz"), images, labels, seeds)
                entry[where] = {**record, "key": point_key, "seconds": round(time.time() - t0, 1)}
                computed = True
                with atomic_open(points_path, "w") as f:
                    json.dump(points, f, indent=1)
                fds = ", ".join(f"{r['classifier_fd']:.3f}" for r in record["metrics"])
                log(f"eval {where:>10} {point.name:>22}: classifier FD [{fds}]  ({time.time() - t0:.0f} s)")
            out[point.name] = entry[where]["metrics"]
        return out

    validation = {k: v[0] for k, v in run(unconditional_points(cfg), "validation").items()}
    validation.update({k: v[0] for k, v in run(neon_guided_points(cfg, neon_w(validation, cfg)), "validation")
                       .items()})
    report = run(report_points(validation, cfg), "report")
    points = {name: points[name] for name in dict.fromkeys(asked)}      # drop points no longer asked
    if not done or computed:
        seconds = sum(p[w]["seconds"] for p in points.values() for w in sets if w in p)
        rec.record("eval", key, {"points": len(points), "path": points_path, "seconds": round(seconds, 1)})
    records = [{**p, **p[where]} for p in points.values() for where in sets if where in p]
    return {"validation": validation, "report": report, "folder": folder, "guidance_cost": guidance_cost(records),
            "ranges": {name: [int(s[0]), int(s[-1])] for name, s, _ in ranges},
            "reference_trace": float(np.trace(ref["classifier_sigma"]))}


# ---------------------------------------------------------------------------------------------------------

def stage_arms(family: Family, bundle: Bundle, cfg: StudyConfig, rec: StudyRecord, data: dict[str, str],
               data_key: str, clf, ref, clf_key: str, base_key: str) -> tuple[dict, dict]:
    """From θr on: each arm's training set (S from the ODE sampler, the real control subset, S from the diverse
    sampler), its self-training, and the paired evaluation -> (evaluation, the training sets' facts)."""
    theta_r = {k: v.detach().clone() for k, v in bundle.net.state_dict().items()}
    sets, set_keys = {}, {}
    sets["ode"], set_keys["ode"] = stage_synthetic(family, bundle, cfg, rec, "synthetic_ode",
                                                   cfg.synthetic.sampler, base_key)
    sets["control"], set_keys["control"] = stage_real_subset(cfg, rec, data, data_key)
    sets["diverse"], set_keys["diverse"] = stage_synthetic(family, bundle, cfg, rec, "synthetic_diverse",
                                                           cfg.synthetic.diverse_sampler, base_key)
    thetas, arm_keys = {}, {}
    for arm in ARMS:
        thetas[arm], arm_keys[arm] = stage_selftrain(family, bundle, theta_r, cfg, rec, arm, sets[arm],
                                                     rec.key(None, set_keys[arm], base_key))
    evaluation = stage_evaluate(family, bundle, theta_r, thetas, cfg, rec, clf, ref, [clf_key, base_key],
                                arm_keys)
    return evaluation, training_set_facts(sets, clf, ref)


def run_study(config_path: str, out: str, smoke: bool = False) -> dict:
    """`neon run configs/fashion_mnist_16.yaml [--smoke]`: every stage, cached in `out`; returns study.json's
    content (also written to `out/study.json`, with table.md, fd_vs_w.png and samples.png)."""
    doc = load_study(config_path, smoke=smoke)
    cfg = doc.study
    family = get_family(cfg.family)
    if not family.can_build():
        raise NeonError(f"study.family: {cfg.family!r} cannot build a network from scratch (no `build` method)")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    with torch_threads(cfg.threads):
        rec = StudyRecord(out, {"description": doc.description, "study": cfg.to_dict()}, smoke)
        data, data_key = stage_data(cfg, rec)
        clf, ref, clf_key = stage_classifier(cfg, rec, data, data_key)
        bundle, _, base_key = stage_base(family, cfg, rec, data, data_key)
        evaluation, facts = stage_arms(family, bundle, cfg, rec, data, data_key, clf, ref, clf_key, base_key)
        summary = write_report(out, rec.doc, cfg, evaluation, facts, smoke, wall_seconds=time.time() - t_start)
    return summary
