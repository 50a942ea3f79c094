"""The text-to-image family for the Neon core: Stable Diffusion, SDXL and SD3 / SD3.5 pipeline folders (or Hub ids),
run by the diffusers library itself, conditioned on a prompt set.

- load:   a pipeline folder + a prompt file (load_args.prompts) -> Bundle(net = unet/ or SD3's transformer/,
          helpers = the VAE and the text encoders, frozen; num_classes = the number of prompts: label i is prompt i).
- sample: the pipeline's own __call__ (its scheduler, its classifier-free guidance) on the prompts' cached
          embeddings, one generator per image seeded by its seed: the images equal
          pipe(prompt, negative_prompt, generator=[torch.Generator().manual_seed(s) for s in seeds]).
- encode: uint8 images -> the VAE latents (the posterior's mean; SD3: minus shift_factor) × scaling_factor, and the
          prompt labels.
- loss:   on the frozen text encoders' embeddings of the prompts, diffusers' train_text_to_image objective (SD,
          SDXL) or the flow-matching objective of its SD3 DreamBooth scripts (flow_loss.py).
- save:   a pipeline folder: a copy of the loaded one with the UNet's (SD3: transformer's) safetensors rewritten.

The text encoders are helpers: never trained, never merged. Each prompt's embeddings are computed once, by the
pipeline's own `encode_prompt`, and kept for S, the sweep, the final evaluation and self-training.
"""
from __future__ import annotations

import collections
import copy
import inspect
import os
from collections.abc import Sequence

import torch

from hf_diffusers.adapter import save_pipeline
from hf_diffusers.lora_files import read_peft, save_layouts
from hf_diffusers.loss import diffusion_loss, noise_scheduler
from hf_diffusers.pipeline import HUB_ID, pipeline_class, resolve
from hf_diffusers.sampler import to_uint8
from hf_text2image.build import BUILD_ARGS, build_parts
from hf_text2image.flow_loss import DEFAULTS as FLOW_DEFAULTS
from hf_text2image.flow_loss import flow_matching_loss, training_schedule
from hf_text2image.pipeline import SPECS, load_pipeline, pipeline_object
from hf_text2image.prompts import Prompt, read_prompts
from hf_text2image.tiny import MODELS, tiny_parts
from neon import containers, paths
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults, arg_names
from neon.guidance import GUIDE_SCALE, active_guide, mix
from neon.lora import merged_weight

SD3 = "StableDiffusion3Pipeline"    # the flow-matching one: its own latents, loss and conditioning keywords
SAMPLER_ARGS = (
    Arg("num_inference_steps", int | None, None, "denoising steps; None: the pipeline's default (50; SD3: 28)"),
    Arg("guidance_scale", float | None, None, "classifier-free guidance scale; None: the pipeline's (7.5 SD, 5 SDXL, "
        "7 SD3)"),
    Arg("eta", float | None, None, "DDIM: weight of the fresh noise in each step; None: the pipeline's (0); SD3 has "
        "none"),
    GUIDE_SCALE,
)
LOSS_ARGS = (
    Arg("snr_gamma", float | None, None, "SD/SDXL: Min-SNR weighting gamma (train_text_to_image --snr_gamma); None: "
        "plain MSE"),
    Arg("weighting_scheme", str | None, None, "SD3: how t is drawn or the loss weighted (train_dreambooth_lora_sd3 "
        "--weighting_scheme: logit_normal, mode, sigma_sqrt, cosmap); None: logit_normal"),
    Arg("logit_mean", float | None, None, "SD3: mean of the logit-normal t density (--logit_mean); None: 0"),
    Arg("logit_std", float | None, None, "SD3: std of the logit-normal t density (--logit_std); None: 1"),
    Arg("mode_scale", float | None, None, "SD3: scale of the 'mode' t density (--mode_scale); None: 1.29"),
    Arg("precondition_outputs", bool | None, None, "SD3: compare x_t - sigma*v with x_0, not v with noise - x_0 "
        "(--precondition_outputs); None: true, the script's default"),
)
FLOW_ARGS = tuple(FLOW_DEFAULTS)
LOAD_ARGS = (
    Arg("prompts", str | None, None, "prompt file (.txt: one per line; .jsonl: prompt, negative_prompt): label i "
        "is prompt i"),
    Arg("local_files_only", bool | None, None, "Hub ids: use the local cache only; None: $HF_HUB_OFFLINE"),
    Arg("lora", str | None, None, "θr = the pipeline + your LoRA (a diffusers/PEFT .safetensors): fused for "
        "sampling; LoRA self-training continues it and θneon's LoRA is (1+w)·ΔW_r − w·ΔW_s on the base"),
)
TINY_ARGS = (
    Arg("model", str, "sd", f"one of {', '.join(MODELS)}"),
    Arg("resolution", int, 16, "side of the images (latents are half as wide)"),
    Arg("scheduler", str | None, None, "diffusers scheduler class; None: DDIMScheduler (SD3: "
        "FlowMatchEulerDiscreteScheduler)"),
)
CACHE_BYTES = 1 << 30   # prompt embeddings kept between batches
SMOKE_PROMPTS = ("a photo of a cat", "a painting of a red house", "a dog on the beach")


