"""Every file the project writes gets the mode an ordinary open() would give it: 0o666 less the umask (0644
under the usual 022), not the 0600 of the temporary files the atomic writers start from."""
import functools
import os
import stat

import numpy as np
import pytest
import torch

from neon.checkpoint import atomic_open, atomic_save, file_mode
from neon.images import save_images_npz
from neon.merge import merge_files
from neon.metrics import save_stats


@functools.lru_cache(maxsize=1)
def tiny_toy_result() -> dict:
    from test_toy import tiny_settings

    from experiments.toy.experiment import run_toy
    return run_toy(seed=0, progress=False, settings=tiny_settings())


WRITERS = {
    "atomic_save": lambda d: [atomic_save({"x": torch.zeros(2)}, str(d / "a.pt")) or d / "a.pt"],
    "atomic_open": lambda d: [_write_text(d / "b.json")],
    "images npz": lambda d: [save_images_npz(str(d / "s.npz"), np.zeros((2, 4, 4, 3), np.uint8)) or d / "s.npz"],
    "statistics": lambda d: [save_stats(str(d / "stats.npz"), np.zeros(3), np.eye(3))],
    "merge": lambda d: _merge(d),
    "toy outputs": lambda d: _toy(d),
}


def _write_text(path):
    with atomic_open(str(path), "w") as f:
        f.write("{}")
    return path


def _merge(d):
    atomic_save({"w": torch.ones(3)}, str(d / "r.pth"))
    atomic_save({"w": torch.zeros(3)}, str(d / "s.pth"))
    merge_files(str(d / "r.pth"), str(d / "s.pth"), [0.5], str(d / "m.pth"))
    return [d / "m.pth"]


def _toy(d):
    from experiments.toy.cli import write_outputs
    return write_outputs(tiny_toy_result(), d / "toy")


@pytest.fixture(params=[0o022, 0o077], ids=lambda u: f"umask{u:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_file_mode_follows_the_current_umask(umask):
    assert file_mode() == 0o666 & ~umask


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_gives_the_umask_respecting_mode(tmp_path, writer, umask):
    paths = [p for p in WRITERS[writer](tmp_path) if p is not None]
    assert paths
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, (path.name, oct(os.stat(path).st_mode))
