"""The `diffusers` family for the Neon core: any UNet2DModel / DiT pipeline folder (or Hub id), run by the
diffusers library itself.

- load:   a pipeline folder (DDPMPipeline, DDIMPipeline, DiTPipeline) or a Hub repo id -> Bundle(net = the EMA
          component where the folder has one, else unet/ or transformer/; helpers = {'vae'} for DiT, frozen).
- sample: the pipeline's own loop (hf_diffusers/sampler.py), one generator per image seeded by its seed: the
          images equal the pipeline's with generator=[torch.Generator().manual_seed(s) for s in seeds].
- encode: uint8 images -> the training scripts' input, (x / 255 − 0.5) / 0.5; for DiT the VAE latents
          (mean of the posterior) × scaling_factor.
- loss:   the diffusers training objective for the scheduler's prediction_type (hf_diffusers/loss.py).
- save:   a pipeline folder: a copy of the loaded one with the network's safetensors rewritten (same shards,
          same dtypes), or, for a network with no folder (tiny), the pipeline's own save_pretrained.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import diffusers
import torch

from hf_diffusers.lora_files import save_layouts
from hf_diffusers.loss import diffusion_loss, noise_scheduler
from hf_diffusers.pipeline import HUB_ID, PIPELINES, load_pipeline, pipeline_class, pipeline_object, resolve
from hf_diffusers.sampler import dit_loop, to_uint8, unet_loop
from neon import containers
from neon.checkpoint import open_checkpoint
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults, arg_names
from neon.guidance import GUIDE_SCALE, active_guide
from neon.pipeline_folder import is_pipeline_folder, write_folder

# The keyword arguments of each method, in one place: (name, type, default, meaning). The core's config and CLI
# check names against these; None as a default means the pipeline's own rule.
SAMPLER_ARGS = (
    Arg("num_inference_steps", int | None, None, "denoising steps; None: the pipeline's default (DEFAULT_STEPS)"),
    Arg("eta", float, 0.0, "DDIM: weight of the fresh noise in each step (0 = deterministic DDIM)"),
    Arg("use_clipped_model_output", bool | None, None, "DDIM: recompute the noise from the clipped x0"),
    Arg("guidance_scale", float | None, None, "DiT: classifier-free guidance scale; None: 4.0, <= 1: no guidance"),
    GUIDE_SCALE,
)
LOSS_ARGS = (
    Arg("snr_gamma", float | None, None, "Min-SNR weighting gamma (train_text_to_image --snr_gamma); None: plain MSE"),
)
LOAD_ARGS = (
    Arg("local_files_only", bool | None, None, "Hub ids: use the local cache only; None: $HF_HUB_OFFLINE"),
)
TINY_ARGS = (
    Arg("model", str, "unet", "'unet' (UNet2DModel) or 'dit' (DiTTransformer2DModel + AutoencoderKL)"),
    Arg("num_classes", int, 0, "unet: classes of its embedding table (0: unconditional); a DiT has 1000"),
    Arg("resolution", int, 8, "side of the images"),
    Arg("scheduler", str | None, None, "diffusers scheduler class; None: DDPMScheduler (unet), DDIMScheduler (dit)"),
    Arg("prediction_type", str, "epsilon", "the scheduler's prediction_type: epsilon, v_prediction or sample"),
)

BUILD_ARGS = (   # a UNet2DModel from scratch (`build`), in the Fashion-MNIST study's terms
    Arg("model_channels", int, 32, "channels of the first level; level i has model_channels x channel_mult[i]"),
    Arg("channel_mult", list[int], [1, 2, 2], "channel multiplier of each resolution level"),
    Arg("num_blocks", int, 1, "residual blocks per level (layers_per_block)"),
    Arg("attn_resolutions", list[int], [], "image sides whose levels use self-attention blocks"),
    Arg("dropout", float, 0.0, "dropout of the residual blocks"),
)


DEFAULT_STEPS = {"DDPMPipeline": 1000, "DDIMPipeline": 50, "DiTPipeline": 50}   # their __call__ defaults
DIT_GUIDANCE = 4.0                                                              # DiTPipeline's default
DIT_CLASSES = 1000   # DiTPipeline's null class is label 1000, so its label table has 1000 classes + 1


class DiffusersFamily(Family):
    name = "diffusers"
    CONTAINERS = (containers.PIPELINE_FOLDER,)   # what `load` reads
    SAVES_FOLDERS = True                          # `save` writes a pipeline folder
    SAMPLER_ARGS, LOSS_ARGS, LOAD_ARGS = SAMPLER_ARGS, LOSS_ARGS, LOAD_ARGS
    TINY_ARGS, BUILD_ARGS = TINY_ARGS, BUILD_ARGS
    loads_hub_ids = True   # `--ckpt google/ddpm-cifar10-32`: a Hub repo id, resolved by `load`
    # The diffusers training scripts: torch.optim.AdamW(lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    # with max_grad_norm 1.0 (train_unconditional.py defaults), float32.
    train_defaults = TrainDefaults(optimizer="adamw", betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6,
                                   grad_clip=1.0)

    # -- networks ---------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", local_files_only: bool | None = None) -> Bundle:
        folder = resolve(path, local_files_only)
        parts = load_pipeline(folder, device)
        return _bundle(parts, source=os.path.abspath(folder))

    def save_lora(self, bundle: Bundle, loras: dict, folder: str) -> None:
        """θneon's LoRA as diffusers' `load_lora_weights` and ComfyUI / Automatic1111 load it."""
        save_layouts(loras, folder, bundle.info["component"])

    def reads(self, path: str) -> bool:
        """A pipeline folder of a class this family drives (DDPM, DDIM, DiT), or one whose index cannot be read
        (`load` then says why)."""
        return pipeline_class(path) in (None, *PIPELINES)

    def resolve_remote(self, name: str, load_args: dict) -> str | None:
        """A config's `base: google/ddpm-cifar10-32`: the Hub snapshot folder of that repo id (configs and
        safetensors only), downloaded when online, from the local cache when offline (load_args
        local_files_only, default $HF_HUB_OFFLINE); None for a name that is not a repo id."""
        if not HUB_ID.match(name):
            return None
        return resolve(name, load_args.get("local_files_only"))

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, model: str = "unet", num_classes: int = 0,
             resolution: int = 8, scheduler: str | None = None, prediction_type: str = "epsilon",
             local_files_only: bool | None = None) -> Bundle:
        """A random tiny pipeline with the released models' code paths: model 'unet' (UNet2DModel with attention,
        `num_classes` > 0 adds its class embedding table) in a DDPMPipeline (DDIMPipeline when `scheduler` is
        DDIMScheduler), or 'dit' (DiTTransformer2DModel with learned sigma, 1000 classes + null, and a tiny
        AutoencoderKL) in a DiTPipeline. `resolution`: side of the images. `scheduler`: a diffusers scheduler
        class name; default DDPMScheduler for 'unet', DDIMScheduler for 'dit' (the released DiT pipelines').
        local_files_only (a load argument) has nothing to act on: nothing is fetched."""
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
            torch.manual_seed(seed)
            parts = _tiny_parts(model, int(num_classes), int(resolution), scheduler, prediction_type)
        for module in (parts["net"], parts["vae"]):
            if module is not None:
                randomize(module, seed)
                module.to(device).eval().requires_grad_(False)
        return _bundle(parts, source=None)

    def build(self, device: torch.device | str = "cpu", seed: int = 0, resolution: int = 32, img_channels: int = 3,
              num_classes: int = 0, scheduler: str = "DDIMScheduler", **unet_sizes) -> Bundle:
        """A freshly built UNet2DModel with diffusers' own initialisation in a DDIMPipeline (a DDPMPipeline with
        scheduler='DDPMScheduler'), to train from scratch, e.g. the Fashion-MNIST study.

        resolution, img_channels: side and colour channels of the images. num_classes: 0 = unconditional, else
        a class embedding table (num_class_embeds). unet_sizes (BUILD_ARGS): model_channels × channel_mult are
        the levels' block_out_channels, num_blocks their layers_per_block, attn_resolutions the image sides
        whose levels use attention blocks, dropout. The same seed gives the same weights."""
        if scheduler not in ("DDIMScheduler", "DDPMScheduler"):
            raise NeonError(f"diffusers build: scheduler must be DDIMScheduler or DDPMScheduler, got {scheduler!r}")
        unknown = set(unet_sizes) - set(arg_names(BUILD_ARGS))
        if unknown:
            raise NeonError(f"diffusers build: unknown arguments {sorted(unknown)} "
                            f"(known: {', '.join(arg_names(BUILD_ARGS))})")
        sizes = {a.name: a.default for a in BUILD_ARGS} | unet_sizes
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
            torch.manual_seed(seed)
            net = build_unet(int(resolution), int(img_channels), int(num_classes), **sizes)
        parts = dict(pipeline="DDPMPipeline" if scheduler == "DDPMScheduler" else "DDIMPipeline", component="unet",
                     net=net.to(device).eval().requires_grad_(False), vae=None,
                     scheduler=_scheduler(scheduler, num_train_timesteps=1000))
        return _bundle(parts, source=None)

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               guide_scale: float = 0.0, **step_args) -> torch.Tensor:
        """One image per seed -> uint8 (B, H, W, C) on CPU, as the pipeline's output_type="pil" images.

        labels: int64 (B,) for a class-conditional model (a DiT, or a UNet2DModel with num_class_embeds), else
        None. num_inference_steps: the pipeline's default when None (DDPM 1000, DDIM 50, DiT 50).
        guidance_scale: DiT only (default 4.0; ≤ 1 turns guidance off). step_args: DDIM's eta (0) and
        use_clipped_model_output. guide_scale: ω of self-guidance by `bundle.guide`: the scheduler steps with
        (1+ω)·out_θr − ω·out_θs (DiT: of the CFG-guided outputs); 0: the guide is not run."""
        info, net = bundle.info, bundle.net
        guide = active_guide(bundle, guide_scale)
        class_labels = _labels(bundle, labels, len(seeds))
        if len(seeds) == 0:
            return torch.zeros((0, bundle.resolution, bundle.resolution, bundle.channels), dtype=torch.uint8)
        steps = int(num_inference_steps or DEFAULT_STEPS[info["pipeline"]])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        networks = [net] if guide is None else [net, guide]
        was_training = [m.training for m in networks]
        for m in networks:
            m.eval()
        try:
            if info["pipeline"] == "DiTPipeline":
                scale = DIT_GUIDANCE if guidance_scale is None else float(guidance_scale)
                images = dit_loop(net, bundle.helpers["vae"], info["scheduler"], generators, class_labels, scale,
                                  steps, guide=guide, guide_scale=float(guide_scale), **step_args)
            else:
                if guidance_scale is not None:
                    raise NeonError(f"diffusers sampler: {info['pipeline']} has no guidance (guidance_scale)")
                images = unet_loop(net, info["scheduler"], generators, class_labels, steps, guide=guide,
                                   guide_scale=float(guide_scale), **step_args)
        finally:
            for m, mode in zip(networks, was_training):
                m.train(mode)
        return to_uint8(images)

    # -- training -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, C) -> {'x0': float32 (B, C', H', W'), 'labels': int64 (B,) if conditional}: the images
        in [-1, 1] as the training scripts' Normalize([0.5], [0.5]), or for DiT the VAE latents × scaling_factor.
        The posterior's mean is cached, not a draw from it: the set is encoded once, and a draw would depend on
        how the images were split over processes."""
        expected = (bundle.resolution, bundle.resolution, bundle.channels)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise NeonError(f"diffusers encode: expected uint8 images (B, {', '.join(map(str, expected))}), got "
                            f"{images.dtype} {tuple(images.shape)}")
        x = (images.permute(0, 3, 1, 2).to(torch.float32) / 255 - 0.5) / 0.5
        vae = bundle.helpers.get("vae")
        if vae is not None:
            x = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        out = {"x0": x.float().cpu()}
        if bundle.conditional:
            out["labels"] = _labels(bundle, labels, images.shape[0]).cpu()
        return out

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], snr_gamma: float | None = None) -> torch.Tensor:
        """The diffusers training objective on a batch of `encode`'s output (net in train mode: DiT's label
        dropout on). snr_gamma: Min-SNR weighting (LOSS_ARGS)."""
        if snr_gamma is not None and not snr_gamma > 0:
            raise NeonError(f"finetune.loss_args.snr_gamma: must be positive (or null for plain MSE), got {snr_gamma}")
        net = bundle.net
        device = net.device
        x0 = batch["x0"].to(device, torch.float32)
        labels = None
        if bundle.conditional:
            if "labels" not in batch:
                raise NeonError("diffusers loss: conditional model but the batch has no 'labels'")
            labels = batch["labels"].to(device, torch.int64)
        learned_sigma = isinstance(net, diffusers.DiTTransformer2DModel) and \
            net.config.out_channels == 2 * net.config.in_channels
        return diffusion_loss(net, noise_scheduler(bundle.info["scheduler"]), x0, dict(class_labels=labels),
                              learned_sigma, snr_gamma)

    def save(self, bundle: Bundle, path: str) -> None:
        """Write a pipeline folder at `path` that DiffusionPipeline.from_pretrained loads (atomically)."""
        info = bundle.info
        save_pipeline(bundle, path, lambda: pipeline_object(info["pipeline"], bundle.net, info["scheduler"],
                                                            bundle.helpers.get("vae")))


