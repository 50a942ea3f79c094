"""Neon on LoRA adapters is exact in ΔW space: the LoRA file written (diffusers/PEFT and kohya layouts), loaded by
diffusers' own loaders and fused, gives θneon = θ0 + (1+w)·ΔW_r − w·ΔW_s weight for weight; the two merges seen in
the wild — blending the factors, and negating both factors — do not."""
import copy

import pytest
import torch

from hf_diffusers.lora_files import PEFT_FILE, read_peft, save_kohya, save_peft
from neon.errors import NeonError
from neon.lora import Lora, neon_lora, truncate

W = 0.7
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # diffusers' train_text_to_image_lora.py default target modules


@pytest.fixture(scope="module")
def unet():
    """A tiny random UNet2DConditionModel built from its config (cross-attention, as Stable Diffusion's)."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4).eval()


def _adapters(unet, rank: int, scale: float, seed: int) -> dict[str, Lora]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if name.endswith(TARGETS):
            w = module.weight
            out[name] = Lora(torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g),
                             scale)
    return out


def _expected(unet, theta_r, theta_s) -> dict[str, torch.Tensor]:
    """θ0 + (1+w)·ΔW_r − w·ΔW_s per adapted weight, computed directly in float64."""
    return {name: (unet.get_submodule(name).weight.detach().double() + (1 + W) * (theta_r[name].delta().double()
                                                                          if theta_r else 0)
                   - W * s.delta().double()) for name, s in theta_s.items()}


def _fused(unet, state_or_folder, strength: float | None = None, **load) -> dict[str, torch.Tensor]:
    """The adapted weights after diffusers loads the LoRA into a copy of `unet` (at `strength`, as a user dials
    it with set_adapters) and fuses it."""
    model = copy.deepcopy(unet)
    model.load_lora_adapter(state_or_folder, prefix="unet", adapter_name="neon", **load)
    if strength is not None:
        model.set_adapters(["neon"], weights=[strength])
    model.fuse_lora(lora_scale=1.0)
    out = {}
    for name, module in model.named_modules():
        if name.endswith(TARGETS):
            out[name] = (module.base_layer.weight if hasattr(module, "base_layer") else module.weight).detach()
    return out


def _relative_error(fused: dict, expected: dict) -> float:
    return max(float((fused[k].double() - v).abs().max() / v.abs().max()) for k, v in expected.items())


@pytest.mark.parametrize("case", ["fresh LoRA on θr", "θr is base + LoRA"])
def test_the_peft_file_fused_by_diffusers_is_theta_neon(unet, tmp_path, case):
    theta_r = None if case == "fresh LoRA on θr" else _adapters(unet, 2, 0.5, seed=1)
    theta_s = _adapters(unet, 3, 1.0, seed=2)
    save_peft(neon_lora(theta_r, theta_s, W), str(tmp_path))
    fused = _fused(unet, str(tmp_path), weight_name=PEFT_FILE)
    assert _relative_error(fused, _expected(unet, theta_r, theta_s)) <= 1e-6


def test_the_strength_a_user_dials_at_load_time_scales_the_extrapolation(unet, tmp_path):
    """A fresh LoRA's θneon file at strength k is θr − k·w·ΔW_s: the user tries other w without a new file."""
    theta_s = _adapters(unet, 3, 1.0, seed=2)
    save_peft(neon_lora(None, theta_s, W), str(tmp_path))
    fused = _fused(unet, str(tmp_path), strength=0.5, weight_name=PEFT_FILE)
    half = {k: Lora(s.down, s.up, 0.5 * s.scale) for k, s in theta_s.items()}
    assert _relative_error(fused, _expected(unet, None, half)) <= 1e-6


def test_the_kohya_file_converted_by_diffusers_is_theta_neon(unet, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    theta_r, theta_s = _adapters(unet, 2, 0.5, seed=1), _adapters(unet, 2, 1.0, seed=2)
    save_kohya(neon_lora(theta_r, theta_s, W), str(tmp_path / "neon_kohya.safetensors"))
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "neon_kohya.safetensors"))
    assert all(".lora" not in k or "unet." in k for k in state)   # diffusers recognised the kohya layout
    fused = _fused(unet, state, network_alphas=alphas)
    assert _relative_error(fused, _expected(unet, theta_r, theta_s)) <= 1e-6


def test_the_peft_file_reads_back_as_the_same_delta(unet, tmp_path):
    theta_r, theta_s = _adapters(unet, 2, 0.5, seed=1), _adapters(unet, 3, 1.0, seed=2)
    merged = neon_lora(theta_r, theta_s, W)
    back = read_peft(save_peft(merged, str(tmp_path)))
    assert set(back) == set(merged)
    assert all(torch.allclose(back[k].delta(), merged[k].delta(), rtol=1e-6, atol=1e-6) for k in merged)


def test_factor_wise_and_double_negated_merges_are_not_theta_neon(unet, tmp_path):
    """The check above fails for the two wrong merges: (1+w)·A_r − w·A_s with (1+w)·B_r − w·B_s (bilinear: not
    (1+w)·ΔW_r − w·ΔW_s), and −w·A_s with −w·B_s for a fresh LoRA (+w²·ΔW_s)."""
    theta_r, theta_s = _adapters(unet, 2, 1.0, seed=1), _adapters(unet, 2, 1.0, seed=2)
    factor_wise = {k: Lora((1 + W) * theta_r[k].down - W * theta_s[k].down,
                           (1 + W) * theta_r[k].up - W * theta_s[k].up) for k in theta_s}
    negated = {k: Lora(-W * s.down, -W * s.up) for k, s in theta_s.items()}
    for wrong, r in ((factor_wise, theta_r), (negated, None)):
        folder = tmp_path / ("a" if r else "b")
        save_peft(wrong, str(folder))
        assert _relative_error(_fused(unet, str(folder), weight_name=PEFT_FILE), _expected(unet, r, theta_s)) > 1e-2


def test_truncation_to_a_smaller_rank_reports_its_error():
    g = torch.Generator().manual_seed(0)
    lora = Lora(torch.randn(6, 10, generator=g), torch.randn(12, 6, generator=g), 0.5)
    same, error = truncate(lora, 6)
    assert same is lora and error == 0.0
    low, error = truncate(lora, 2)
    assert low.rank == 2 and 0 < error < 1
    assert error == pytest.approx(float((lora.delta() - low.delta()).norm() / lora.delta().norm()), rel=1e-5)
    sv = torch.linalg.svdvals(lora.delta())
    assert error == pytest.approx(float(sv[2:].norm() / sv.norm()), rel=1e-4)   # Eckart–Young: the optimum


def test_mismatched_adapters_are_refused_in_one_line():
    a = Lora(torch.zeros(2, 4), torch.zeros(3, 2))
    with pytest.raises(NeonError, match=r"^LoRA m: θr's adapter is \(5, 4\), θs's \(3, 4\)$"):
        neon_lora({"m": Lora(torch.zeros(2, 4), torch.zeros(5, 2))}, {"m": a}, W)
    with pytest.raises(NeonError, match=r"^LoRA: θr adapts 'n', which the self-trained adapter does not$"):
        neon_lora({"n": a}, {"m": a}, W)
