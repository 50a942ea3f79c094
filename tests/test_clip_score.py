"""CLIP score: our scores are torchmetrics' `CLIPScore` on the same tiny random CLIP (pair by pair and their mean),
a negative cosine scores 0, grey images score as their RGB replica, and a folder that is not a safetensors CLIP
of sane size is refused in one line naming the file, nothing in it executed. Nothing is fetched from the Hub."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score
from torchmetrics.multimodal import CLIPScore

from hf_text2image.tiny_clip import write_tiny_clip
from neon.errors import NeonError
from neon.metrics.clip_score import load_clip

CONTEXT = 16   # tokens per prompt (CLIP's 77, shortened)
SIDE = 32      # the vision model's image side; the test images are 40x48, so the processor resizes and crops
PROMPTS = ["a photo of a cat", "two birds in the blue sky", "a red dog on a sofa", "a", "sky", "a bowl of green apples"]
LONG = "a cat on a sofa " * 6   # 30 words: cut at CONTEXT tokens, its end-of-text token with them


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Any request to the Hub raises (huggingface_hub's offline mode): every file here is local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _tiny_clip(folder: Path) -> Path:
    """A random CLIP in the released layout: pools at its tokenizer's end-of-text token, takes 32x32 images."""
    return Path(write_tiny_clip(str(folder), PROMPTS + [LONG], side=SIDE, context=CONTEXT, seed=0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _tiny_clip(tmp_path_factory.mktemp("clip"))


def _images() -> torch.Tensor:
    """(6, 40, 48, 3) uint8: three noise images, then black, white and red."""
    noise = torch.randint(0, 256, (3, 40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    flat = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0]], dtype=torch.uint8)
    return torch.cat([noise, flat[:, None, None, :].expand(3, 40, 48, 3)])


class _TensorFeatures(transformers.CLIPModel):
    """torchmetrics 1.9.0 takes get_*_features' result as the embedding, which transformers 5 wraps in a
    ModelOutput (Lightning-AI/torchmetrics#3407; #3408 unwraps `pooler_output` after 1.9.0, as this does)."""

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output


@pytest.fixture(scope="module")
def reference(folder):
    """torchmetrics' `model_name_or_path` for the tiny CLIP: a callable giving (model, CLIPProcessor)."""
    parts = (_TensorFeatures.from_pretrained(folder), transformers.CLIPProcessor.from_pretrained(folder))
    return lambda: parts


def _cosines(folder, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """cos(E_I, E_T) per pair, unclamped, straight from transformers (no torchmetrics, no neon)."""
    model, processor = _TensorFeatures.from_pretrained(folder), transformers.CLIPProcessor.from_pretrained(folder)
    pixels = processor(images=list(images.permute(0, 3, 1, 2)), return_tensors="pt")["pixel_values"]
    tokens = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        e_i, e_t = model.get_image_features(pixels), model.get_text_features(**tokens)
    return torch.nn.functional.cosine_similarity(e_i, e_t).numpy()


@pytest.mark.filterwarnings("ignore:Encountered caption longer")   # torchmetrics', on LONG
def test_pair_scores_equal_torchmetrics_pair_by_pair(folder, reference):
    images, prompts = _images(), PROMPTS[:5] + [LONG]
    ours = load_clip(folder).pair_scores(images, prompts, batch_size=4)
    theirs = [torchmetrics_clip_score(image.permute(2, 0, 1), prompt, reference).item()
              for image, prompt in zip(images, prompts)]
    assert ours.dtype == np.float64 and ours.shape == (6,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours == 0).any() and (ours > 0).sum() >= 3, f"the pairs should score both 0 and above, got {ours}"


def test_mean_equals_torchmetrics_CLIPScore_over_batches(folder, reference):
    images, prompts = _images()[:3], PROMPTS[:3]   # noise images: all cosines positive, where the two means agree
    assert (_cosines(folder, images, prompts) > 0).all()
    metric = CLIPScore(model_name_or_path=reference)
    metric.update(images[:2].permute(0, 3, 1, 2), prompts[:2])
    metric.update(images[2:].permute(0, 3, 1, 2), prompts[2:])
    scorer = load_clip(folder)
    np.testing.assert_allclose(scorer.score(images, prompts), metric.compute().item(), rtol=1e-5)
    assert scorer.score(images, prompts) == pytest.approx(scorer.pair_scores(images, prompts).mean(), rel=1e-12)


def test_a_negative_cosine_scores_exactly_zero(folder):
    images, prompts = _images()[3:], ["a photo of a cat", "a", "sky"]   # black, white, red
    cos = _cosines(folder, images, prompts)
    assert cos.min() < 0 < cos.max(), f"the tiny model should give both signs here, got {cos}"
    ours = load_clip(folder).pair_scores(images, prompts)
    assert (ours[cos < 0] == 0).all()
    np.testing.assert_allclose(ours[cos > 0], 100 * cos[cos > 0], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Encountered caption longer")
def test_a_prompt_cut_at_the_context_length_loses_its_end_of_text_token(folder, reference):
    """As torchmetrics: the tokens are cut, not the text, so two long prompts pool at the same first token."""
    image = _images()[:1]
    scorer = load_clip(folder)
    other = "two birds in the blue sky " * 4
    assert scorer.pair_scores(image, [LONG])[0] == scorer.pair_scores(image, [other])[0]
    theirs = torchmetrics_clip_score(image[0].permute(2, 0, 1), other, reference).item()
    assert scorer.pair_scores(image, [other])[0] == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_grey_images_score_as_their_rgb_replica(folder):
    grey = _images()[:3, :, :, :1]
    scorer = load_clip(folder)
    np.testing.assert_array_equal(scorer.pair_scores(grey, PROMPTS[:3]),
                                  scorer.pair_scores(grey.repeat(1, 1, 1, 3), PROMPTS[:3]))


def test_batch_size_does_not_change_the_scores(folder):
    scorer = load_clip(folder)
    np.testing.assert_allclose(scorer.pair_scores(_images(), PROMPTS, batch_size=1),
                               scorer.pair_scores(_images(), PROMPTS, batch_size=64), rtol=1e-6, atol=1e-6)


def test_sharded_weights_load_as_one_file(folder, tmp_path):
    sharded = _copy(folder, tmp_path)
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(load_clip(sharded).pair_scores(_images(), PROMPTS),
                                  load_clip(folder).pair_scores(_images(), PROMPTS))


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "clip"))


class _Payload:
    """A pickle that touches `marker` when unpickled: proof that a loader executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _bin_only(clip: Path, marker: Path) -> str:
    (clip / "model.safetensors").unlink()
    (clip / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return "model.safetensors"


def _pickle_named_safetensors(clip: Path, marker: Path) -> str:
    (clip / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    return "model.safetensors"


def _no_preprocessor(clip: Path, marker: Path) -> str:
    (clip / "preprocessor_config.json").unlink()
    return "preprocessor_config.json"


def _config_edit(part: str, field: str, value, named: str = "config.json"):
    """config.json with `part.field` (part '': a top-level field) set to `value`; the refusal names `named`."""
    def edit(clip: Path, marker: Path) -> str:
        config = json.loads((clip / "config.json").read_text())
        (config[part] if part else config)[field] = value
        (clip / "config.json").write_text(json.dumps(config))
        return named
    return edit


def _crop_of_another_size(clip: Path, marker: Path) -> str:
    processor = json.loads((clip / "preprocessor_config.json").read_text())
    processor["crop_size"] = {"height": SIDE - 8, "width": SIDE - 8}
    (clip / "preprocessor_config.json").write_text(json.dumps(processor))
    return "preprocessor_config.json"


def _key_removed(clip: Path, marker: Path) -> str:
    state = load_file(clip / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, clip / "model.safetensors")
    return "model.safetensors"


REFUSED = {
    "a .bin and no safetensors": (_bin_only, "never a .bin"),
    "a pickle named model.safetensors": (_pickle_named_safetensors, "not a readable safetensors file"),
    "no preprocessor_config.json": (_no_preprocessor, "not found"),
    "an absurd vision width": (_config_edit("vision_config", "hidden_size", 2 ** 30), "vision_config.hidden_size"),
    "an absurd number of layers": (_config_edit("text_config", "num_hidden_layers", 10 ** 6), "num_hidden_layers"),
    "a wrong-typed size": (_config_edit("vision_config", "image_size", "32"), "not a CLIP config"),
    "a crop the vision model cannot take": (_crop_of_another_size, f"takes {SIDE}x{SIDE} images"),
    "a key removed from the weights": (_key_removed, "1 missing (e.g. text_projection.weight)"),
    "weights of another shape": (_config_edit("", "projection_dim", 8, "model.safetensors"), "shape mismatch"),
    "an end-of-text id the tokenizer lacks": (_config_edit("text_config", "eos_token_id", 5), "eos_token_id"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_folder_is_refused_in_one_line_naming_the_file(folder, tmp_path, case):
    make, says = REFUSED[case]
    clip, marker = _copy(folder, tmp_path), tmp_path / "executed"
    name = make(clip, marker)
    with pytest.raises(NeonError) as e:
        load_clip(clip)
    message = str(e.value)
    assert "\n" not in message and str(clip / name) in message and says in message, message
    assert not marker.exists()


@pytest.mark.parametrize("images, prompts, says", [
    (torch.zeros(2, 40, 48, 3), ["a", "sky"], "uint8"),
    (torch.zeros(2, 40, 48, 4, dtype=torch.uint8), ["a", "sky"], "(B, H, W, 3 or 1)"),
    (torch.zeros(2, 40, 48, 3, dtype=torch.uint8), ["a"], "2 images but 1 prompts"),
    (torch.zeros(1, 40, 48, 3, dtype=torch.uint8), "a", "list of strings"),
])
def test_bad_inputs_are_refused(folder, images, prompts, says):
    with pytest.raises(NeonError, match=re.escape(says)):
        load_clip(folder).pair_scores(images, prompts)
