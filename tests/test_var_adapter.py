"""The VAR family through the core's protocol: round trip, loss arguments, checkpoint errors, containers."""
from __future__ import annotations

import pytest
import torch

from neon.config import check_args
from neon.errors import NeonError
from neon.family import Family, get_family
from var import checkpoint
from var.adapter import VARFamily
from var.loss import var_loss

FAMILY = VARFamily()


@pytest.fixture()
def saved(tmp_path):
    """A tiny bundle written to disk as a VAR file + a VQVAE file."""
    bundle = FAMILY.tiny(seed=1)
    var_path, vae_path = tmp_path / "var.pth", tmp_path / "vae.pth"
    FAMILY.save(bundle, str(var_path))
    checkpoint.save_state_dict(bundle.helpers["vae"], str(vae_path))
    return bundle, str(var_path), str(vae_path)


def test_family_is_registered_and_implements_the_protocol():
    fam = get_family("var")
    assert isinstance(fam, VARFamily) and isinstance(fam, Family)
    d = fam.train_defaults
    assert (d.optimizer, d.betas, d.weight_decay, d.grad_clip, d.autocast) == ("adamw", (0.9, 0.95), 0.0, 2.0, "fp16")
    assert (d.scaler_init_scale, d.scaler_growth_interval, d.scaler_max_scale) == (2.0 ** 11, 1000, 2.0 ** 15)


def test_tiny_is_reproducible_from_its_seed():
    a, b, c = FAMILY.tiny(seed=5), FAMILY.tiny(seed=5), FAMILY.tiny(seed=6)
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k])
    assert not torch.equal(a.net.head.weight, c.net.head.weight)


def test_round_trip_sample_encode_loss_save_load(saved, tmp_path):
    bundle, var_path, vae_path = saved
    seeds, labels = list(range(6)), torch.tensor([0, 1, 2, 3, 4, 5])
    images = FAMILY.sample(bundle, seeds, labels, cfg=1.5, top_k=900, top_p=0.95)
    R = bundle.resolution
    assert images.shape == (6, R, R, 3) and images.dtype == torch.uint8

    examples = FAMILY.encode(bundle, images, labels)
    assert examples["images"].dtype == torch.uint8 and examples["images"].shape[0] == 6
    assert torch.equal(examples["labels"], labels)
    # A step's tokens are the VQVAE's own: they decode to images of the model's size.
    vae = bundle.helpers["vae"]
    tokens = FAMILY.tokens(bundle, examples["images"])
    assert tokens.shape == (6, bundle.net.L)
    rec = vae.idxBl_to_img(list(tokens.split([p * p for p in bundle.net.patch_nums], 1)))
    assert rec.shape == (6, 3, R, R)

    bundle.net.train()
    loss = FAMILY.loss(bundle, examples)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in bundle.net.parameters())
    assert all(p.grad is None for p in vae.parameters())
    bundle.net.eval()

    FAMILY.save(bundle, str(tmp_path / "again.pth"))
    loaded = FAMILY.load(str(tmp_path / "again.pth"), vae_path=vae_path)
    assert loaded.net.state_dict().keys() == bundle.net.state_dict().keys()
    for k, v in bundle.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.helpers["vae"].state_dict()[k], v), k
    assert (loaded.num_classes, loaded.resolution) == (bundle.num_classes, bundle.resolution)
    assert torch.equal(FAMILY.sample(loaded, seeds, labels, cfg=1.5, top_k=900, top_p=0.95), images)


