"""A tiny random CLIP in transformers' released layout (config.json, model.safetensors, preprocessor_config.json,
tokenizer files), written locally: what the CLIP score (`metrics.clip`) reads, for tests and smoke runs."""
from __future__ import annotations

import torch
import transformers

from hf_text2image.tokenizer_files import write_clip_tokenizer


def write_tiny_clip(folder: str, words, side: int = 32, context: int = 16, seed: int = 0) -> str:
    """Write a random CLIP into `folder` that knows `words`, takes side² images and `context` tokens, and pools
    at its tokenizer's end-of-text token, as the released models do. Returns `folder`."""
    write_clip_tokenizer(folder, words, max_length=context)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config={**text, **tiny}, projection_dim=16,
                                     vision_config=dict(image_size=side, patch_size=8, **tiny))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                    ).save_pretrained(folder)
    return folder
