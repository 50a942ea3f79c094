"""VAR configuration inference from checkpoint shapes, and the quantizer's φ selection."""
from __future__ import annotations

import pytest
import torch

from neon.checkpoint import load_strict
from neon.errors import NeonError
from var import checkpoint
from var.adapter import VARFamily
from var.model import level_index
from var.quant import phi_index


def test_phi_selection_for_the_ten_release_scales():
    # Official PhiPartiallyShared with 4 φ: ticks 1/12 .. 11/12; k=2 and k=7 tie and float64 rounding decides.
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_patch_nums_come_from_the_stored_levels():
    for pns in [(1, 2, 3, 4), (1, 3, 5), checkpoint.RELEASE_PATCH_NUMS[512]]:
        assert checkpoint.patch_nums_from_levels(level_index(pns)) == pns


def test_unknown_layout_without_level_values_asks_for_patch_nums():
    sd = VARFamily().tiny().net.state_dict()
    shapes = checkpoint.shapes_of(sd)
    with pytest.raises(NeonError, match="pass patch_nums="):
        checkpoint.infer_var_kwargs(shapes)                              # shapes alone: L=30 is no release
    assert checkpoint.infer_var_kwargs(shapes, sd["lvl_1L"])["patch_nums"] == (1, 2, 3, 4)
    assert checkpoint.infer_var_kwargs(shapes, patch_nums=[1, 2, 3, 4])["patch_nums"] == (1, 2, 3, 4)


def test_inferred_config_rebuilds_the_same_model():
    for shared_aln in (False, True):
        net = VARFamily().tiny(shared_aln=shared_aln).net
        sd = net.state_dict()
        kwargs = checkpoint.infer_var_kwargs(checkpoint.shapes_of(sd), sd["lvl_1L"])
        assert kwargs["shared_aln"] == shared_aln
        assert (kwargs["depth"], kwargs["embed_dim"], kwargs["num_heads"], kwargs["num_classes"]) == \
            (net.depth, net.C, net.num_heads, net.num_classes)
        cls = type(net)
        rebuilt = load_strict(lambda cls=cls, kwargs=kwargs: cls(**kwargs), sd, "tiny")
        assert rebuilt.state_dict().keys() == sd.keys()


def test_stored_levels_that_contradict_the_given_patch_nums_are_refused(tmp_path):
    bundle = VARFamily().tiny()
    sd = dict(bundle.net.state_dict())
    sd["lvl_1L"] = level_index((1, 2, 3, 4)).flip(-1)        # not a coarse-to-fine layout
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(NeonError):
        checkpoint.load_var(str(tmp_path / "bad.pth"), patch_nums=(1, 2, 3, 4))