# ---------------------------------------------------------------------------------------------------------

def save_pipeline(bundle: Bundle, path: str, make_pipeline) -> None:
    """`bundle.net` as a pipeline folder at `path` (atomically): a copy of the folder it was loaded from with the
    network's tensors rewritten (same shards, same dtypes), or, for a network with no folder (tiny, built),
    `make_pipeline()`'s own save_pretrained."""
    state = {k: v.detach().cpu() for k, v in bundle.net.state_dict().items()}
    if bundle.source is not None and is_pipeline_folder(bundle.source):
        template = open_checkpoint(bundle.source)   # a PipelineFolder
        if set(template.tensors) != set(state):
            raise NeonError(f"save: the network's tensors do not match {bundle.source}")
        template.write(path, lambda key, _: state[key])
        return
    pipe = make_pipeline()
    write_folder(path, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _bundle(parts: dict, source: str | None) -> Bundle:
    net, vae = parts["net"], parts["vae"]
    if isinstance(net, diffusers.DiTTransformer2DModel):
        num_classes = int(net.config.num_embeds_ada_norm)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution, channels = int(net.config.sample_size) * scale, int(vae.config.out_channels)
    else:
        num_classes = _unet_classes(net)
        resolution, channels = net.config.sample_size, int(net.config.out_channels)
        if not isinstance(resolution, int):
            raise NeonError(f"diffusers: only square images are supported (sample_size {resolution})")
    info = dict(pipeline=parts["pipeline"], component=parts["component"], scheduler=parts["scheduler"])
    helpers = {"vae": vae} if vae is not None else {}
    return Bundle(net=net, helpers=helpers, num_classes=num_classes, resolution=int(resolution),
                  channels=channels, source=source, info=info)


def _unet_classes(unet) -> int:
    """Classes of a UNet2DModel: its class embedding table (num_class_embeds), 0 for an unconditional one."""
    kind, count = unet.config.class_embed_type, unet.config.num_class_embeds
    if kind is None and count is None:
        return 0
    if kind is None and count:
        return int(count)
    raise NeonError(f"diffusers: UNet2DModel class_embed_type={kind!r} (continuous conditioning) is not "
                    "supported; class labels need num_class_embeds")


def _labels(bundle: Bundle, labels, batch: int) -> torch.Tensor | None:
    if not bundle.conditional:
        if labels is not None:
            raise NeonError("diffusers: this model is unconditional; pass labels=None")
        return None
    if labels is None:
        raise NeonError(f"diffusers: this model is class-conditional ({bundle.num_classes} classes): labels "
                        "are required")
    if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point():
        raise NeonError(f"diffusers: labels must be an integer tensor of shape ({batch},)")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= bundle.num_classes):
        raise NeonError(f"diffusers: labels must lie in [0, {bundle.num_classes}), got "
                        f"{int(labels.min())}..{int(labels.max())}")
    return labels.to(bundle.net.device, torch.int64)


