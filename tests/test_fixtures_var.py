"""VAR against the official code's outputs ($NEON_FIXTURES/var; its README says what every tensor is).

Every size and argument comes from the fixture files (io.pt, config.json, the checkpoints' shapes, the
manifests), so another fixture set made the same way passes unchanged. Tolerances are the README's
recommendations for an independent float32 implementation.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import fixtures_root
from neon.checkpoint import load_strict
from var import checkpoint
from var.adapter import VARFamily
from var.loss import per_token_loss, var_loss
from var.model import VAR
from var.quant import phi_index
from var.sampler import sample, top_k_top_p_filter
from var.vqvae import VQVAE

TOL = {
    "latent": dict(atol=2e-5, rtol=1e-4),       # vae.f, f_hat, x_BLCv_wo_first_l
    "image": dict(atol=5e-5, rtol=1e-4),        # decoded images
    "net": dict(atol=1e-4, rtol=1e-4),          # x_BLC_in, block outputs, logits
    "guided": dict(atol=2e-4, rtol=1e-4),       # guided sampling logits
    "sample": dict(atol=5e-5, rtol=0.0),        # sampled images, sampler f_hat
    "loss": dict(atol=1e-5, rtol=0.0),          # scalar losses
    "token_loss": dict(atol=5e-5, rtol=0.0),    # per-token losses
}

# Every tensor in io.pt, by the kind of check that covers it (test_every_io_tensor_is_checked keeps this honest).
IO_PATTERNS = [
    r"config\.(patch_nums|phi_index_per_scale)", r"vae\.(x|f|gt_BL|x_BLCv_wo_first_l)", r"vae\.(idx|fhat)_s\d+",
    r"vae\.(dec_unclamped|rec_from_idx|rec_from_idx_all_scales|rec_from_img|fhat_to_img)",
    r"topkp\.logits_in", r"topkp\.masked_k\d+_p[\d.]+", r"var\.label_B", r"sample\.(label_B|cfg|top_k|top_p)",
    r"\w+\.(x_BLC_in|block\d+_out|logits_BLV|loss_weight|val_loss_mean|val_loss_tail)",
    r"\w+\.loss_(per_token_)?ls[\dp]+", r"\w+\.sample_(img|cfg_logits_s\d+|idx_s\d+|fhat_s\d+)",
]


def var_dir() -> Path:
    return fixtures_root() / "var"


def _classify_checkpoints() -> tuple[list[str], list[str]]:
    """(VQVAE files, VAR files) among the fixture .pth files, told apart by their keys."""
    vaes, vars_ = [], []
    for path in sorted(var_dir().glob("*.pth")) if var_dir().is_dir() else []:
        keys = torch.load(path, map_location="cpu", weights_only=True).keys()
        (vaes if "quantize.embedding.weight" in keys else vars_).append(path.name)
    return vaes, vars_


VAE_FILES, VAR_FILES = _classify_checkpoints()
MANIFESTS = sorted(p.name for p in var_dir().glob("manifest_*.json")) if var_dir().is_dir() else []


@pytest.fixture(scope="module")
def io(fixtures) -> dict[str, torch.Tensor]:
    return torch.load(fixtures / "var" / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def config(fixtures) -> dict:
    return json.loads((fixtures / "var" / "config.json").read_text())


@pytest.fixture(scope="module")
def vae(io, fixtures) -> VQVAE:
    assert len(VAE_FILES) == 1, f"expected one VQVAE checkpoint, found {VAE_FILES}"
    model, _ = checkpoint.load_vqvae(str(fixtures / "var" / VAE_FILES[0]), io["config.patch_nums"].tolist())
    return model


def patch_nums(io) -> list[int]:
    return io["config.patch_nums"].tolist()


def idx_list(io) -> list[torch.Tensor]:
    return [io[f"vae.idx_s{k}"] for k in range(len(patch_nums(io)))]


def io_prefix(io, var_file: str) -> str:
    """The io.pt prefix of a VAR file's outputs: var_tiny.pth -> 'var', var_tiny_saln.pth -> 'var_saln'."""
    prefix = Path(var_file).stem.replace("_tiny", "")
    assert any(k.startswith(prefix + ".") for k in io), f"no outputs for {var_file} (prefix {prefix!r}) in io.pt"
    return prefix


