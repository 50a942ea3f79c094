"""Neon on real images, offline, on a laptop: the Fashion-MNIST 16×16 study (`neon run configs/fashion_mnist_16.yaml`).

A small class-conditional EDM (the project's own `edm` family: EDMPrecond + SongUNet + EDMLoss + EMA) is trained
from scratch on the Fashion-MNIST train split by the core's training loop. Then, through the same core code paths
as the paper rows:
  - Neon:    S = 2,000 images from θr with the deterministic Heun sampler; brief self-training θs; merge
             θneon = (1+w)·θr − w·θs over a w sweep;
  - control: the same fine-tuning on 2,000 real training images instead of S, merged the same way;
  - sign test: S from a deliberately diversity-seeking sampler (churn with S_noise > 1), w sweep with w < 0;
  - baselines: continued fine-tuning (the control's θ and θs themselves, w = −1), θr sampled with θs as a
    sampling-time guide (SIMS / autoguidance form, over ω), and θneon sampled with θs as guide (Neon + guidance).
Every model is evaluated with the deterministic Heun sampler on the same seeds and labels (paired) by
"classifier FD" (Fréchet distance in the penultimate features of a small CNN trained on the train split; not FID)
and pixel FD, both against the test split. Every w and ω is chosen on a validation seed range; the chosen models
are reported on disjoint report ranges (mean ± std, paired Δ to θr range by range).

Modules: config (the `study:` schema), classifier (the feature CNN), evaluate (metrics, paired summaries, the
choice on the validation range), protocol (what is evaluated, where each choice is made), pipeline (the cached
stages, `run_study`), report (tables, study.json, plots).
"""
from experiments.fashion_mnist.pipeline import run_study

__all__ = ["run_study"]
