"""Declared arguments: a typo in a sampler, loss or load argument is refused, for every installed family, by the
config and by the CLI, in one line naming the key and the known ones."""
import importlib.metadata
import re

import pytest

from neon.cli import main
from neon.config import ConfigError, check_args, parse_config
from neon.family import arg_names, get_family

FAMILIES = sorted(ep.name for ep in importlib.metadata.entry_points(group="neon.families"))


def _typo(name: str) -> str:
    return name + "z"


def _kinds(family):
    """(config section, declared arguments, where the config holds them)."""
    return [("sampler", family.SAMPLER_ARGS, lambda d, v: d["synthetic"].update(sampler=v), "synthetic.sampler"),
            ("loss", family.LOSS_ARGS, lambda d, v: d.setdefault("finetune", {}).update(loss_args=v),
             "finetune.loss_args"),
            ("load", family.LOAD_ARGS, lambda d, v: d.update(load_args=v), "load_args")]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_config_typo_is_refused_naming_the_key_and_the_known_ones(name):
    family = get_family(name)
    for _, declared, put, where in _kinds(family):
        key = _typo(declared[0].name) if declared else "anything"
        data = {"family": name, "base": "x.pth", "synthetic": {"num_images": 4}}
        put(data, {key: 1})
        with pytest.raises(ConfigError) as info:
            parse_config(data, family_args=True)
        message = str(info.value)
        assert message.startswith(f"{where}.{key}: unknown argument") and "\n" not in message
        assert all(n in message for n in arg_names(declared)) or (not declared and "known: none" in message)
        put(data, {})
        parse_config(data, family_args=True)   # without the typo the same config passes


@pytest.mark.parametrize("name", FAMILIES)
def test_a_declared_argument_of_the_wrong_type_is_refused(name):
    family = get_family(name)
    typed = [a for a in family.SAMPLER_ARGS + family.LOSS_ARGS if a.type in (int, float)]
    for arg in typed:
        with pytest.raises(ConfigError, match=re.escape(f"x.{arg.name}: expected")):
            check_args((arg,), {arg.name: "not a number"}, "x")


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cli_arg_typo_is_refused_before_sampling(name, tmp_path, capsys):
    family = get_family(name)
    key = _typo(family.SAMPLER_ARGS[0].name)
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as info:
        main(["sample", "--family", name, "--tiny", "--num-images", "2", "--out", str(out), "--arg", f"{key}=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--arg {key}: unknown argument" in err[0]
    assert all(n in err[0] for n in arg_names(family.SAMPLER_ARGS))
    assert not out.exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cli_load_arg_typo_is_refused(name, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--family", name, "--tiny", "--num-images", "2", "--out", str(tmp_path / "s.npz"),
              "--load-arg", "vae_pth=x"])
    err = capsys.readouterr().err.strip()
    assert "--load-arg vae_pth: unknown argument" in err and "\n" not in err


@pytest.mark.parametrize("name", FAMILIES)
def test_an_unbounded_setting_is_a_number_but_nan_is_not(name):
    family = get_family(name)
    for arg in (a for a in family.SAMPLER_ARGS + family.LOSS_ARGS if a.type in (float, float | None)):
        check_args((arg,), {arg.name: float("inf")}, "x")        # e.g. EDM's S_max, whose default is inf
        with pytest.raises(ConfigError, match=re.escape(f"x.{arg.name}: expected a finite number")):
            check_args((arg,), {arg.name: float("nan")}, "x")