def assert_close(actual, expected, kind: str, name: str):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[kind], msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
def test_every_fixture_file_is_exercised(fixtures):
    names = {p.name for p in (fixtures / "var").iterdir()}
    covered = {"README.md", "config.json", "io.pt"} | set(VAE_FILES) | set(VAR_FILES) | set(MANIFESTS)
    assert names == covered
    assert VAR_FILES and MANIFESTS


def test_every_io_tensor_is_checked(io):
    unchecked = [k for k in io if not any(re.fullmatch(p, k) for p in IO_PATTERNS)]
    assert not unchecked


def test_fixture_config_is_what_the_loaders_infer(io, config, fixtures):
    """config.json's constructor arguments are what checkpoint inference finds in the files' shapes."""
    _, vae_kwargs = checkpoint.load_vqvae(str(fixtures / "var" / VAE_FILES[0]), patch_nums(io))
    for key in ("vocab_size", "z_channels", "ch", "num_res_blocks", "quant_resi", "share_quant_resi",
                "using_sa", "using_mid_sa", "quant_conv_ks"):
        assert vae_kwargs[key] == config["vqvae_constructor"][key], key
    assert list(vae_kwargs["ch_mult"]) == config["vqvae_constructor"]["ch_mult"]
    for name in VAR_FILES:
        _, kw = checkpoint.load_var(str(fixtures / "var" / name))
        expected = config["var_constructor"]
        for key in ("num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "attn_l2_norm"):
            assert kw[key] == expected[key], (name, key)
        assert list(kw["patch_nums"]) == expected["patch_nums"] == patch_nums(io)
        assert kw["shared_aln"] == expected["shared_aln"][name]


def test_phi_index_per_scale(io):
    S = len(patch_nums(io))
    K = json.loads((var_dir() / "config.json").read_text())["vqvae_constructor"]["share_quant_resi"]
    assert [phi_index(k, S, K) for k in range(S)] == io["config.phi_index_per_scale"].tolist()


# ---------------------------------------------------------------------------------------------------------
def test_vqvae_encode_matches_official(io, vae):
    x = io["vae.x"]
    assert_close(vae.img_to_f(x), io["vae.f"], "latent", "vae.f")
    ours = vae.img_to_idxBl(x)
    assert len(ours) == len(patch_nums(io))
    for k, idx in enumerate(ours):
        assert torch.equal(idx, io[f"vae.idx_s{k}"]), f"vae.idx_s{k}"
    assert torch.equal(torch.cat(ours, dim=1), io["vae.gt_BL"])


def test_vqvae_fhat_and_teacher_forcing_input_match_official(io, vae):
    from_latent = vae.quantize.f_to_idxBl_or_fhat(io["vae.f"], to_fhat=True)
    from_indices = vae.quantize.idx_to_fhat(idx_list(io))
    for k in range(len(patch_nums(io))):
        assert_close(from_latent[k], io[f"vae.fhat_s{k}"], "latent", f"vae.fhat_s{k} (from f)")
        assert_close(from_indices[k], io[f"vae.fhat_s{k}"], "latent", f"vae.fhat_s{k} (from indices)")
    assert_close(vae.quantize.idxBl_to_var_input(idx_list(io)), io["vae.x_BLCv_wo_first_l"], "latent",
                 "vae.x_BLCv_wo_first_l")


@torch.no_grad()
def test_vqvae_decode_matches_official(io, vae):
    S = len(patch_nums(io))
    f_last = io[f"vae.fhat_s{S - 1}"]
    assert_close(vae.decoder(vae.post_quant_conv(f_last)), io["vae.dec_unclamped"], "image", "vae.dec_unclamped")
    assert_close(vae.idxBl_to_img(idx_list(io)), io["vae.rec_from_idx"], "image", "vae.rec_from_idx")
    all_scales = torch.stack(vae.idxBl_to_img(idx_list(io), last_one=False))
    assert_close(all_scales, io["vae.rec_from_idx_all_scales"], "image", "vae.rec_from_idx_all_scales")
    assert_close(vae.img_to_reconstructed_img(io["vae.x"]), io["vae.rec_from_img"], "image", "vae.rec_from_img")
    assert_close(vae.fhat_to_img(f_last), io["vae.fhat_to_img"], "image", "vae.fhat_to_img")


def test_top_k_top_p_masks_match_official(io):
    keys = [k for k in io if k.startswith("topkp.masked_")]
    assert keys
    for key in keys:
        k, p = re.fullmatch(r"topkp\.masked_k(\d+)_p([\d.]+)", key).groups()
        ours = top_k_top_p_filter(io["topkp.logits_in"], top_k=int(k), top_p=float(p))
        expected = io[key]
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), key
        assert torch.equal(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)]), key


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=VAR_FILES)
def var_case(request, io, fixtures):
    """(bundle loaded by the adapter, io prefix) for one VAR fixture file."""
    bundle = VARFamily().load(str(fixtures / "var" / request.param), vae_path=str(fixtures / "var" / VAE_FILES[0]))
    return bundle, io_prefix(io, request.param)