class Text2ImageFamily(Family):
    name = "text2image"
    CONTAINERS = (containers.PIPELINE_FOLDER,)
    SAVES_FOLDERS = True
    SAMPLER_ARGS, LOSS_ARGS, LOAD_ARGS, TINY_ARGS = SAMPLER_ARGS, LOSS_ARGS, LOAD_ARGS, TINY_ARGS
    BUILD_ARGS = BUILD_ARGS
    loads_hub_ids = True
    # train_text_to_image.py / train_text_to_image_lora.py: AdamW(lr, betas=(0.9, 0.999), weight_decay=1e-2,
    # eps=1e-8), max_grad_norm 1.0, float32 (mixed precision on GPU is the user's --mixed_precision choice).
    train_defaults = TrainDefaults(optimizer="adamw", betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                   grad_clip=1.0)

    # -- networks ---------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", prompts: str | None = None,
             local_files_only: bool | None = None, lora: str | None = None) -> Bundle:
        folder = resolve(path, local_files_only)
        pipeline, parts = load_pipeline(folder, device)
        return with_lora(_bundle(pipeline, parts, _prompt_set(prompts), os.path.abspath(folder)), lora)

    def label_texts(self, bundle: Bundle) -> list[str] | None:
        return [p.text for p in bundle.info["prompts"]]

    def save_lora(self, bundle: Bundle, loras: dict, folder: str) -> None:
        """θneon's LoRA as diffusers' `load_lora_weights` and ComfyUI / Automatic1111 load it."""
        save_layouts(loras, folder, bundle.info["component"])

    def reads(self, path: str) -> bool:
        """A pipeline folder of a text-to-image class (SPECS), or one whose index cannot be read (`load` says why)."""
        return pipeline_class(path) in (None, *SPECS)

    def resolve_remote(self, name: str, load_args: dict) -> str | None:
        """A config's `base: stabilityai/sd-turbo`: the Hub snapshot folder (configs, safetensors and tokenizer
        files only); None for a name that is not a repo id."""
        return resolve(name, load_args.get("local_files_only")) if HUB_ID.match(name) else None

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, model: str = "sd", resolution: int = 16,
             scheduler: str | None = None, prompts: str | None = None,
             local_files_only: bool | None = None, lora: str | None = None) -> Bundle:
        """A random tiny SD, SDXL or SD3 pipeline whose tokenizer knows the prompts' words (a few stand-in prompts
        when no prompt file is given)."""
        prompt_set = _prompt_set(prompts) or [Prompt(p) for p in SMOKE_PROMPTS]
        words = [p.text for p in prompt_set] + [p.negative for p in prompt_set]
        pipeline, parts = tiny_parts(model, int(resolution), words, scheduler, seed)
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(device).eval().requires_grad_(False)
        return with_lora(_bundle(pipeline, parts, prompt_set, None), lora)

    def build(self, device: torch.device | str = "cpu", seed: int = 0, resolution: int = 16, img_channels: int = 3,
              prompts: str | None = None, **sizes) -> Bundle:
        """A StableDiffusionPipeline built from scratch (hf_text2image/build.py) to train on your images: a random
        UNet and VAE (train the VAE first), a frozen random CLIP text encoder whose tokenizer knows the prompts'
        words; label i is prompt i of `prompts`. sizes: BUILD_ARGS. The same seed gives the same weights."""
        unknown = set(sizes) - set(arg_names(BUILD_ARGS))
        if unknown:
            raise NeonError(f"text2image build: unknown arguments {sorted(unknown)} "
                            f"(known: {', '.join(arg_names(BUILD_ARGS))})")
        prompt_set = _prompt_set(prompts) or [Prompt(p) for p in SMOKE_PROMPTS]
        pipeline, parts = build_parts(int(resolution), int(img_channels), [p.text for p in prompt_set] +
                                      [p.negative for p in prompt_set], seed,
                                      **({a.name: a.default for a in BUILD_ARGS} | sizes))
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(device).eval().requires_grad_(False)
        return _bundle(pipeline, parts, prompt_set, None)

    # -- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None, **sampler_args
               ) -> torch.Tensor:
        """One image per seed -> uint8 (B, H, W, C) on CPU, as the pipeline's output_type="pil" images.
        labels: int64 (B,), the prompt of each image (an index into the prompt set). sampler_args: SAMPLER_ARGS;
        None leaves the pipeline's own default. guide_scale ω ≠ 0: every network output the pipeline uses is
        (1+ω)·out_θr − ω·out_θs, θs = `bundle.guide` run on the same inputs (after it, the pipeline's own CFG)."""
        indices = _prompt_labels(bundle, labels, len(seeds))
        if not indices:
            return torch.zeros((0, bundle.resolution, bundle.resolution, bundle.channels), dtype=torch.uint8)
        pipe = _pipeline(bundle)
        omega = float(sampler_args.pop("guide_scale", 0.0))
        guide = active_guide(bundle, omega)
        chosen = {k: v for k, v in sampler_args.items() if v is not None}
        unknown = set(chosen) - set(inspect.signature(pipe.__call__).parameters)
        if unknown:
            raise NeonError(f"text2image sampler: {bundle.info['pipeline']} takes no {', '.join(sorted(unknown))}")
        was_training = bundle.net.training
        bundle.net.eval()
        hook = None if guide is None else bundle.net.register_forward_hook(_guided_by(guide, omega),
                                                                           with_kwargs=True)
        try:
            generators = [torch.Generator().manual_seed(own_seed(bundle, i, s)) for i, s in zip(indices, seeds)]
            images = pipe(**text_embeddings(bundle, pipe, indices), height=bundle.resolution, width=bundle.resolution,
                          generator=generators, output_type="pt", **chosen).images
        finally:
            bundle.net.train(was_training)
            if hook is not None:
                hook.remove()
        return to_uint8(images)

    # -- training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, C) (C = the VAE's in_channels: 3, or 1 for a grey `build`) -> {'x0': the VAE latents ×
        scaling_factor, float32 (B, C', H/f, W/f) (C' = 4; SD3's: 16, centred by shift_factor first), 'labels': the
        prompt of each image}. The posterior's mean, not a draw
        from it: the set is encoded once, and a draw would depend on how the images were split over processes."""
        expected = (bundle.resolution, bundle.resolution, bundle.channels)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise NeonError(f"text2image encode: expected uint8 images (B, {', '.join(map(str, expected))}), got "
                            f"{images.dtype} {tuple(images.shape)}")
        indices = _prompt_labels(bundle, labels, images.shape[0])
        vae = bundle.helpers["vae"]
        x = (images.permute(0, 3, 1, 2).to(torch.float32) / 255 - 0.5) / 0.5
        latents = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        if bundle.info["pipeline"] == SD3:   # as train_dreambooth_lora_sd3.py; its pipeline decodes z / scale + shift
            latents = latents - vae.config.shift_factor
        latents = latents * vae.config.scaling_factor
        return {"x0": latents.float().cpu(), "labels": torch.tensor(indices, dtype=torch.int64)}

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], snr_gamma: float | None = None,
             **flow_args) -> torch.Tensor:
        """SD / SDXL: train_text_to_image's objective, the UNet conditioned on the prompts' embeddings (SDXL: and
        the pooled embedding with the image's size as its text_time embedding). SD3: the flow-matching objective
        of train_dreambooth_lora_sd3.py (flow_loss.py), flow_args its recipe (FLOW_ARGS; None: the script's
        default)."""
        flow, chosen = bundle.info["pipeline"] == SD3, {k: v for k, v in flow_args.items() if v is not None}
        wrong = ["snr_gamma"] if flow and snr_gamma is not None else [] if flow else sorted(chosen)
        if wrong:
            raise NeonError(f"finetune.loss_args.{wrong[0]}: not an argument of {bundle.info['pipeline']}'s loss "
                            f"(snr_gamma: SD / SDXL; {', '.join(FLOW_ARGS)}: SD3)")
        if snr_gamma is not None and not snr_gamma > 0:
            raise NeonError(f"finetune.loss_args.snr_gamma: must be positive (or null for plain MSE), got {snr_gamma}")
        net, scheduler = bundle.net, bundle.info["parts"]["scheduler"]
        x0 = batch["x0"].to(net.device, torch.float32)
        indices = _prompt_labels(bundle, batch.get("labels"), x0.shape[0])
        cond = training_conditioning(bundle, _pipeline(bundle), indices)
        if flow:
            return flow_matching_loss(net, training_schedule(scheduler), x0, cond, **{**FLOW_DEFAULTS, **chosen})
        return diffusion_loss(net, noise_scheduler(scheduler), x0, cond, False, snr_gamma)

    def save(self, bundle: Bundle, path: str) -> None:
        """Write a pipeline folder at `path` that DiffusionPipeline.from_pretrained loads (atomically). A network
        without a folder of its own (tiny, built) is saved whole, from a copy on the CPU: transformers' save_pretrained
        then sees host tensors, whatever device the run is on."""
        save_pipeline(bundle, path, lambda: copy.deepcopy(_pipeline(bundle)).to("cpu"))


# ---------------------------------------------------------------------------------------------------------

def _guided_by(guide: torch.nn.Module, omega: float):
    """A forward hook for θr's network: its output (a tuple or an output dataclass, the prediction first)
    becomes (1+ω)·out_θr − ω·out_θs, the guide called with the same arguments."""
    def hook(module, args, kwargs, out_r):
        out_s = guide(*args, **kwargs)
        if isinstance(out_r, tuple):
            return (mix(out_r[0], out_s[0], omega),) + out_r[1:]
        out_r.sample = mix(out_r.sample, out_s.sample, omega)
        return out_r
    return hook


def own_seed(bundle: Bundle, index: int, seed: int) -> int:
    """The generator seed of an image of prompt `index` given the run's `seed`: the prompt's own, where it has one."""
    fixed = bundle.info["prompts"][index].seed
    return int(seed) if fixed is None else fixed


def _prompt_set(path: str | None) -> list[Prompt]:
    return read_prompts(path) if path is not None else []


def _bundle(pipeline: str, parts: dict, prompts: list[Prompt], source: str | None) -> Bundle:
    spec = SPECS[pipeline]
    net, vae = parts[spec.net], parts["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    side = net.config.sample_size
    if not isinstance(side, int):
        raise NeonError(f"text2image: only square images are supported (sample_size {side})")
    helpers = {name: part for name, part in parts.items() if isinstance(part, torch.nn.Module) and name != spec.net}
    info = dict(pipeline=pipeline, component=spec.net, parts={k: v for k, v in parts.items() if k != spec.net},
                prompts=prompts, embeddings=collections.OrderedDict())
    return Bundle(net=net, helpers=helpers, num_classes=len(prompts), resolution=int(side) * scale,
                  channels=int(vae.config.in_channels),
                  source=source, info=info)


def with_lora(bundle: Bundle, path: str | None) -> Bundle:
    """`bundle` with the user's LoRA file fused into its network (θr = base + ΔW_r) and kept as `bundle.lora`."""
    if path is None:
        return bundle
    loras = read_peft(paths.input_file(path, "LoRA file"), bundle.info["component"])
    with torch.no_grad():
        for name, lora in loras.items():
            try:
                layer = bundle.net.get_submodule(name)
            except AttributeError:
                raise NeonError(f"{path}: adapts {name!r}, which the {bundle.info['component']} has no layer for") \
                    from None
            if tuple(layer.weight.shape) != (lora.up.shape[0], lora.down.shape[1]):
                raise NeonError(f"{path}: the adapter of {name} is {tuple(lora.up.shape[:1] + lora.down.shape[1:])}, "
                                f"the layer's weight {tuple(layer.weight.shape)}")
            layer.weight.copy_(merged_weight(layer.weight, lora))
    bundle.lora = loras
    return bundle


def _pipeline(bundle: Bundle):
    """The pipeline over the bundle's parts with `bundle.net` (whatever weights it holds now) as its network, and
    a fresh copy of the scheduler (set_timesteps and multistep solvers keep state)."""
    parts = dict(bundle.info["parts"], scheduler=copy.deepcopy(bundle.info["parts"]["scheduler"]))
    return pipeline_object(bundle.info["pipeline"], parts, bundle.net)


def _prompt_labels(bundle: Bundle, labels, batch: int) -> list[int]:
    if not bundle.info["prompts"]:
        raise NeonError("text2image: no prompt set; give a prompt file as load_args.prompts (--load-arg prompts=FILE)")
    if labels is None or not isinstance(labels, torch.Tensor) or labels.shape != (batch,) \
            or labels.is_floating_point():
        raise NeonError(f"text2image: labels (the prompt of each image) must be an integer tensor of shape ({batch},)")
    indices = [int(i) for i in labels.tolist()]
    if indices and not (0 <= min(indices) and max(indices) < len(bundle.info["prompts"])):
        raise NeonError(f"text2image: prompt labels must lie in [0, {len(bundle.info['prompts'])}), got "
                        f"{min(indices)}..{max(indices)}")
    return indices


def _encoded(bundle: Bundle, pipe, index: int) -> tuple[torch.Tensor, ...]:
    """encode_prompt's outputs for prompt `index` (with its negative prompt), kept on the CPU: computed once while
    the kept ones fit in CACHE_BYTES (SDXL's are 1.3 MB a prompt), else again, least recently used first out."""
    cache = bundle.info["embeddings"]
    if index in cache:
        cache.move_to_end(index)
    else:
        prompt = bundle.info["prompts"][index]
        args = dict(prompt=prompt.text, negative_prompt=prompt.negative, device=bundle.net.device,
                    num_images_per_prompt=1, do_classifier_free_guidance=True)
        # SD3's encode_prompt has no default for prompt_2 / prompt_3: None, as its __call__ passes, is `prompt`.
        others = [p.name for p in inspect.signature(pipe.encode_prompt).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in args]
        out = pipe.encode_prompt(**args, **dict.fromkeys(others))
        cache[index] = tuple(t.cpu() for t in out)
        keep = max(1, CACHE_BYTES // sum(t.nbytes for t in cache[index]))   # every prompt's are the same size
        while len(cache) > keep:
            cache.popitem(last=False)
    return cache[index]


def text_embeddings(bundle: Bundle, pipe, indices: list[int]) -> dict[str, torch.Tensor]:
    """__call__'s embedding keywords (prompt_embeds, negative_prompt_embeds, SDXL's pooled ones) for a batch."""
    per_prompt = [_encoded(bundle, pipe, i) for i in indices]
    names = SPECS[bundle.info["pipeline"]].embeds
    return {name: torch.cat([e[k] for e in per_prompt]).to(bundle.net.device) for k, name in enumerate(names)}


def training_conditioning(bundle: Bundle, pipe, indices: list[int]) -> dict:
    """The network's conditioning keywords for training: the prompts' embeddings (no negative prompt); for SD3
    the pooled embedding as pooled_projections (train_dreambooth_lora_sd3.py; the T5 tokens are __call__'s 256,
    not the script's --max_sequence_length 77: the model trains on what it samples with), for SDXL the pooled
    embedding with the add_time_ids of an uncropped image at the model's resolution, as
    train_text_to_image_sdxl.py computes them for square images."""
    embeds = text_embeddings(bundle, pipe, indices)
    cond = {"encoder_hidden_states": embeds["prompt_embeds"]}
    if bundle.info["pipeline"] == SD3:
        cond["pooled_projections"] = embeds["pooled_prompt_embeds"]
    if bundle.info["pipeline"] == "StableDiffusionXLPipeline":
        size = (bundle.resolution, bundle.resolution)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds["prompt_embeds"].dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        cond["added_cond_kwargs"] = {"text_embeds": embeds["pooled_prompt_embeds"],
                                     "time_ids": time_ids.to(bundle.net.device).repeat(len(indices), 1)}
    return cond

