"""Neon for a text-to-image model on real images, offline, on CPU: the Fashion-MNIST text-to-image study
(`neon run configs/fashion_mnist_text2image.yaml`, write-up in docs/fashion_mnist_text2image.md).

A StableDiffusionPipeline is built from scratch by the text2image family (`Text2ImageFamily.build`: a small
UNet2DConditionModel, a frozen random CLIPTextModel whose tokenizer files are written locally, an AutoencoderKL,
DDIM), its VAE trained on the Fashion-MNIST train split (16×16 grey), then its UNet trained on the latents with
one caption per class ("a photo of a trouser": prompt i is class i). From there the study is the Fashion-MNIST
study's (experiments/fashion_mnist): S from θr over the prompt set, LoRA self-training θs, the merge θneon over a
w sweep chosen on a validation seed range, the baselines (continued LoRA training on real images, θs itself, θs as
a sampling-time guide, Neon + guidance), reported on disjoint report ranges by classifier FD, pixel FD and prompt
adherence (the classifier's accuracy on the class the prompt asked for), each paired with θr range by range.

Modules: config (the `study:` schema: the Fashion-MNIST one plus model, vae, prompts), vae (the VAE stage),
pipeline (the stages, `run_study`), report (adherence table, per-prompt sample grid).
"""
from experiments.fashion_t2i.pipeline import run_study

__all__ = ["run_study"]
