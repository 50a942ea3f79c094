"""Tiny random text-to-image pipelines, built from configs on this machine (tokenizer files written locally), with
the released pipelines' code paths: Stable Diffusion (UNet2DConditionModel + CLIPTextModel + AutoencoderKL), SDXL
(two text encoders, the second with a projection, and the UNet's text-time micro-conditioning) and SD3 / SD3.5
(an MMDiT transformer on two projected CLIP encoders, T5 dropped, a flow-matching scheduler, a 16-channel VAE with
a shift factor)."""
from __future__ import annotations

import tempfile

import diffusers
import torch
import transformers

from hf_diffusers.adapter import randomize
from hf_text2image.tokenizer_files import write_clip_tokenizer
from neon.errors import NeonError

PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
MODELS = tuple(PIPELINES)
# The released SD 1.5 / SDXL scheduler configs' numbers (scaled-linear β from 0.00085 to 0.012, 1000 steps).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json (SD3 medium's is the same).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# The SD3 VAE's config (vae/config.json of the SD3 and SD3.5 releases): latents are (mean - shift) * scale.
SD3_LATENTS = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                   use_post_quant_conv=False)
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


def tiny_vae(resolution: int, **config) -> diffusers.AutoencoderKL:
    """Two levels: latents of side resolution / 2 with 4 channels (`config`: SD3's fields, its widths)."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=resolution,
        **{"latent_channels": 4, "block_out_channels": (8, 16), **config})


def tiny_unet(side: int, sdxl: bool) -> diffusers.UNet2DConditionModel:
    """Cross-attention on the text embeddings (SDXL: both encoders' concatenated, plus the pooled embedding and
    the six size/crop numbers as its added `text_time` embedding)."""
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8) if sdxl else {}
    return diffusers.UNet2DConditionModel(
        sample_size=side, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH * (2 if sdxl else 1), attention_head_dim=8, norm_num_groups=8, **extra)


def tiny_transformer(side: int) -> diffusers.SD3Transformer2DModel:
    """SD3.5 Medium's MMDiT-X in miniature: joint attention over the image patches and the prompt tokens (both
    CLIP encoders' hidden states, zero-padded to joint_attention_dim as encode_prompt pads them for T5), the
    pooled embeddings with the timestep as the modulation, RMS-normed q and k, and a second self-attention in
    the first layer."""
    return diffusers.SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=SD3_LATENTS["latent_channels"], num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=16,                  # = heads × head dim: the text stream's width
        pooled_projection_dim=2 * TEXT_WIDTH,       # both encoders' pooled projections, concatenated
        out_channels=SD3_LATENTS["latent_channels"], pos_embed_max_size=side, qk_norm="rms_norm",
        dual_attention_layers=(0,))


def tiny_parts(model: str, resolution: int, words, scheduler: str | None, seed: int) -> tuple[str, dict]:
    """(pipeline class, its components) of a random tiny `model` (one of MODELS) making `resolution`² images."""
    if model not in MODELS:
        raise NeonError(f"text2image tiny: model must be one of {', '.join(MODELS)}, got {model!r}")
    if resolution % 4:
        raise NeonError(f"text2image tiny: resolution must be a multiple of 4, got {resolution}")
    sched = tiny_scheduler(model, scheduler)
    with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(words)
        if model == "sd3":
            parts = sd3_parts(resolution, tokenizer)
        else:
            parts = dict(vae=tiny_vae(resolution), text_encoder=text_encoder(tokenizer, False), tokenizer=tokenizer,
                         unet=tiny_unet(resolution // 2, model == "sdxl"))
        if model == "sdxl":
            parts |= dict(text_encoder_2=text_encoder(tokenizer, True), tokenizer_2=tokenizer)
    net = "transformer" if model == "sd3" else "unet"
    for name in (net, "vae"):
        randomize(parts[name], seed)
    return PIPELINES[model], dict(parts, scheduler=sched)


def tiny_scheduler(model: str, name: str | None):
    """The scheduler class `name` (None: DDIM for SD / SDXL, SD3's flow-matching Euler) over the released
    pipeline's scheduler config."""
    name = name or ("FlowMatchEulerDiscreteScheduler" if model == "sd3" else "DDIMScheduler")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise NeonError(f"text2image tiny: unknown scheduler {name!r}")
    if model == "sd3" and not str(name).startswith("FlowMatch"):   # its sampler steps along σ of a flow
        raise NeonError(f"text2image tiny: sd3 samples with a flow-matching scheduler, got {name}")
    return cls.from_config(SD3_SCHEDULER if model == "sd3" else SD_SCHEDULER)


def sd3_parts(resolution: int, tokenizer) -> dict:
    """SD3's components but the scheduler: two projected CLIP encoders and no T5 (text_encoder_3 = None, as the
    SD3 release allows; encode_prompt then stands zeros in for its tokens), a 16-channel VAE with a shift."""
    return dict(vae=tiny_vae(resolution, **SD3_LATENTS),
                transformer=tiny_transformer(resolution // 2),
                text_encoder=text_encoder(tokenizer, True), tokenizer=tokenizer,
                text_encoder_2=text_encoder(tokenizer, True), tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None)
