"""`neon run configs/fashion_mnist_text2image.yaml --smoke`: the text-to-image Fashion-MNIST study end to end on CPU
(a StableDiffusionPipeline built from scratch, its VAE trained, LoRA self-training, the paired table with prompt
adherence), and the text2image family's `build` it relies on (grey images through the diffusers pipeline)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments.fashion_mnist.datasets import write_idx
from experiments.fashion_t2i.config import CLASS_WORDS, KIND, load_study
from neon.cli import main as neon_main
from neon.config import ConfigError, config_kind
from neon.errors import NeonError
from neon.family import get_family
from neon.run import RUNNERS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fashion_mnist_text2image.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
SIZES = dict(model_channels=8, channel_mult=[1, 2], vae_channels=[8, 8])


def write_fake_split(root, split: str, n: int, seed: int) -> None:
    """Fashion-MNIST-shaped idx files: a bright square whose place depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 10 * (c // 5):10 + 10 * (c // 5), 2 + 4 * (c % 5):10 + 4 * (c % 5)] = 220
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    write_fake_split(tmp, "train", 600, seed=0)
    write_fake_split(tmp, "test", 200, seed=1)
    data = yaml.safe_load(CONFIG.read_text())
    data["study"]["data_root"] = str(tmp)
    config = tmp / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp / "run"
    neon_main(["run", str(config), "--smoke", "--out", str(out)])
    return out


def test_config_kind_is_registered_and_its_smoke_section_validates():
    from experiments.fashion_t2i import run_study
    assert config_kind(str(CONFIG)) == KIND and RUNNERS.get(KIND) is run_study
    full, smoke = load_study(str(CONFIG)), load_study(str(CONFIG), smoke=True)
    assert full.study.family == smoke.study.family == "text2image"
    assert full.study.selftrain.lora and smoke.study.selftrain.lora == full.study.selftrain.lora
    assert full.study.prompts.texts()[1] == "a photo of a trouser" and len(full.study.prompts.texts()) == 10


def test_a_bad_prompt_set_is_refused_in_one_line(tmp_path):
    data = yaml.safe_load(CONFIG.read_text())
    data["study"]["prompts"]["classes"] = CLASS_WORDS[:3]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="study.prompts"):
        load_study(str(path))


def test_smoke_run_reports_fd_and_prompt_adherence_for_every_model(smoke_run):
    doc = json.loads((smoke_run / "study.json").read_text())
    models = [r["model"] for r in doc["comparison"]]
    assert models[:2] == ["θr", "Neon (S from the ODE sampler)"]
    assert {"continued fine-tuning on real images (control θ)", "continued fine-tuning on S (θs)",
            "θr guided by θs", "Neon + θs guidance"} <= set(models)
    for r in doc["comparison"]:     # paired over the 3 report ranges, FD and adherence alike
        assert len(r["classifier_fd_values"]) == len(r["adherence_values"]) == 3
        assert all(0 <= a <= 1 for a in r["adherence_values"])
    assert doc["comparison"][0]["adherence_diff"] == {"mean": 0.0, "std": 0.0}     # θr against itself
    assert doc["prompts"][0] == "a photo of a t-shirt" and doc["vae"]["scaling_factor"] > 0
    table = (smoke_run / "table.md").read_text()
    for name in models + ["Δ adherence", "Δ classifier FD", "pixel FD"]:
        assert name in table
    for png in ("fd_vs_w.png", "samples.png", "prompt_samples.png"):
        assert (smoke_run / png).read_bytes()[:8] == PNG


def test_smoke_run_self_trains_lora_adapters_only(smoke_run):
    """θs differs from θr only in the attention projections the adapters fuse into."""
    from neon.checkpoint import load_state_dict
    run = json.loads((smoke_run / "run.json").read_text())["stages"]
    theta_r, theta_s = load_state_dict(run["base"]["theta_r"]), load_state_dict(run["selftrain_ode"]["theta"])
    changed = {k for k in theta_r if not torch.equal(theta_r[k], theta_s[k])}
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") and "attn" in k for k in changed)


def test_build_makes_a_grey_pipeline_that_samples_and_encodes_one_channel(tmp_path):
    family = get_family("text2image")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a bag\na photo of a coat\n")
    bundle = family.build("cpu", seed=0, resolution=16, img_channels=1, prompts=str(prompts), **SIZES)
    assert (bundle.channels, bundle.resolution, bundle.num_classes) == (1, 16, 2)
    assert family.label_texts(bundle) == ["a photo of a bag", "a photo of a coat"]
    labels = torch.tensor([0, 1])
    images = family.sample(bundle, [3, 4], labels, num_inference_steps=2, guidance_scale=1.0)
    assert images.dtype == torch.uint8 and images.shape == (2, 16, 16, 1)
    batch = family.encode(bundle, images, labels)
    assert batch["x0"].shape == (2, 4, 8, 8)
    assert torch.isfinite(family.loss(bundle, batch))
    family.save(bundle, str(tmp_path / "pipe"))
    again = family.load(str(tmp_path / "pipe"), "cpu", prompts=str(prompts))
    assert torch.equal(family.sample(again, [3, 4], labels, num_inference_steps=2, guidance_scale=1.0), images)


def test_build_is_reproducible_from_its_seed_and_refuses_unknown_sizes():
    family = get_family("text2image")
    a, b = (family.build("cpu", seed=5, img_channels=1, **SIZES) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
    with pytest.raises(NeonError, match="unknown arguments"):
        family.build("cpu", attn_resolutions=[8])
    with pytest.raises(NeonError, match="cross_attention_levels"):
        family.build("cpu", cross_attention_levels=[2], **SIZES)
