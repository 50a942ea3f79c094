"""VAR's self-training data as the official loop sees them: a cached Lanczos resize, a random crop drawn every
step, bit-identical to the official torchvision pipeline (SinaAlemohammad/Neon @76496c3
VAR/VAR_imagenet_256/utils/data.py build_dataset, = FoundationVision/VAR utils/data.py)."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import InterpolationMode, transforms

from neon.config import FinetuneConfig
from neon.errors import NeonError
from neon.selftrain import finetune
from var import augment, checkpoint
from var.adapter import VARFamily
from var.vqvae import VQVAE

FAMILY = VARFamily()


def release_resolutions(fixtures) -> list[int]:
    """Image sides of the released models: the VQVAE manifest's network built on meta for each VAR's patch_nums."""
    (vae_manifest,) = (fixtures / "var").glob("manifest_vae_*.json")
    shapes = {k: tuple(s) for k, s, _ in json.loads(vae_manifest.read_text())["state_dict"]}
    sides = set()
    for path in sorted((fixtures / "var").glob("manifest_var_*.json")):
        patch_nums = json.loads(path.read_text())["build_kwargs"]["patch_nums"]
        sides.add(checkpoint.build(VQVAE, checkpoint.infer_vqvae_kwargs(shapes, patch_nums)).resolution)
    return sorted(sides)


@pytest.fixture(scope="module")
def resolutions(fixtures) -> list[int]:
    """Model sides to test at: the fixture's images, the tiny bundle's and the releases' (256 and 512)."""
    fixture_side = json.loads((fixtures / "var" / "config.json").read_text())["image_size"]
    return sorted({fixture_side, FAMILY.tiny().resolution, *release_resolutions(fixtures)})


def normalize_01_into_pm1(x):       # the official utils/data.py function
    return x.add(x).add_(-1)


def official_train_aug(final_reso: int, hflip: bool, mid_reso: float = 1.125):
    """The training transform exactly as utils/data.py build_dataset composes it from torchvision pieces."""
    aug = [transforms.Resize(round(mid_reso * final_reso), interpolation=InterpolationMode.LANCZOS),
           transforms.RandomCrop((final_reso, final_reso)), transforms.ToTensor(), normalize_01_into_pm1]
    if hflip:
        aug.insert(0, transforms.RandomHorizontalFlip())
    return transforms.Compose(aug)


