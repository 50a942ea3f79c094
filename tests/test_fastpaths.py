"""The GPU fast paths (torch.compile, channels-last, bf16 autocast, TF32) give the eager float32 images to
within rounding, and leave the network and the backend flags as they were. On CPU, compile runs with the
'aot_eager' backend: the same graph capture as inductor without its minutes of code generation."""
import pytest
import torch

from edm.adapter import EDMFamily
from imm.adapter import IMMFamily
from neon import fastpaths
from neon.errors import NeonError

SEEDS = [3, 1, 4, 1000]
LABELS = torch.tensor([1, 5, 9, 0])


@pytest.fixture(scope="module")
def edm():
    family = EDMFamily()
    bundle = family.tiny(seed=2)
    return family, bundle, family.sample(bundle, SEEDS, LABELS, num_steps=3)


def _state(net):
    return {k: (v.clone(), v.is_contiguous()) for k, v in net.state_dict().items()}


def _same_network(before, net):
    after = _state(net)
    assert list(after) == list(before)
    assert all(torch.equal(after[k][0], before[k][0]) and after[k][1] == before[k][1] for k in before)
    assert "forward" not in net.__dict__


def test_compiled_unet_gives_the_eager_images_and_leaves_the_network_as_it_was(edm):
    family, bundle, eager = edm
    before = _state(bundle.net)
    images = family.sample(bundle, SEEDS, LABELS, num_steps=3, compile="aot_eager")
    assert (images.int() - eager.int()).abs().max() <= 1
    _same_network(before, bundle.net)


def test_channels_last_unet_gives_the_eager_images_and_restores_the_layout(edm):
    family, bundle, eager = edm
    before = _state(bundle.net)
    images = family.sample(bundle, SEEDS, LABELS, num_steps=3, channels_last=True)
    assert (images.int() - eager.int()).abs().max() <= 1
    _same_network(before, bundle.net)


def test_bf16_autocast_stays_near_the_float32_images(edm):
    family, bundle, eager = edm
    images = family.sample(bundle, SEEDS, LABELS, num_steps=3, autocast="bf16")
    diff = (images.int() - eager.int()).abs().float()
    assert 0 < diff.mean() <= 4   # bf16 keeps 8 bits of mantissa: a few uint8 steps on a random network


def test_compiled_dit_gives_the_eager_images():
    family = IMMFamily()
    bundle = family.tiny(seed=1)
    eager = family.sample(bundle, SEEDS, LABELS, steps=2)
    before = _state(bundle.net)
    images = family.sample(bundle, SEEDS, LABELS, steps=2, compile="aot_eager")
    assert (images.int() - eager.int()).abs().max() <= 1
    _same_network(before, bundle.net)
    assert "forward" not in bundle.net.model.__dict__


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile replaced by a recorder of its keyword arguments that returns the function as it is."""
    calls = []

    def record(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", record)
    return calls


@pytest.mark.parametrize("setting, kwargs", [("reduce-overhead", {"mode": "reduce-overhead"}),
                                             ("max-autotune", {"mode": "max-autotune"}),
                                             (True, {}), ("true", {}), ("aot_eager", {"backend": "aot_eager"})])
def test_a_compile_setting_reaches_torch_compile_as_a_mode_or_a_backend(compile_calls, setting, kwargs):
    net = torch.nn.Linear(2, 2)
    with fastpaths.compiled(net, setting):
        net(torch.zeros(1, 2))
    assert compile_calls == [kwargs]
    assert "forward" not in net.__dict__


@pytest.mark.parametrize("setting", [False, "false", "False", None, "none"])
def test_a_compile_setting_of_false_does_not_compile(compile_calls, setting):
    with fastpaths.compiled(torch.nn.Linear(2, 2), setting):
        pass
    assert compile_calls == []


def test_the_samplers_compile_argument_is_passed_as_torch_compiles_mode(edm, compile_calls):
    family, bundle, eager = edm
    images = family.sample(bundle, SEEDS, LABELS, num_steps=3, compile="reduce-overhead")
    assert compile_calls == [{"mode": "reduce-overhead"}]
    assert torch.equal(images, eager)   # the recorder runs the eager forward


def test_an_unknown_compile_setting_is_refused_naming_the_modes():
    with pytest.raises(NeonError, match="reduce-overhead"):
        with fastpaths.compiled(torch.nn.Linear(2, 2), "fast-please"):
            pass


def test_tf32_is_scoped_to_its_block():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with fastpaths.tf32():
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with fastpaths.tf32(False):
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
