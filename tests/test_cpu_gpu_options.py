"""GPU options given for a CPU run (--tf32, the sampler arguments compile and autocast) are named in a one-line
warning each, once per process; autocast is left out there, so CPU images stay the float32 ones."""
import numpy as np
import pytest

from neon import cli, gpu_options
from neon.images import NpzImages


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    monkeypatch.setattr(gpu_options, "_warned", set())   # each test as a new process: nothing warned yet
    monkeypatch.delenv("RANK", raising=False)


def _sample(tmp_path, name, *extra) -> str:
    out = str(tmp_path / f"{name}.npz")
    cli.main(["sample", "--family", "edm", "--tiny", "--seeds", "0-3", "--batch", "2", "--out", out,
              "--arg", "num_steps=3", *extra])
    return out


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_tf32_on_a_cpu_is_named_in_one_warning_line(tmp_path, capsys):
    _sample(tmp_path, "tf32", "--tf32")
    assert _warnings(capsys.readouterr().err) == [f"warning: --tf32 on a CPU: {gpu_options.CPU_WARNINGS['tf32']}"]


def test_autocast_on_a_cpu_is_warned_once_and_gives_the_float32_images(tmp_path, capsys):
    plain = _sample(tmp_path, "plain")
    assert _warnings(capsys.readouterr().err) == []
    bf16 = _sample(tmp_path, "bf16", "--arg", "autocast=bf16")   # two batches, one warning
    assert _warnings(capsys.readouterr().err) == \
        [f"warning: autocast=bf16 on a CPU: {gpu_options.CPU_WARNINGS['autocast']}"]
    assert np.array_equal(NpzImages(bf16).read(0, 4), NpzImages(plain).read(0, 4))


def test_compile_on_a_cpu_is_warned_and_kept(capsys):
    args = {"num_steps": 3, "compile": True}
    assert gpu_options.on_cpu("cpu", args) == args
    assert gpu_options.on_cpu("cpu", args) == args
    assert _warnings(capsys.readouterr().err) == \
        [f"warning: compile=True on a CPU: {gpu_options.CPU_WARNINGS['compile']}"]


def test_gpu_options_on_a_gpu_pass_unchanged_and_unwarned(capsys):
    args = {"compile": True, "autocast": "bf16"}
    assert gpu_options.on_cpu("cuda:0", args, tf32=True) == args
    assert capsys.readouterr().err == ""


def test_only_rank_0_of_a_distributed_job_prints_the_warning(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert gpu_options.on_cpu("cpu", {"autocast": "fp16"}) == {}
    assert capsys.readouterr().err == ""
