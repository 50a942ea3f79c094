"""VAR sampler: per-image seeds, KV cache, the categorical draw, guidance ramp."""
from __future__ import annotations

import pytest
import torch

from var.adapter import VARFamily
from var.sampler import categorical, sample, top_k_top_p_filter

FAMILY = VARFamily()
ARGS = dict(cfg=2.0, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def bundle():
    return FAMILY.tiny(seed=3)


@pytest.fixture(scope="module")
def bundle_saln():
    return FAMILY.tiny(seed=4, shared_aln=True)


def test_image_for_a_seed_is_identical_at_batch_sizes_1_and_7(bundle):
    seeds = [11, 5, 123456, 0, 7, 99, 2 ** 31 - 1]
    labels = torch.tensor([3, 3, 9, 0, 1, 10, 4])          # 10 = the null class (unconditional)
    args = dict(ARGS, batch_invariant=True)
    together = FAMILY.sample(bundle, seeds, labels, **args)
    alone = torch.cat([FAMILY.sample(bundle, [s], labels[i:i + 1], **args) for i, s in enumerate(seeds)])
    chunked = FAMILY.sample(bundle, seeds, labels, batch=3, **args)
    assert torch.equal(together, alone)
    assert torch.equal(together, chunked)


def test_image_for_a_seed_is_identical_at_batch_sizes_1_and_7_with_shared_adaln_and_smoothing(bundle_saln):
    seeds, labels = list(range(40, 47)), torch.arange(7)
    args = dict(ARGS, more_smooth=True, batch_invariant=True)
    together = FAMILY.sample(bundle_saln, seeds, labels, **args)
    alone = torch.cat([FAMILY.sample(bundle_saln, [s], labels[i:i + 1], **args) for i, s in enumerate(seeds)])
    assert torch.equal(together, alone)


def test_images_depend_on_the_seed(bundle):
    labels = torch.tensor([2, 2])
    a = FAMILY.sample(bundle, [1, 2], labels, **ARGS)
    b = FAMILY.sample(bundle, [1, 3], labels, **ARGS)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name", ["bundle", "bundle_saln"])
def test_kv_cache_gives_the_no_cache_reference(request, name):
    b = request.getfixturevalue(name)
    labels = torch.tensor([1, 8, 10])
    stages = {True: {}, False: {}}
    for use_cache in (True, False):
        gens = [torch.Generator().manual_seed(s) for s in (4, 5, 6)]
        sample(b.net, b.helpers["vae"], labels, gens, **ARGS, use_cache=use_cache,
               on_stage=lambda k, d, c=use_cache: stages[c].__setitem__(k, d))
    for k in stages[True]:
        torch.testing.assert_close(stages[True][k]["logits"], stages[False][k]["logits"], atol=1e-5, rtol=1e-5)
        assert torch.equal(stages[True][k]["idx"], stages[False][k]["idx"])


def test_guidance_ramps_from_zero_at_the_first_scale(bundle):
    """At scale 0 the guided logits are the conditional ones whatever cfg is; at the last they differ."""
    labels = torch.tensor([5])
    seen = {}
    for cfg in (0.0, 4.0):
        stages = {}
        sample(bundle.net, bundle.helpers["vae"], labels, [torch.Generator().manual_seed(0)], cfg=cfg, top_k=1,
               on_stage=lambda k, d, stages=stages: stages.__setitem__(k, d))
        seen[cfg] = stages
    assert torch.equal(seen[0.0][0]["logits"], seen[4.0][0]["logits"])
    last = max(seen[0.0])
    assert not torch.allclose(seen[0.0][last]["logits"], seen[4.0][last]["logits"])


def test_categorical_is_the_inverse_cdf_and_never_picks_a_masked_token():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0]).expand(1, 1, -1)
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    tokens = categorical(probs.expand(1, 1000, -1), grid.view(1, -1))
    assert torch.equal(torch.bincount(tokens.view(-1), minlength=6), torch.tensor([0, 250, 0, 500, 250, 0]))
    edge = torch.tensor([[0.0, 1 - 2 ** -53]], dtype=torch.float64)
    assert categorical(probs.expand(1, 2, -1), edge).tolist() == [[1, 4]]


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    logits = torch.randn(2, 3, 8)
    assert torch.equal(top_k_top_p_filter(logits, top_k=900), logits)