@torch.no_grad()
def test_teacher_forced_blocks_and_logits_match_official(io, var_case):
    bundle, prefix = var_case
    var = bundle.net
    seen = {}
    hooks = [var.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x_BLC_in", args[0]))]
    for i, block in enumerate(var.blocks):
        hooks.append(block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(f"block{i}_out", out)))
    try:
        logits = var(io["var.label_B"], io["vae.x_BLCv_wo_first_l"])   # labels include the null class
    finally:
        for h in hooks:
            h.remove()
    assert (io["var.label_B"] == var.num_classes).any(), "the fixture should exercise the null class"
    recorded = [k for k in io if re.fullmatch(rf"{re.escape(prefix)}\.(x_BLC_in|block\d+_out)", k)]
    assert recorded
    for key in recorded:
        assert_close(seen[key.split(".", 1)[1]], io[key], "net", key)
    assert_close(logits, io[f"{prefix}.logits_BLV"], "net", f"{prefix}.logits_BLV")


@torch.no_grad()
def test_losses_match_official(io, config, var_case):
    bundle, prefix = var_case
    var, vae = bundle.net, bundle.helpers["vae"]
    gt, labels = io["vae.gt_BL"], io["var.label_B"]
    logits = io[f"{prefix}.logits_BLV"]
    assert_close(torch.full((1, var.L), 1.0 / var.L), io[f"{prefix}.loss_weight"], "loss", "loss_weight")
    smoothings = [k[len(prefix) + len(".loss_ls"):] for k in io if k.startswith(f"{prefix}.loss_ls")]
    assert smoothings
    for tag in smoothings:
        ls = float(tag.replace("p", "."))
        assert_close(per_token_loss(logits, gt, ls), io[f"{prefix}.loss_per_token_ls{tag}"], "token_loss",
                     f"loss_per_token_ls{tag}")
        # The whole path: tokens -> teacher-forcing input -> network -> weighted CE, with the label dropout rate
        # the fixture's models were built with (config.json; README: 0, so that no label is drawn away).
        drop = config["var_constructor"]["cond_drop_rate"]
        assert_close(var_loss(var, vae, gt, labels, label_smooth=ls, cond_drop_rate=drop),
                     io[f"{prefix}.loss_ls{tag}"], "loss", f"loss_ls{tag}")
    V, tail = logits.shape[-1], patch_nums(io)[-1] ** 2
    ce = torch.nn.functional.cross_entropy
    assert_close(ce(logits.reshape(-1, V), gt.reshape(-1)), io[f"{prefix}.val_loss_mean"], "loss", "val_loss_mean")
    assert_close(ce(logits[:, -tail:].reshape(-1, V), gt[:, -tail:].reshape(-1)), io[f"{prefix}.val_loss_tail"],
                 "loss", "val_loss_tail")


