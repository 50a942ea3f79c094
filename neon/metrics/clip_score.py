"""CLIP score (Hessel et al. 2021): prompt adherence of text-to-image samples, as torchmetrics' `CLIPScore`.

    s(I, T) = 100 · max(cos(E_I, E_T), 0)     E: CLIP's projected image / text embeddings
    CLIP score = mean of s over the (image, prompt) pairs

Per-pair scores come back too, for paired statistics (θr and θneon on the same prompts and seeds). Images go
through the folder's `CLIPImageProcessor` and prompts through its `CLIPTokenizer` with the calls torchmetrics
makes, so the numbers are its numbers. One difference: torchmetrics 1.9.0 clamps the batch mean at 0, not each
pair as its documented formula (and the paper) does; the two agree whenever every cosine is positive.

The folder is transformers' CLIP layout (config.json, model.safetensors or shards listed in
model.safetensors.index.json, preprocessor_config.json, vocab.json, merges.txt, tokenizer_config.json). Nothing
in it executes: configs and tokenizer are JSON and text, weights are read only from safetensors (a `.bin` is never
opened), and the config's sizes are bounded and checked against the safetensors headers before anything is built.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from neon import paths
from neon.checkpoint import check_state_dict
from neon.errors import NeonError, one_line
from neon.pipeline_folder import read_json
from neon.transformers_folder import INDEX, read_safetensors, weight_files

CONFIG = "config.json"
PREPROCESSOR, VOCAB = "preprocessor_config.json", "vocab.json"
FILES = (CONFIG, PREPROCESSOR, VOCAB, "merges.txt", "tokenizer_config.json")
LEGACY_EOS = 2   # released OpenAI configs: transformers then pools at the highest token id (the end of text)

# Released CLIPs reach LAION's ViT-bigG/14 (width 1664, MLP 8192, 48 layers, 20 heads, projection 1280), OpenAI's
# 336-pixel ViT-L/14 and 49408 tokens of 77 positions. A config far beyond is crafted to exhaust memory.
LIMITS = {"hidden_size": 8192, "intermediate_size": 32768, "num_hidden_layers": 128, "num_attention_heads": 256,
          "vocab_size": 1 << 20, "max_position_embeddings": 8192, "image_size": 4096, "patch_size": 4096,
          "projection_dim": 8192}


@dataclasses.dataclass
class ClipScorer:
    """A CLIP model (transformers.CLIPModel, float32, eval mode) with its tokenizer and image processor."""
    model: Any
    tokenizer: Any
    processor: Any
    device: torch.device

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> np.ndarray:
        """images: (B, H, W, C) uint8, C = 3 or 1 (grey, replicated to RGB); prompts: B strings -> (B,) float64
        in [0, 100], s(image_i, prompt_i). A prompt longer than the text model's max_position_embeddings (77 for
        released CLIPs) is cut there, as torchmetrics cuts it: after tokenizing, so its end-of-text token is cut
        too, and transformers pools that text at the first position (or, for the released OpenAI configs, at its
        highest token id) instead."""
        _check_inputs(images, prompts)
        parts = [self._scores(images[i:i + batch_size], prompts[i:i + batch_size])
                 for i in range(0, len(prompts), batch_size)]
        return torch.cat(parts).double().numpy() if parts else np.zeros(0)

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> float:
        """The CLIP score: the mean of `pair_scores`, in [0, 100]."""
        return float(self.pair_scores(images, prompts, batch_size).mean())

    def _scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        rgb = images.expand(-1, -1, -1, 3).permute(0, 3, 1, 2).cpu()
        pixels = self.processor(images=list(rgb), return_tensors="pt")["pixel_values"]
        e_i = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        tokens = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        n = self.model.config.text_config.max_position_embeddings
        e_t = _embedding(self.model.get_text_features(input_ids=tokens["input_ids"][:, :n].to(self.device),
                                                      attention_mask=tokens["attention_mask"][:, :n].to(self.device)))
        # torchmetrics' arithmetic (normalise, then a dot product), so float32 rounding is the same too.
        e_i, e_t = e_i / e_i.norm(p=2, dim=-1, keepdim=True), e_t / e_t.norm(p=2, dim=-1, keepdim=True)
        return (100 * (e_i * e_t).sum(dim=-1)).clamp(min=0).cpu()


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns the projected embedding as `pooler_output`; 4.x returned the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_inputs(images, prompts) -> None:
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and images.shape[-1] in (1, 3)):
        what = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images)
        raise NeonError(f"CLIP score: images must be uint8 (B, H, W, 3 or 1), got {what}")
    if not (isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)):
        raise NeonError("CLIP score: prompts must be a list of strings")
    if len(prompts) != len(images):
        raise NeonError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")


def load_clip(folder: str, device: str | torch.device = "cpu") -> ClipScorer:
    """The CLIP model in `folder` (layout above), its weights loaded strictly; any problem is one NeonError line
    naming the file (missing, not safetensors, a size beyond LIMITS, other keys or shapes than the config's)."""
    import transformers  # here: it takes seconds to import, and only the CLIP score needs it

    folder = os.fspath(folder)
    for name in FILES:
        paths.input_file(os.path.join(folder, name), name)
    config = _config(os.path.join(folder, CONFIG), transformers.CLIPConfig)
    tokenizer = _built(os.path.join(folder, VOCAB), lambda: transformers.CLIPTokenizer.from_pretrained(folder))
    processor = _built(os.path.join(folder, PREPROCESSOR),
                       lambda: transformers.CLIPImageProcessor.from_pretrained(folder))
    _check_parts(folder, config, tokenizer, processor)
    state = _weights(folder, lambda: transformers.CLIPModel(config))
    model = transformers.CLIPModel(config)   # allocates what the weights hold: `_weights` checked their shapes
    model.load_state_dict(state, strict=True)
    return ClipScorer(model.to(device=device, dtype=torch.float32).eval(), tokenizer, processor, torch.device(device))


def _weights(folder: str, build) -> dict[str, torch.Tensor]:
    """The state dict of the folder's safetensors files, read only once their headers give exactly the names and
    shapes of `build()`'s model (built on the meta device: no memory)."""
    files = weight_files(folder)
    with torch.device("meta"):
        expected = build().state_dict()
    stored: dict[str, torch.Tensor] = {}
    for path in files:
        header = read_safetensors(path, data=False)
        if stored.keys() & header.keys():
            raise NeonError(f"{path}: holds {min(stored.keys() & header.keys())}, which another shard holds too")
        stored.update(header)
    # Older files also hold the position_ids buffers, which the model now computes (transformers ignores them).
    computed = {k for k in stored if k not in expected and k.endswith(".position_ids")}
    label = files[0] if len(files) == 1 else os.path.join(folder, INDEX)
    check_state_dict(expected, {k: v for k, v in stored.items() if k not in computed},
                     f"{label}: not the CLIP model {CONFIG} describes")
    return {k: v for path in files for k, v in read_safetensors(path, data=True).items() if k not in computed}


def _config(path: str, config_class):
    """The CLIPConfig of `path`, every size in its text, vision and joint parts an integer in [1, LIMITS]."""
    data = read_json(path)
    try:
        config = config_class.from_dict(data)
    except Exception as e:   # transformers' own validation (types, heads dividing the width)
        raise NeonError(one_line(f"{path}: not a CLIP config ({type(e).__name__}: {e})")) from None
    for part, sub in (("text_config.", config.text_config), ("vision_config.", config.vision_config), ("", config)):
        for field, bound in LIMITS.items():
            value = getattr(sub, field, None)
            if value is not None and not (type(value) is int and 1 <= value <= bound):
                raise NeonError(one_line(f"{path}: {part}{field} is {value!r}, not an integer in [1, {bound}]"))
    return config


def _check_parts(folder: str, config, tokenizer, processor) -> None:
    """Refuse a tokenizer or processor the model cannot take, which would crash or silently mis-score later."""
    text, side = config.text_config, config.vision_config.image_size
    if len(tokenizer) > text.vocab_size:
        raise NeonError(f"{os.path.join(folder, VOCAB)}: {len(tokenizer)} tokens, the text model has {text.vocab_size}")
    if text.eos_token_id not in (LEGACY_EOS, tokenizer.eos_token_id):   # it would pool every text at position 0
        raise NeonError(f"{os.path.join(folder, CONFIG)}: text_config.eos_token_id is {text.eos_token_id}, the "
                        f"tokenizer ends texts with {tokenizer.eos_token_id}")
    sizes = [getattr(processor.size, k, None) for k in ("shortest_edge", "longest_edge", "height", "width")]
    sane = all(s is None or isinstance(s, int) and 1 <= s <= LIMITS["image_size"] for s in sizes)
    crop = (processor.crop_size.height, processor.crop_size.width) if processor.do_center_crop else None
    if crop != (side, side) or not sane:   # a huge resize would allocate before the model refused the size
        raise NeonError(one_line(f"{os.path.join(folder, PREPROCESSOR)}: resizes to {processor.size} and crops to "
                                 f"{crop}, the vision model takes {side}x{side} images"))


def _built(path: str, build):
    try:
        return build()
    except Exception as e:
        raise NeonError(one_line(f"{path}: transformers cannot read it ({type(e).__name__}: {e})")) from None