def images_of(shapes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def odd_shapes(R: int) -> list[tuple[int, int]]:
    """Square at the model's side, and non-square / odd sides around it."""
    return [(R, R), (R + 1, R + 3), (2 * R + 1, R), (R, R + 7)]


def test_cached_resize_is_pils_lanczos_resize_of_the_image(resolutions):
    for R in resolutions:
        for img in images_of(odd_shapes(R), seed=R):
            ours = augment.lanczos_resize(torch.from_numpy(img)[None], R)[0]
            size = round(augment.MID_RESO * R)
            h, w = img.shape[:2]
            want_w, want_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            pil = np.array(PIL.Image.fromarray(img).resize((want_w, want_h), PIL.Image.LANCZOS))
            assert torch.equal(ours, torch.from_numpy(pil)), (R, img.shape)
            tv = transforms.Resize(size, interpolation=InterpolationMode.LANCZOS)(PIL.Image.fromarray(img))
            assert torch.equal(ours, torch.from_numpy(np.array(tv))), (R, img.shape)


@pytest.mark.parametrize("hflip", [False, True])
def test_augmentation_is_bit_exact_against_the_official_transform(resolutions, hflip):
    for R in resolutions:
        imgs = images_of(odd_shapes(R) + [(R, R)] * 3, seed=R + 1)
        torch.manual_seed(R)
        reference = [official_train_aug(R, hflip)(PIL.Image.fromarray(img)) for img in imgs]
        torch.manual_seed(R)    # the same images in the same order: one cached resize each, then the step's draws
        cached = [augment.lanczos_resize(torch.from_numpy(img)[None], R) for img in imgs]
        ours = [augment.to_pm1(augment.random_crop(c, R, hflip))[0] for c in cached]
        for ref, got in zip(reference, ours):
            assert got.dtype == ref.dtype and torch.equal(got, ref), (R, hflip)


def test_a_batch_draws_as_the_official_loader_does_image_after_image(resolutions):
    R = resolutions[0]
    imgs = images_of([(R, R)] * 6, seed=3)
    torch.manual_seed(11)
    reference = torch.stack([official_train_aug(R, True)(PIL.Image.fromarray(img)) for img in imgs])
    torch.manual_seed(11)
    batch = augment.lanczos_resize(torch.from_numpy(np.stack(imgs)), R)
    assert torch.equal(augment.to_pm1(augment.random_crop(batch, R, hflip=True)), reference)


def test_the_crop_cannot_be_larger_than_the_image():
    with pytest.raises(NeonError, match="cannot crop 8x8 from 7x9"):
        augment.random_crop(torch.zeros(1, 7, 9, 3, dtype=torch.uint8), 8)


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    bundle = FAMILY.tiny(seed=3)
    labels = torch.arange(8) % bundle.num_classes
    images = FAMILY.sample(bundle, list(range(8)), labels, cfg=1.5, top_k=900, top_p=0.95)
    return bundle, FAMILY.encode(bundle, images, labels)


def test_encode_caches_the_resized_images_not_tokens(tiny):
    bundle, examples = tiny
    side = round(augment.MID_RESO * bundle.resolution)
    assert set(examples) == {"images", "labels"}
    assert examples["images"].shape == (8, side, side, 3) and examples["images"].dtype == torch.uint8


def test_two_steps_draw_different_crops(tiny, tmp_path, monkeypatch):
    bundle, examples = tiny
    crops = []
    crop = augment.random_crop
    monkeypatch.setattr(augment, "random_crop", lambda *a, **k: crops.append(crop(*a, **k)) or crops[-1])
    n = len(examples["labels"])
    cfg = FinetuneConfig(lr=1e-4, batch=n, total_images=2 * n, warmup_images=0, seed=0)
    finetune(FAMILY, bundle, examples, cfg, str(tmp_path))
    assert len(crops) == 2 and crops[0].shape == crops[1].shape
    assert not torch.equal(crops[0], crops[1])   # the whole set each step, in a different crop


def test_a_resumed_run_reaches_the_same_weights(tiny, tmp_path):
    bundle, examples = tiny
    n = len(examples["labels"])
    half = n // 2

    def run(out: str, steps: int):
        cfg = FinetuneConfig(lr=1e-3, batch=half, total_images=steps * half, warmup_images=4 * half,
                             snapshot_every_images=2 * half, seed=5)
        return finetune(FAMILY, bundle, examples, cfg, out)

    full = run(str(tmp_path / "full"), 4)
    run(str(tmp_path / "cut"), 2)               # stops after 2 steps with its state saved, as a killed job
    resumed = run(str(tmp_path / "cut"), 4)
    a, b = torch.load(full[-1], weights_only=True), torch.load(resumed[-1], weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], bundle.net.state_dict()["head.weight"])   # it trained


def test_vq_encoding_of_a_step_ignores_an_enclosing_autocast(tiny):
    """The official trainer VQ-encodes in float32 outside its autocast; the core wraps the whole loss in one."""
    bundle, examples = tiny
    torch.manual_seed(0)
    plain = FAMILY.tokens(bundle, examples["images"])
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = FAMILY.tokens(bundle, examples["images"])
    assert torch.equal(plain, under)


def test_loss_refuses_examples_without_images(tiny):
    bundle, _ = tiny
    with pytest.raises(NeonError, match="encode the synthetic set again"):
        FAMILY.loss(bundle, {"tokens": torch.zeros(2, bundle.net.L, dtype=torch.int16), "labels": torch.arange(2)})