def sampler_args(io, config) -> dict:
    """The recorded sampler call. Our per-image generators cannot replay the official shared RNG stream, so the
    comparison needs the README's greedy call (top_k = 1, no Gumbel smoothing), where no draw matters."""
    greedy = int(io["sample.top_k"]) == 1 and not config["sample"]["more_smooth"]
    assert greedy, "the fixture's sample draws at random (top_k != 1 or more_smooth): it cannot be replayed"
    return dict(cfg=float(io["sample.cfg"]), top_k=int(io["sample.top_k"]), top_p=float(io["sample.top_p"]),
                more_smooth=bool(config["sample"]["more_smooth"]))


def test_greedy_cfg_sampling_matches_official(io, config, var_case):
    """The README's greedy call (top_k = 1): per-scale guided logits, tokens and f_hat, and the image."""
    bundle, prefix = var_case
    labels = io["sample.label_B"]
    stages = {}
    gens = [torch.Generator().manual_seed(seed) for seed in range(labels.shape[0])]   # greedy: any seed
    img = sample(bundle.net, bundle.helpers["vae"], labels, gens, **sampler_args(io, config),
                 on_stage=lambda k, d: stages.__setitem__(k, d))
    assert len(stages) == len(patch_nums(io))
    for k, d in stages.items():
        assert_close(d["logits"], io[f"{prefix}.sample_cfg_logits_s{k}"], "guided", f"sample_cfg_logits_s{k}")
        assert torch.equal(d["idx"], io[f"{prefix}.sample_idx_s{k}"]), f"{prefix}.sample_idx_s{k}"
        assert_close(d["f_hat"], io[f"{prefix}.sample_fhat_s{k}"], "sample", f"sample_fhat_s{k}")
    assert_close(img, io[f"{prefix}.sample_img"], "sample", f"{prefix}.sample_img")


def test_adapter_sample_is_the_official_image_as_uint8(io, config, var_case):
    bundle, prefix = var_case
    labels = io["sample.label_B"]
    ours = VARFamily().sample(bundle, list(range(100, 100 + labels.shape[0])), labels, autocast=None,
                              **sampler_args(io, config))
    expected = (io[f"{prefix}.sample_img"].clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert ours.dtype == torch.uint8 and ours.shape == expected.shape
    assert (ours.int() - expected.int()).abs().max() <= 1   # floor(255x) may flip where x sits on a boundary


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MANIFESTS)
def test_release_manifest_strict_loads_on_meta(name, fixtures):
    """The released checkpoint's [key, shape, dtype] list, in order, is what our model built at the config
    inferred from those shapes has, and it strict-loads."""
    manifest = json.loads((fixtures / "var" / name).read_text())
    entries = manifest["state_dict"]
    shapes = {k: tuple(s) for k, s, _ in entries}
    if manifest["model"].endswith("VQVAE"):
        cls, kwargs = VQVAE, checkpoint.infer_vqvae_kwargs(shapes, manifest["build_kwargs"]["v_patch_nums"])
    else:
        cls, kwargs = VAR, checkpoint.infer_var_kwargs(shapes)     # no values on meta: patch_nums from L
        built = manifest["build_kwargs"]
        assert list(kwargs["patch_nums"]) == built["patch_nums"]
        assert (kwargs["depth"], kwargs["shared_aln"], kwargs["num_classes"]) == \
            (built["depth"], built["shared_aln"], built["num_classes"])
        assert kwargs["embed_dim"] == manifest["derived"]["embed_dim"]
        assert kwargs["num_heads"] == manifest["derived"]["num_heads"]
    model = checkpoint.build(cls, kwargs, device="meta")
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == entries
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    state = {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, s, d in entries}
    load_strict(lambda: cls(**kwargs), state, name)
