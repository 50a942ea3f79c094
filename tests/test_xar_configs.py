"""The xAR run configs validate and only use arguments the xAR family accepts."""
import inspect
from pathlib import Path

import pytest

from neon.config import load_config
from xar.adapter import XARFamily
from xar.model import CONFIGS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
XAR_CONFIGS = sorted(CONFIG_DIR.glob("xar_*.yaml"))


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters) - {"self", "bundle", "seeds", "labels", "path", "device"}


def test_there_are_xar_configs():
    assert [p.name for p in XAR_CONFIGS] == ["xar_b_256.yaml", "xar_l_256.yaml"]


@pytest.mark.parametrize("path", XAR_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("smoke", [False, True])
def test_config_validates_and_its_arguments_exist(path, smoke):
    cfg = load_config(str(path), smoke=smoke)
    assert cfg.family == "xar"
    assert set(cfg.load_args) <= _params(XARFamily.load)
    assert cfg.load_args.get("model") in CONFIGS
    for sampler in (cfg.synthetic.sampler, cfg.sweep.sampler, cfg.final.sampler):
        assert set(sampler) <= _params(XARFamily.sample)
    assert cfg.sweep.cfg_key in _params(XARFamily.sample)
    assert set(cfg.finetune.loss_args) <= {"label_drop_prob", "logit_mean", "logit_std"}
    if smoke:
        assert cfg.base is None and cfg.ref_stats is None
        assert cfg.synthetic.num_images <= 16 and cfg.final.num_images <= 16 and cfg.finetune.total_images <= 64
