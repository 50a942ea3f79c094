"""The stages of the Fashion-MNIST text-to-image study, each cached in the run folder as the Fashion-MNIST study's
are (experiments/fashion_mnist/pipeline.py: the same record, the same stages from S on).

    data ─► classifier (+ reference statistics of the test split)
      ├───► prompts ─► VAE (built + trained) ─► base θr (UNet trained) ─► S_ode, S_diverse ─► LoRA θs per arm
      └───► real subset (control) ──────────────────────────────────────────────────────┘        │
                                                        paired evaluation (FD, prompt adherence) ◄┘ ─► report
"""
from __future__ import annotations

import dataclasses
import os
import time

from experiments.fashion_mnist.pipeline import (
    StudyRecord,
    last_loss,
    log,
    read_all,
    stage_arms,
    stage_classifier,
    stage_data,
    torch_threads,
)
from experiments.fashion_t2i.config import TextStudyConfig, load_study
from experiments.fashion_t2i.report import write_text_report
from experiments.fashion_t2i.vae import train_vae
from neon.checkpoint import atomic_open
from neon.family import Bundle, Family, get_family
from neon.selftrain import encode_examples, finetune


def stage_prompts(cfg: TextStudyConfig, rec: StudyRecord) -> tuple[str, str]:
    """prompts.txt: prompt i asks for class i."""
    texts = cfg.prompts.texts()
    key = rec.key(texts)
    folder, done = rec.begin("prompts", key)
    path = os.path.abspath(os.path.join(folder, "prompts.txt"))
    if not done:
        with atomic_open(path, "w") as f:
            f.write("".join(t + "\n" for t in texts))
        rec.record("prompts", key, {"path": path, "prompts": texts})
    return path, key


def stage_vae(family: Family, cfg: TextStudyConfig, rec: StudyRecord, data: dict, prompts: str, upstream: list[str]):
    """The pipeline built from scratch (`family.build`) with its VAE trained on the train split; saved by the
    family as a pipeline folder, which the UNet's training then loads."""
    m, v = cfg.model, cfg.vae
    key = rec.key({"model": dataclasses.asdict(m), "vae": dataclasses.asdict(v)}, *upstream)
    folder, done = rec.begin("vae", key)
    path = os.path.join(folder, "pipeline")
    if not done:
        t0 = time.time()
        images, _ = read_all(data["train"])
        sizes = {k: val for k, val in dataclasses.asdict(m).items() if k not in ("conditional", "seed")}
        bundle = family.build("cpu", seed=m.seed, resolution=images.shape[1], img_channels=images.shape[3],
                              prompts=prompts, **sizes)
        vae = bundle.helpers["vae"]
        log(f"vae: training {sum(p.numel() for p in vae.parameters()):,}-parameter AutoencoderKL on {len(images)} "
            f"images")
        facts = train_vae(vae, images, v.steps, v.batch, v.lr, v.kl_weight, v.seed, log=log)
        family.save(bundle, path)
        done = rec.record("vae", key, {"pipeline": path, **facts, "seconds": round(time.time() - t0, 1)})
        log(f"vae: reconstruction MSE {facts['reconstruction_mse']:.4f} (images in [-1, 1]), latent scale "
            f"{facts['scaling_factor']:.3f} ({time.time() - t0:.0f} s)")
    return done["pipeline"], key


def stage_base(family: Family, cfg: TextStudyConfig, rec: StudyRecord, data: dict, pipeline: str, prompts: str,
               vae_key: str) -> tuple[Bundle, str]:
    """θr: the pipeline's UNet trained from scratch on the train split's latents and prompts by the core's loop
    with diffusers' train_text_to_image objective."""
    key = rec.key({"train": dataclasses.asdict(cfg.base)}, vae_key)
    folder, done = rec.begin("base", key)
    if not done:
        t0 = time.time()
        bundle = family.load(pipeline, "cpu", prompts=prompts)
        params = sum(p.numel() for p in bundle.net.parameters())
        log(f"base: training {params:,}-parameter {type(bundle.net).__name__} ({cfg.family} family) from scratch")
        examples = encode_examples(family, bundle, data["train"], None, batch=1024)
        snapshots = finetune(family, bundle, examples, cfg.base, folder, desc="training θr")
        done = rec.record("base", key, {"theta_r": snapshots[-1], "parameters": params,
                                        "final_loss": last_loss(folder), "seconds": round(time.time() - t0, 1)})
        log(f"base: done ({time.time() - t0:.0f} s)")
    return family.load(done["theta_r"], "cpu", prompts=prompts), key


def run_study(config_path: str, out: str, smoke: bool = False) -> dict:
    """`neon run configs/fashion_mnist_text2image.yaml [--smoke]`: every stage, cached in `out`; returns study.json's
    content (also written to `out/study.json`, with table.md, fd_vs_w.png and samples.png)."""
    doc = load_study(config_path, smoke=smoke)
    cfg = doc.study
    family = get_family(cfg.family)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    with torch_threads(cfg.threads):
        rec = StudyRecord(out, {"description": doc.description, "study": cfg.to_dict()}, smoke)
        data, data_key = stage_data(cfg, rec)
        clf, ref, clf_key = stage_classifier(cfg, rec, data, data_key)
        prompts, prompts_key = stage_prompts(cfg, rec)
        pipeline, vae_key = stage_vae(family, cfg, rec, data, prompts, [data_key, prompts_key])
        bundle, base_key = stage_base(family, cfg, rec, data, pipeline, prompts, vae_key)
        evaluation, facts = stage_arms(family, bundle, cfg, rec, data, data_key, clf, ref, clf_key, base_key)
        summary = write_text_report(out, rec.doc, cfg, evaluation, facts, smoke, time.time() - t_start,
                                    family.label_texts(bundle))
    return summary