def test_saved_file_is_a_plain_state_dict(saved):
    bundle, var_path, _ = saved
    sd = torch.load(var_path, weights_only=True)
    assert list(sd) == list(bundle.net.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def random_examples(bundle, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    R = bundle.resolution
    images = torch.randint(0, 256, (n, R, R, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % bundle.num_classes
    return FAMILY.encode(bundle, images, labels)


def seeded(fn, seed: int = 0):
    """fn() right after torch.manual_seed(seed): the same crops (and label draws) for every call."""
    torch.manual_seed(seed)
    return fn()


def test_loss_arguments_label_smoothing_and_label_dropout():
    bundle = FAMILY.tiny(seed=2)
    batch = random_examples(bundle, 4)
    labels = batch["labels"]
    tokens = seeded(lambda: FAMILY.tokens(bundle, batch["images"]))   # the crops the loss draws first
    var, vae = bundle.net, bundle.helpers["vae"]
    args = {"label_smooth": 0.1, "cond_drop_rate": 0.0}
    loss = seeded(lambda: FAMILY.loss(bundle, batch, **args))
    assert torch.allclose(loss, var_loss(var, vae, tokens, labels, 0.1, 0.0))
    assert not torch.allclose(loss, var_loss(var, vae, tokens, labels, 0.0, 0.0))
    null = torch.full_like(labels, bundle.num_classes)   # cond_drop_rate 1: every label becomes the null class
    assert torch.allclose(seeded(lambda: FAMILY.loss(bundle, batch, cond_drop_rate=1.0)),
                          var_loss(var, vae, tokens, null, 0.0, 0.0))
    with pytest.raises(NeonError, match="loss_args.smoothing: unknown argument"):
        check_args(FAMILY.LOSS_ARGS, {"smoothing": 0.1}, "finetune.loss_args")


def test_default_label_dropout_is_official_10_percent():
    bundle = FAMILY.tiny(seed=2)
    assert bundle.net.cond_drop_rate == 0.1
    from var.loss import drop_labels
    torch.manual_seed(0)
    dropped = drop_labels(torch.zeros(20000, dtype=torch.long), 10, 0.1)
    assert 0.09 < (dropped == 10).float().mean() < 0.11


def test_conditional_bundle_without_labels_is_refused():
    bundle = FAMILY.tiny()
    with pytest.raises(NeonError, match="labels are required"):
        FAMILY.sample(bundle, [0, 1], None)
    with pytest.raises(NeonError, match="labels must lie in"):
        FAMILY.sample(bundle, [0], torch.tensor([bundle.num_classes + 1]))
    with pytest.raises(NeonError, match="2 seeds but 1 labels"):
        FAMILY.sample(bundle, [0, 1], torch.tensor([1]))
    with pytest.raises(NeonError, match="autocast must be"):
        FAMILY.sample(bundle, [0], torch.tensor([1]), autocast="fp8")


def test_encode_refuses_wrong_images():
    bundle = FAMILY.tiny()
    R = bundle.resolution
    with pytest.raises(NeonError, match="uint8"):
        FAMILY.encode(bundle, torch.zeros(1, R, R, 3), torch.tensor([0]))
    with pytest.raises(NeonError, match="the model makes"):
        FAMILY.encode(bundle, torch.zeros(1, 2 * R, 2 * R, 3, dtype=torch.uint8), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------------------
def one_line_error(fn, match: str) -> str:
    with pytest.raises(NeonError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_malformed_checkpoint_gives_a_one_line_error(saved, tmp_path):
    _, _, vae_path = saved
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    one_line_error(lambda: FAMILY.load(str(garbage), vae_path=vae_path), "not a readable torch checkpoint")
    one_line_error(lambda: FAMILY.load(str(tmp_path / "missing.pth"), vae_path=vae_path), "not found")
    torch.save({"step": 3, "args": {"lr": 1}}, tmp_path / "nostate.pth")
    one_line_error(lambda: FAMILY.load(str(tmp_path / "nostate.pth"), vae_path=vae_path), "holds no state dict")


def test_mismatched_checkpoint_gives_a_one_line_error(saved, tmp_path):
    bundle, var_path, vae_path = saved
    # the VQVAE file where the VAR is expected, and the other way round
    one_line_error(lambda: FAMILY.load(vae_path, vae_path=vae_path), "not a VAR state dict")
    one_line_error(lambda: FAMILY.load(var_path, vae_path=var_path), "not a VQVAE state dict")
    sd = bundle.net.state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.bias"}
    torch.save(missing, tmp_path / "missing_key.pth")
    one_line_error(lambda: FAMILY.load(str(tmp_path / "missing_key.pth"), vae_path=vae_path), "blocks.1.ffn.fc2.bias")
    extra = dict(sd, **{"blocks.0.attn.extra": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra_key.pth")
    one_line_error(lambda: FAMILY.load(str(tmp_path / "extra_key.pth"), vae_path=vae_path), "1 unexpected")
    wrong = dict(sd, **{"head.bias": torch.zeros(7)})
    torch.save(wrong, tmp_path / "wrong_shape.pth")
    one_line_error(lambda: FAMILY.load(str(tmp_path / "wrong_shape.pth"), vae_path=vae_path), "head.bias has shape")
    other_vae = FAMILY.tiny().helpers["vae"]
    other_vae_sd = {k: v for k, v in other_vae.state_dict().items()}
    other_vae_sd["quantize.embedding.weight"] = torch.zeros(32, 8)       # another vocabulary size
    torch.save(other_vae_sd, tmp_path / "other_vae.pth")
    one_line_error(lambda: FAMILY.load(var_path, vae_path=str(tmp_path / "other_vae.pth")), "does not fit the VAR")


def test_missing_vae_path_is_explained(saved):
    _, var_path, _ = saved
    one_line_error(lambda: FAMILY.load(var_path), "load_args.vae_path")


@pytest.mark.parametrize("wrap", [
    lambda sd: {"trainer": {"var_wo_ddp": sd, "config": {}}, "args": {}},   # Neon's calculate_fid.py container
    lambda sd: {"var_wo_ddp": sd},
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
])
def test_wrapped_state_dicts_load(saved, tmp_path, wrap):
    bundle, _, vae_path = saved
    torch.save(wrap(bundle.net.state_dict()), tmp_path / "wrapped.pth")
    loaded = FAMILY.load(str(tmp_path / "wrapped.pth"), vae_path=vae_path)
    assert torch.equal(loaded.net.head.weight, bundle.net.head.weight)


def test_a_naive_merge_of_the_infinite_mask_buffer_is_harmless(saved, tmp_path):
    """(1+w)·θr - w·θs turns the stored -inf mask entries into NaN; the model derives its mask from lvl_1L."""
    bundle, _, vae_path = saved
    w = 0.5
    merged = {k: (1 + w) * v - w * v if v.is_floating_point() else v for k, v in bundle.net.state_dict().items()}
    assert torch.isnan(merged["attn_bias_for_masking"]).any()
    torch.save(merged, tmp_path / "merged.pth")
    loaded = FAMILY.load(str(tmp_path / "merged.pth"), vae_path=vae_path)
    assert torch.isfinite(FAMILY.loss(loaded, random_examples(loaded, 2), cond_drop_rate=0.0))


def test_cached_examples_of_an_image_do_not_depend_on_its_batch():
    bundle = FAMILY.tiny(seed=7)
    images = FAMILY.sample(bundle, list(range(5)), torch.arange(5), cfg=1.0, top_k=50, top_p=0.9)
    together = FAMILY.encode(bundle, images, torch.arange(5))["images"]
    alone = torch.cat([FAMILY.encode(bundle, images[i:i + 1], torch.tensor([i]))["images"] for i in range(5)])
    assert torch.equal(together, alone)


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the model under .module, forward passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_loss_and_save_see_through_a_ddp_style_wrapper(tmp_path):
    bundle = FAMILY.tiny(seed=8)
    batch = random_examples(bundle, 2)
    plain = seeded(lambda: FAMILY.loss(bundle, batch, cond_drop_rate=0.0))
    inner = bundle.net
    bundle.net = _Wrapper(inner)
    assert torch.allclose(seeded(lambda: FAMILY.loss(bundle, batch, cond_drop_rate=0.0)), plain)
    FAMILY.save(bundle, str(tmp_path / "w.pth"))
    assert list(torch.load(tmp_path / "w.pth", weights_only=True)) == list(inner.state_dict())


def test_self_training_and_the_core_merge_give_a_loadable_sampling_model(saved, tmp_path):
    """tiny θr -> synthetic images -> cached resized images -> a few AdamW steps (θs) -> θneon = (1+w)θr - wθs
    -> load, sample."""
    from neon.merge import merge_state_dicts
    bundle, var_path, vae_path = saved
    theta_r = {k: v.clone() for k, v in bundle.net.state_dict().items()}
    labels = torch.arange(8) % bundle.num_classes
    examples = FAMILY.encode(bundle, FAMILY.sample(bundle, list(range(8)), labels, cfg=1.25, top_k=900, top_p=0.95),
                             labels)
    d = FAMILY.train_defaults
    opt = torch.optim.AdamW(bundle.net.parameters(), lr=1e-3, betas=d.betas, weight_decay=d.weight_decay)
    bundle.net.train()
    for _ in range(3):
        loss = FAMILY.loss(bundle, examples)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bundle.net.parameters(), d.grad_clip)
        opt.step()
    bundle.net.eval()
    theta_s = bundle.net.state_dict()
    assert not torch.equal(theta_s["head.weight"], theta_r["head.weight"])
    torch.save(merge_state_dicts(theta_r, theta_s, w=0.5), tmp_path / "neon.pth")
    neon = FAMILY.load(str(tmp_path / "neon.pth"), vae_path=vae_path)
    images = FAMILY.sample(neon, [0, 1], torch.tensor([0, 1]), cfg=2.0, top_k=900, top_p=0.95)
    assert images.shape == (2, neon.resolution, neon.resolution, 3)
    examples = FAMILY.encode(neon, images, torch.tensor([0, 1]))
    assert torch.isfinite(FAMILY.loss(neon, examples, cond_drop_rate=0.0))
