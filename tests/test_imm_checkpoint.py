"""IMM checkpoints: Neon copies of official pickles, our own container, and clear errors."""
import pickle

import pytest
import torch

from imm.adapter import IMMFamily
from imm.checkpoint import load_network, read_checkpoint
from neon import safe_pickle
from neon.errors import NeonError
from neon.family import Bundle


@pytest.fixture(scope="module")
def official_pickle(fixtures):
    (path,) = sorted((fixtures / "imm").glob("*.pkl"))
    return path


def perturbed(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()}


def test_neon_pickle_written_like_the_release_reloads_equal(official_pickle, tmp_path):
    net = load_network(official_pickle)
    new = perturbed(net)
    net.load_state_dict(new)
    out = tmp_path / "neon_imm.pkl"
    IMMFamily().save(Bundle(net=net, source=str(official_pickle)), str(out))
    again = load_network(out)
    for k, v in again.state_dict().items():
        assert torch.equal(v, new[k]), k
    # Same container as the template: same size, same globals, same top-level entries and constructor record.
    assert out.stat().st_size == official_pickle.stat().st_size
    template, copy = safe_pickle.load(str(official_pickle)), safe_pickle.load(str(out))
    assert sorted(copy) == sorted(template)
    assert safe_pickle.init_kwargs(copy["ema"]) == safe_pickle.init_kwargs(template["ema"])


def test_tiny_network_round_trips_through_our_container(tmp_path):
    family = IMMFamily()
    bundle = family.tiny(seed=3)
    path = tmp_path / "tiny.pt"
    family.save(bundle, str(path))
    raw = torch.load(path, weights_only=True)  # plain data: no pickle of our classes
    assert raw["class_name"] == "IMMPrecond" and raw["neon_family"] == "imm"
    reloaded = family.load(str(path), vae_path="tiny")
    for (k, a), (k2, b) in zip(bundle.net.state_dict().items(), reloaded.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    labels = torch.tensor([1, 7])
    assert torch.equal(family.sample(bundle, [4, 5], labels, steps=2), family.sample(reloaded, [4, 5], labels, steps=2))


def test_mismatched_checkpoint_is_a_one_line_error(tmp_path):
    family = IMMFamily()
    bundle = family.tiny()
    path = tmp_path / "tiny.pt"
    family.save(bundle, str(path))
    raw = torch.load(path, weights_only=True)
    raw["init_kwargs"]["hidden_size"] = 48
    torch.save(raw, path)
    with pytest.raises(NeonError) as err:
        load_network(path)
    assert "\n" not in str(err.value) and "shape mismatch" in str(err.value)
    del raw["ema"]["model.pos_embed"]
    raw["init_kwargs"]["hidden_size"] = 32
    torch.save(raw, path)
    with pytest.raises(NeonError, match="missing") as err:
        load_network(path)
    assert "\n" not in str(err.value)


def test_pickle_without_an_imm_network_is_refused(tmp_path):
    path = tmp_path / "other.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": {"weight": 1.0}}, f)
    with pytest.raises(NeonError, match="not an IMM checkpoint"):
        read_checkpoint(path)


def test_save_refuses_a_network_that_does_not_fit_the_template(official_pickle, tmp_path):
    tiny = IMMFamily().tiny()
    with pytest.raises(NeonError):
        IMMFamily().save(Bundle(net=tiny.net, source=str(official_pickle)), str(tmp_path / "x.pkl"))
    assert not (tmp_path / "x.pkl").exists()


def test_temb_type_override_keeps_weights(official_pickle):
    stride = load_network(official_pickle, temb_type="stride")
    identity = load_network(official_pickle, temb_type="identity")
    assert (stride.temb_type, identity.temb_type) == ("stride", "identity")
    for a, b in zip(stride.state_dict().values(), identity.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(NeonError):
        load_network(official_pickle, temb_type="sideways")


def test_pickle_whose_embedded_source_is_not_official_is_refused_unless_trusted(official_pickle, tmp_path, capsys):
    from forked_source import fork_source
    assert fork_source(official_pickle, tmp_path / "fork.pkl") > 0
    with pytest.raises(NeonError, match=r"fork.pkl: the embedded source of .*IMMPrecond.*--trust-architecture") as e:
        load_network(tmp_path / "fork.pkl")
    assert "\n" not in str(e.value)
    net = load_network(tmp_path / "fork.pkl", trust_architecture=True)
    assert "warning:" in capsys.readouterr().err
    reference = load_network(official_pickle).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())
