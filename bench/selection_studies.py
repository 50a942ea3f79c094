"""The Fashion-MNIST studies as selection cases for bench/bench_selection.py: θr and the ODE arm's self-training
snapshots made by the study's own stages (same config, same seeds, cached in a study folder that `neon run` can
later complete), features from the study's classifier, the reference its test-split statistics.

    python bench/selection_studies.py CONFIG OUT    # prepare a study folder: data, classifier, θr, S, θs snapshots

A case's inputs are seeds: select, final and report draw disjoint seed ranges with balanced labels (seed i gets
class i mod 10, as the study's ranges), far from S's seeds and from the study's own evaluation ranges.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys

import numpy as np
import torch

if __package__ in (None, ""):   # run as a script: the project root, not bench/, must be importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.fashion_mnist import pipeline
from experiments.fashion_mnist.classifier import predict
from experiments.fashion_mnist.config import load_study
from neon.checkpoint import load_state_dict
from neon.family import get_family
from neon.sampling import generate

# Seed ranges per purpose, far above the study's evaluation seeds (0–1199) and below S's (10⁶ on).
SEED_START = {"select": 100_000, "final": 300_000, "report": 500_000}


def prepare(config_path: str, out: str, smoke: bool = False) -> dict:
    """Run the study's stages up to the ODE arm's self-training in `out` (each reused when already done) ->
    {'family', 'bundle', 'theta_r', 'snapshots': [(images, path)], 'classifier', 'reference', 'config'}.
    The self-training keeps a snapshot at every logging point (the study itself keeps only the last): the
    snapshots a selection protocol chooses among, as the paper's runs keep them."""
    doc = load_study(config_path, smoke=smoke)
    cfg = doc.study
    cfg = dataclasses.replace(cfg, selftrain=dataclasses.replace(
        cfg.selftrain, snapshot_every_images=cfg.selftrain.log_every_images))
    family = get_family(cfg.family)
    os.makedirs(out, exist_ok=True)
    with pipeline.torch_threads(cfg.threads):
        rec = pipeline.StudyRecord(out, {"description": doc.description, "study": cfg.to_dict()}, smoke)
        data, data_key = pipeline.stage_data(cfg, rec)
        clf, ref, _ = pipeline.stage_classifier(cfg, rec, data, data_key)
        bundle, _, base_key = pipeline.stage_base(family, cfg, rec, data, data_key)
        theta_r = {k: v.detach().clone() for k, v in bundle.net.state_dict().items()}
        s_path, s_key = pipeline.stage_synthetic(family, bundle, cfg, rec, "synthetic_ode", cfg.synthetic.sampler,
                                                 base_key)
        pipeline.stage_selftrain(family, bundle, theta_r, cfg, rec, "ode", s_path, rec.key(None, s_key, base_key))
    snapshots = sorted(glob.glob(os.path.join(out, "selftrain_ode", "snapshot-*")))   # files or pipeline folders
    lengths = [int(os.path.basename(p)[len("snapshot-"):].split(".")[0]) for p in snapshots]
    return dict(family=family, bundle=bundle, theta_r=theta_r, snapshots=list(zip(lengths, snapshots)),
                classifier=clf, reference=(ref["classifier_mu"], ref["classifier_sigma"]), config=cfg)


class StudyDraw:
    """draw(state dict, seeds) -> classifier features (n, d) of the images the study's evaluation sampler makes
    for those seeds, labels balanced by seed (class = seed mod 10)."""

    def __init__(self, study: dict):
        self.family, self.bundle, self.clf = study["family"], study["bundle"], study["classifier"]
        self.cfg = study["config"]

    def __call__(self, sd: dict, seeds: torch.Tensor) -> torch.Tensor:
        e = self.cfg.evaluation
        seeds = [int(s) for s in seeds]
        if not seeds:
            return torch.zeros(0, 4 * self.cfg.classifier.width, dtype=torch.float64)
        self.bundle.net.load_state_dict(sd)
        # class = seed mod C, a function of the seed alone: a point's images never depend on how its seeds were cut
        labels = np.asarray(seeds, dtype=np.int64) % self.bundle.num_classes if self.bundle.conditional else None
        with pipeline.torch_threads(self.cfg.threads):
            images = np.concatenate([x for _, _, x in generate(self.family, self.bundle, seeds, labels, e.batch,
                                                                e.sampler)])
            features, _ = predict(self.clf, images)
        return torch.from_numpy(np.asarray(features, dtype=np.float64))


def seeds(purpose: str, n: int) -> torch.Tensor:
    start = SEED_START[purpose]
    return torch.arange(start, start + n, dtype=torch.int64)


def load_snapshots(study: dict, keep: int | None) -> list[tuple[int, dict]]:
    """The ODE arm's snapshots (images seen, θs), shortest first; `keep`: only the last `keep` of them."""
    chosen = study["snapshots"][-keep:] if keep else study["snapshots"]
    return [(length, load_state_dict(path)) for length, path in chosen]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="prepare a Fashion-MNIST study folder for the selection bench")
    p.add_argument("config")
    p.add_argument("out")
    a = p.parse_args(argv)
    study = prepare(a.config, a.out)
    print(f"{a.out}: θr and {len(study['snapshots'])} ODE-arm snapshots "
          f"({', '.join(str(n) for n, _ in study['snapshots'])} images)")


if __name__ == "__main__":
    main()