def _scheduler(name: str, **config):
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise NeonError(f"diffusers: unknown scheduler {name!r}")
    return cls(**config)


def build_unet(resolution: int, channels: int, num_classes: int, model_channels: int, channel_mult: list[int],
               num_blocks: int, attn_resolutions: list[int], dropout: float) -> diffusers.UNet2DModel:
    """UNet2DModel from the study's sizes: one down/up block per level, attention where the level's side is
    listed, GroupNorm groups of 4 channels at most 32 groups (model_channels must be a multiple of 4)."""
    if model_channels % 4:
        raise NeonError(f"diffusers build: model_channels must be a multiple of 4, got {model_channels}")
    sides = [resolution // 2 ** i for i in range(len(channel_mult))]
    attention = [side in attn_resolutions for side in sides]
    return diffusers.UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=num_blocks,
        block_out_channels=tuple(model_channels * m for m in channel_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=min(32, model_channels // 4), dropout=dropout, num_class_embeds=num_classes or None)


def _tiny_parts(model: str, num_classes: int, resolution: int, scheduler: str, prediction_type: str) -> dict:
    scheduler = scheduler or ("DDIMScheduler" if model == "dit" else "DDPMScheduler")
    sched = _scheduler(scheduler, num_train_timesteps=1000, prediction_type=prediction_type)
    cls = type(sched)
    if model == "unet":
        net = diffusers.UNet2DModel(
            sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
            num_class_embeds=num_classes or None)
        pipeline = "DDIMPipeline" if cls is diffusers.DDIMScheduler else "DDPMPipeline"
        return dict(pipeline=pipeline, component="unet", net=net, scheduler=sched, vae=None)
    if model == "dit":
        if resolution % 4:
            raise NeonError(f"diffusers tiny: a DiT's resolution must be a multiple of 4, got {resolution}")
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=resolution)
        net = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=resolution // 2, patch_size=2, num_embeds_ada_norm=DIT_CLASSES, norm_num_groups=4)
        return dict(pipeline="DiTPipeline", component="transformer", net=net, scheduler=sched, vae=vae)
    raise NeonError(f"diffusers tiny: model must be 'unet' or 'dit', got {model!r}")


def randomize(net: torch.nn.Module, seed: int) -> None:
    """Overwrite every learnable tensor from a generator seeded with `seed`: norm weights 1 + 0.1·N(0,1), other
    weights and embedding tables N(0,1)/sqrt(fan_in), biases 0.05·N(0,1). Unlike diffusers' init (zeroed DiT
    modulation and output layers) every parameter then moves the output, so a test sees each one."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        for module in net.modules():
            is_norm = "Norm" in type(module).__name__
            for name, p in module.named_parameters(recurse=False):
                z = torch.randn(p.shape, generator=g)
                if is_norm:
                    p.copy_(1 + 0.1 * z if name == "weight" else 0.05 * z)
                elif name == "weight" and p.ndim > 1:
                    p.copy_(z / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.05 * z)
