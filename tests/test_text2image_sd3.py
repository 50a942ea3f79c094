"""The text-to-image family on SD3 / SD3.5 (StableDiffusion3Pipeline): a tiny random MMDiT pipeline built here, whose
images equal the pipeline's own __call__, whose latents are SD3's shifted ones, and whose loss is the flow-matching
objective of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, step by step."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from test_text2image_family import ARGS, LABELS, PROMPTS, SEEDS, write_prompts

from neon.errors import NeonError
from neon.family import get_family

FAMILY = get_family("text2image")


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompts(tmp_path)


@pytest.fixture
def bundle(prompt_file):
    return FAMILY.tiny(model="sd3", prompts=prompt_file)


def pipelines_own(pipe, resolution: int) -> torch.Tensor:
    """The pipeline's __call__ on the prompt texts, one generator per image, as output_type='pil' -> uint8."""
    pipe.set_progress_bar_config(disable=True)
    chosen = [PROMPTS[i] for i in LABELS]
    images = pipe(prompt=[p["prompt"] for p in chosen], negative_prompt=[p.get("negative_prompt", "") for p in chosen],
                  generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pil",
                  height=resolution, width=resolution, **ARGS).images
    return torch.stack([torch.from_numpy(np.array(im)) for im in images])


def test_sd3_images_equal_the_pipelines_own_call_and_eta_is_refused(bundle):
    from hf_text2image.adapter import _pipeline
    assert type(bundle.net).__name__ == "SD3Transformer2DModel" and bundle.resolution == 16
    ours = FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    assert ours.dtype == torch.uint8 and ours.shape == (len(SEEDS), 16, 16, 3)
    assert torch.equal(ours, pipelines_own(_pipeline(bundle), bundle.resolution))
    assert ours.float().std() > 10   # not a blank canvas
    with pytest.raises(NeonError, match="StableDiffusion3Pipeline takes no eta") as e:
        FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), eta=0.5, **ARGS)
    assert "\n" not in str(e.value)


def test_a_saved_sd3_folder_loads_in_diffusers_and_back_with_the_same_images(bundle, prompt_file, tmp_path):
    folder = str(tmp_path / "pipe")
    FAMILY.save(bundle, folder)
    again = FAMILY.load(folder, prompts=prompt_file)
    for key, value in bundle.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key]), key
    ours = FAMILY.sample(again, SEEDS, torch.tensor(LABELS), **ARGS)
    # diffusers' own way to load an SD3 without T5: its model_index.json has text_encoder_3 = [null, null], which
    # from_pretrained loads only when told so (the SD3 docs' "dropping the T5 text encoder").
    theirs = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                         tokenizer_3=None)
    assert type(theirs).__name__ == "StableDiffusion3Pipeline" and theirs.text_encoder_3 is None
    assert torch.equal(ours, pipelines_own(theirs, again.resolution))
    assert torch.equal(ours, FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS))


def test_sd3_latents_are_shifted_then_scaled(bundle):
    images = FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    x0 = FAMILY.encode(bundle, images, torch.tensor(LABELS))["x0"]
    vae = bundle.helpers["vae"]
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    mean = vae.encode(x).latent_dist.mean
    assert x0.shape == (len(SEEDS), 16, 8, 8)
    assert torch.equal(x0, (mean - 0.0609) * 1.5305)   # train_dreambooth_lora_sd3.py's model_input


def script_loss(bundle, x0, labels, precondition_outputs: bool) -> torch.Tensor:
    """train_dreambooth_lora_sd3.py's training step (default arguments), written out as the script has it."""
    from hf_text2image.adapter import _pipeline
    pipe = _pipeline(bundle)
    # One prompt at a time, as the family caches them (a batch of prompts may round differently in the matmuls).
    encoded = [pipe.encode_prompt(prompt=PROMPTS[i]["prompt"], prompt_2=None, prompt_3=None,
                                  do_classifier_free_guidance=False) for i in labels]
    prompt_embeds, pooled_prompt_embeds = (torch.cat([e[k] for e in encoded]) for k in (0, 2))
    noise_scheduler_copy = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn_like(x0)
    u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=x0.shape[0],
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    step_indices = [(noise_scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]   # get_sigmas
    sigmas = noise_scheduler_copy.sigmas[step_indices].flatten()[:, None, None, None]
    noisy_model_input = (1.0 - sigmas) * x0 + sigmas * noise
    model_pred = bundle.net(hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                            pooled_projections=pooled_prompt_embeds, return_dict=False)[0]
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    target = x0 if precondition_outputs else noise - x0
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


@pytest.mark.parametrize("precondition_outputs", [None, False], ids=["script-default", "velocity"])
def test_sd3_loss_is_the_dreambooth_scripts_flow_matching_step(bundle, precondition_outputs):
    images = FAMILY.sample(bundle, SEEDS, torch.tensor(LABELS), **ARGS)
    batch = FAMILY.encode(bundle, images, torch.tensor(LABELS))
    bundle.net.train().requires_grad_(True)
    torch.manual_seed(5)
    loss = FAMILY.loss(bundle, batch, precondition_outputs=precondition_outputs)
    torch.manual_seed(5)
    expected = script_loss(bundle, batch["x0"], LABELS, precondition_outputs is not False)
    assert torch.equal(loss, expected), (loss, expected)
    loss.backward()
    attention = [p.grad for n, p in bundle.net.named_parameters() if ".attn.to_k" in n or ".attn.add_k_proj" in n]
    assert loss.isfinite() and attention and all(g is not None and g.abs().sum() > 0 for g in attention)


def test_each_objectives_arguments_are_refused_for_the_other_in_one_line(bundle):
    sd = FAMILY.tiny()
    for target, args, name in [(bundle, dict(snr_gamma=5.0), "snr_gamma"), (sd, dict(logit_std=2.0), "logit_std")]:
        with pytest.raises(NeonError, match=f"loss_args.{name}: not an argument of") as e:
            FAMILY.loss(target, {"x0": torch.zeros(1, 4, 8, 8), "labels": torch.tensor([0])}, **args)
        assert "\n" not in str(e.value)
    with pytest.raises(NeonError, match="weighting_scheme: one of sigma_sqrt, logit_normal"):
        FAMILY.loss(bundle, {"x0": torch.zeros(1, 16, 8, 8), "labels": torch.tensor([0])}, weighting_scheme="uniform")
