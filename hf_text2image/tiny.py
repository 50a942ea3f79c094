"""Tiny random text-to-image pipelines, built from configs on this machine (tokenizer files written locally), with
the released pipelines' code paths: Stable Diffusion (UNet2DConditionModel + CLIPTextModel + AutoencoderKL) and
SDXL (two text encoders, the second with a projection, and the UNet's text-time micro-conditioning)."""
from __future__ import annotations

import tempfile

import diffusers
import torch
import transformers

from hf_diffusers.adapter import randomize
from hf_text2image.tokenizer_files import write_clip_tokenizer
from neon.errors import NeonError

MODELS = ("sd", "sdxl")
# The released SD 1.5 / SDXL scheduler configs' numbers (scaled-linear β from 0.00085 to 0.012, 1000 steps).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
CONTEXT = 16        # tokens per prompt (CLIP's 77, shortened)
TEXT_WIDTH = 32     # each text encoder's hidden size


def clip_tokenizer(words) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer knowing `words`, read back from the files `write_clip_tokenizer` writes."""
    with tempfile.TemporaryDirectory() as folder:
        return transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, words, CONTEXT))


def text_encoder(tokenizer, projection: bool) -> torch.nn.Module:
    """CLIPTextModel (projection: CLIPTextModelWithProjection, SDXL's second encoder) sized to `tokenizer`: it
    pools at the tokenizer's end-of-text token, as the released encoders do."""
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def tiny_vae(resolution: int) -> diffusers.AutoencoderKL:
    """Two levels: latents of side resolution / 2 with 4 channels."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=resolution)


def tiny_unet(side: int, sdxl: bool) -> diffusers.UNet2DConditionModel:
    """Cross-attention on the text embeddings (SDXL: both encoders' concatenated, plus the pooled embedding and
    the six size/crop numbers as its added `text_time` embedding)."""
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8) if sdxl else {}
    return diffusers.UNet2DConditionModel(
        sample_size=side, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH * (2 if sdxl else 1), attention_head_dim=8, norm_num_groups=8, **extra)


def tiny_parts(model: str, resolution: int, words, scheduler: str, seed: int) -> tuple[str, dict]:
    """(pipeline class, its components) of a random tiny `model` ('sd' or 'sdxl') making `resolution`² images."""
    if model not in MODELS:
        raise NeonError(f"text2image tiny: model must be one of {', '.join(MODELS)}, got {model!r}")
    if resolution % 4:
        raise NeonError(f"text2image tiny: resolution must be a multiple of 4, got {resolution}")
    cls = getattr(diffusers, str(scheduler), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise NeonError(f"text2image tiny: unknown scheduler {scheduler!r}")
    with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(words)
        parts = dict(vae=tiny_vae(resolution), text_encoder=text_encoder(tokenizer, False), tokenizer=tokenizer,
                     unet=tiny_unet(resolution // 2, model == "sdxl"),
                     scheduler=cls.from_config(SD_SCHEDULER))
        if model == "sdxl":
            parts |= dict(text_encoder_2=text_encoder(tokenizer, True), tokenizer_2=tokenizer)
    for name in ("unet", "vae"):
        randomize(parts[name], seed)
    return ("StableDiffusionXLPipeline" if model == "sdxl" else "StableDiffusionPipeline"), parts
