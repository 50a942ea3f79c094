"""Small inputs that would make a reader allocate gigabytes or wait forever are refused in one short line naming the
file or field, exit status 2, with nothing written: `.npz` members that inflate past neon.images.MAX_INFLATION,
statistics wider than neon.metrics.stats.MAX_DIM, PNG folders that decode past MAX_INFLATION, diffusers configs
past hf_diffusers.config_bounds or unlike their weights, and devices and FIFOs given for any input. An example cache
that is not as it was written is encoded again. The memory cases run under the address-space limit of
test_hostile_configs and every subprocess under a timeout, so a regression fails instead of filling the machine or
hanging."""
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from test_core_bad_input import _finetune, _refused
from test_hostile_configs import _neon

from neon import cli
from neon.checkpoint import load_state_dict
from neon.errors import MAX_LINE
from neon.family import get_family
from neon.images import INFLATION_FLOOR, MAX_INFLATION, save_images_npz
from neon.metrics.stats import MAX_DIM, load_stats, save_stats

GB = 1 << 30
BOMB = 3 * GB   # what each memory case would allocate: past test_hostile_configs.LIMIT with torch imported


def _tree(root) -> dict:
    """Every entry below `root` (links not followed) with its size: what a refused command must leave alone."""
    return {os.path.relpath(os.path.join(d, n), root): os.lstat(os.path.join(d, n)).st_size
            for d, ds, fs in os.walk(root) for n in ds + fs}


def _refused_in_a_subprocess(tmp_path, argv, *named) -> str:
    """`neon ARGV` under the memory limit and a timeout: exit status 2, one short line naming each of `named`,
    and nothing below tmp_path changed."""
    before = _tree(tmp_path)
    res = _neon(*argv, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1 and len(res.stderr) <= MAX_LINE + 1, res.stderr[:1000]
    assert all(str(n) in res.stderr for n in named), res.stderr
    assert _tree(tmp_path) == before
    return res.stderr


def _refused_here(capsys, argv, root) -> str:
    """`neon ARGV` in this process, as test_core_bad_input refuses it, in a line of at most MAX_LINE characters."""
    err = _refused(capsys, argv, root)
    assert len(err) <= MAX_LINE, err
    return err


# ---------------------------------------------------------------------------------------------------------
# .npz files whose members inflate to gigabytes: real deflate streams of zeros, as np.savez_compressed writes them.

_BLOCK = 1 << 20


def _deflated_zeros_npy(descr: str, shape: tuple) -> tuple[bytes, int, int]:
    """(raw deflate stream, CRC-32, size) of a .npy member of zeros, made without holding its data: after a sync
    flush, each further MiB of zeros compresses to the same bytes, so the stream is those bytes repeated."""
    header = _npy_header(descr, shape)
    nbytes = int(np.prod(shape)) * np.dtype(descr).itemsize
    assert nbytes % _BLOCK == 0
    z = bytes(_BLOCK)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(header + z) + c.flush(zlib.Z_SYNC_FLUSH)
    block = c.compress(z) + c.flush(zlib.Z_SYNC_FLUSH)
    assert c.compress(z) + c.flush(zlib.Z_SYNC_FLUSH) == block
    crc = zlib.crc32(header)
    for _ in range(nbytes // _BLOCK):
        crc = zlib.crc32(z, crc)
    return first + block * (nbytes // _BLOCK - 1) + c.flush(), crc, len(header) + nbytes


def _npy_header(descr: str, shape: tuple) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _small_npy(array: np.ndarray) -> tuple[bytes, int, int]:
    data = _npy_header(array.dtype.str, array.shape) + array.tobytes()
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(), zlib.crc32(data), len(data)


def _write_zip(path, members: dict) -> None:
    """A zip of deflated members, name -> (raw stream, CRC-32, size), written field by field."""
    local, central = b"", b""
    for name, (stream, crc, size) in members.items():
        name = (name + ".npy").encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(stream), size,
                               len(name), 0, 0, 0, 0, 0, len(local)) + name
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(stream), size, len(name), 0)
        local += name + stream
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    with open(path, "wb") as f:
        f.write(local + central + end)


def _stats_members(**bombs) -> dict:
    members = {"mu": _small_npy(np.zeros(4)), "sigma": _small_npy(np.eye(4))}
    return {**members, **bombs}


NPZ = {   # name -> (file, its members, the command reading it, what the line names)
    "images-that-inflate-to-3-GB": (
        "images.npz", lambda: {"arr_0": _deflated_zeros_npy("|u1", (BOMB // 12288, 64, 64, 3))},
        ["stats", "--images", "images.npz", "--out", "ref.npz"], "decompression bomb"),
    "statistics-features-that-inflate-to-3-GB": (
        "ref.npz", lambda: _stats_members(features=_deflated_zeros_npy("<f4", (BOMB // 16, 4))),
        ["fid", "--images", "s.npz", "--ref", "ref.npz"], "'features'"),
    "statistics-sigma-of-20480-squared-doubles": (
        "ref.npz", lambda: _stats_members(sigma=_deflated_zeros_npy("<f8", (20480, 20480))),
        ["fid", "--images", "s.npz", "--ref", "ref.npz"], "'sigma' declares (20480, 20480)"),
}


@pytest.mark.parametrize("case", list(NPZ))
def test_an_npz_that_inflates_to_gigabytes_is_refused_before_it_is_read(tmp_path, case):
    file, members, argv, says = NPZ[case]
    _write_zip(tmp_path / file, members())
    save_images_npz(str(tmp_path / "s.npz"), np.zeros((2, 8, 8, 3), np.uint8))
    assert os.path.getsize(tmp_path / file) < 4 << 20
    _refused_in_a_subprocess(tmp_path, argv, file, says)


def test_the_npz_bounds_leave_real_sets_and_statistics_alone(tmp_path):
    """A compressed set of real-looking images and a stored one read back; statistics of MAX_DIM-d features too."""
    from neon.images import open_images
    rng = np.random.default_rng(0)
    images = (rng.normal(128, 40, (64, 32, 32, 3)).clip(0, 255)).astype(np.uint8)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images, arr_1=np.zeros(64, np.int64))
    assert np.array_equal(open_images(str(tmp_path / "packed.npz")).read(0, 64), images)
    blank = np.zeros((INFLATION_FLOOR // 3072 // 8, 32, 32, 3), np.uint8)   # zeros, but under the floor
    np.savez_compressed(tmp_path / "blank.npz", arr_0=blank)
    assert len(open_images(str(tmp_path / "blank.npz"))) == len(blank)
    _write_zip(tmp_path / "wide.npz", {"mu": _small_npy(np.zeros(MAX_DIM)),
                                       "sigma": _deflated_zeros_npy("<f8", (MAX_DIM, MAX_DIM))})
    assert load_stats(tmp_path / "wide.npz").dim == MAX_DIM
    save_stats(tmp_path / "ref.npz", np.zeros(4), np.eye(4), count=2, features=np.ones((8, 4)))
    assert load_stats(tmp_path / "ref.npz").features.shape == (8, 4)
    assert MAX_INFLATION < 1000   # a bomb of zeros deflates about 1000-fold


# ---------------------------------------------------------------------------------------------------------
# PNG folders: each image under PIL's decompression-bomb limit, all of them together gigabytes.

def _png(width: int, height: int, rows: bytes) -> bytes:
    """A 1-bit grey PNG whose pixel rows (each a filter byte and width/8 bytes) are `rows`, zlib-compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


SIDE = 9000   # 81 M pixels: under PIL's limit (89 M), so PIL decodes each one without a word


def test_a_folder_of_pngs_that_decode_to_gigabytes_is_refused_from_their_headers(tmp_path):
    rows = zlib.compress(bytes((1 + SIDE // 8) * SIDE), 9)
    png = _png(SIDE, SIDE, rows)
    (tmp_path / "pngs").mkdir()
    count = BOMB // SIDE ** 2 + 1
    for i in range(count):
        (tmp_path / "pngs" / f"{i:03d}.png").write_bytes(png)
    assert count * len(png) < 1 << 20   # a few hundred KB on disk
    _refused_in_a_subprocess(tmp_path, ["stats", "--images", "pngs", "--out", "ref.npz", "--detector-weights",
                                        "fid-helper"], "pngs", "decompression bomb")


BROKEN_PNG = {   # name -> (bytes of the first image, what the line says)
    "not-an-image": (b"hello, this is text", "not a readable image"),
    "truncated": (None, "not a readable image"),
}


@pytest.mark.parametrize("case", list(BROKEN_PNG))
def test_a_broken_or_truncated_png_is_one_line_naming_it(capsys, tmp_path, base, case):
    from PIL import Image
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    data, says = BROKEN_PNG[case]
    good = (folder / "0.png").read_bytes()
    (folder / "0.png").write_bytes(data if data is not None else good[:len(good) * 2 // 3])
    err = _refused_here(capsys, _finetune(base, folder, tmp_path / "ft"), tmp_path)
    assert f"{folder / '0.png'}: {says}" in err


# ---------------------------------------------------------------------------------------------------------
# Devices and FIFOs given for any input: refused before they are opened (a FIFO's open waits for a writer).

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tinypix checkpoint, an image set and two diffusers pipeline folders (UNet, DiT), outside every test's
    workspace."""
    folder = tmp_path_factory.mktemp("inputs")
    tinypix = get_family("tinypix")
    tinypix.save(tinypix.tiny(seed=1), str(folder / "base.pth"))
    save_images_npz(str(folder / "s.npz"), np.zeros((4, 8, 8, 3), np.uint8))
    diffusers = get_family("diffusers")
    diffusers.save(diffusers.tiny(seed=1, num_classes=4), str(folder / "unet_pipe"))
    diffusers.save(diffusers.tiny(seed=1, model="dit"), str(folder / "dit_pipe"))
    return folder


def _special(path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


SPECIAL = {   # reader -> (the file made special, the command reading it)
    "nvidia-detector-weights": ("w.pkl", ["stats", "--images", "s.npz", "--out", "o.npz", "--detector", "nvidia",
                                          "--detector-weights", "w.pkl"]),
    "inception-weights": ("w.pth", ["stats", "--images", "s.npz", "--out", "o.npz", "--detector-weights", "w.pth"]),
    "image-set": ("x.npz", ["stats", "--images", "x.npz", "--out", "o.npz"]),
    "image-in-a-folder": ("pngs/0.png", ["stats", "--images", "pngs", "--out", "o.npz"]),
    "checkpoint": ("x.pth", ["merge", "--ref", "x.pth", "--synth", "base.pth", "--w", "1", "--out", "o.pth"]),
    "statistics": ("ref.npz", ["fid", "--images", "s.npz", "--ref", "ref.npz"]),
    "diffusers-config": ("pipe/unet/config.json", ["sample", "--family", "diffusers", "--ckpt", "pipe", "--seeds",
                                                   "0-1", "--out", "o.npz"]),
}
KINDS = {"fifo": "a FIFO", "dev-zero": "a device"}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reader", list(SPECIAL))
def test_a_device_or_fifo_given_as_an_input_is_refused_before_it_is_opened(tmp_path, inputs, reader, kind):
    shutil.copy(inputs / "base.pth", tmp_path)
    shutil.copy(inputs / "s.npz", tmp_path)
    shutil.copytree(inputs / "unet_pipe", tmp_path / "pipe")
    (tmp_path / "pngs").mkdir()
    file, argv = SPECIAL[reader]
    if os.path.lexists(tmp_path / file):
        os.remove(tmp_path / file)
    _special(tmp_path / file, kind)
    _refused_in_a_subprocess(tmp_path, argv, file, KINDS[kind])


# ---------------------------------------------------------------------------------------------------------
# diffusers configs: a few hundred bytes that would make the constructor allocate gigabytes.

def _edit_config(folder, rel: str, **changes) -> None:
    path = folder / rel
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


CONFIGS = {   # name -> (pipeline, file, changes, what the line names)
    "a billion classes": ("unet_pipe", "unet/config.json", dict(num_class_embeds=1e9), "num_class_embeds"),
    "16384 channels": ("unet_pipe", "unet/config.json", dict(block_out_channels=[16384, 16384]),
                       "block_out_channels"),
    "a billion training steps": ("unet_pipe", "scheduler/scheduler_config.json", dict(num_train_timesteps=10 ** 9),
                                 "num_train_timesteps"),
    "a DiT of 16384x16384 latents": ("dit_pipe", "transformer/config.json", dict(sample_size=16384), "sample_size"),
    "a VAE of 100 levels": ("dit_pipe", "vae/config.json", dict(block_out_channels=[512] * 100,
                                                                down_block_types=["DownEncoderBlock2D"] * 100,
                                                                up_block_types=["UpDecoderBlock2D"] * 100),
                            "block_out_channels"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_diffusers_config_that_would_allocate_gigabytes_is_refused_before_it_is_built(tmp_path, inputs, case):
    pipeline, rel, changes, says = CONFIGS[case]
    shutil.copytree(inputs / pipeline, tmp_path / "pipe")
    _edit_config(tmp_path / "pipe", rel, **changes)
    assert os.path.getsize(tmp_path / "pipe" / rel) < 12_000
    _refused_in_a_subprocess(tmp_path, ["sample", "--family", "diffusers", "--ckpt", "pipe", "--seeds", "0-1",
                                        "--out", "o.npz"], os.path.join("pipe", rel), says)


MALFORMED = {   # name -> (file, changes, what the line says)
    "a class name that is a list": ("unet/config.json", dict(_class_name=["UNet2DModel"]), "_class_name"),
    "a pipeline name that is a list": ("model_index.json", dict(_class_name=["DDPMPipeline"]), "_class_name"),
    "trained betas that are text": ("scheduler/scheduler_config.json", dict(trained_betas="abc"), "trained_betas"),
    "no training steps": ("scheduler/scheduler_config.json", dict(num_train_timesteps=0), "num_train_timesteps"),
    "a fractional step count": ("scheduler/scheduler_config.json", dict(num_train_timesteps=999.5),
                                "num_train_timesteps"),
    "heads of zero width": ("unet/config.json", dict(attention_head_dim=0), "cannot build UNet2DModel"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_diffusers_config_is_one_line_naming_the_file_and_field(capsys, tmp_path, inputs, case):
    rel, changes, says = MALFORMED[case]
    shutil.copytree(inputs / "unet_pipe", tmp_path / "pipe")
    _edit_config(tmp_path / "pipe", rel, **changes)
    err = _refused_here(capsys, ["sample", "--family", "diffusers", "--ckpt", tmp_path / "pipe", "--seeds", "0-1",
                                 "--out", tmp_path / "o.npz"], tmp_path)
    assert f"{tmp_path / 'pipe' / rel}: " in err and says in err


def test_pipelines_within_the_bounds_still_load(inputs, tmp_path):
    """The tiny pipelines load, a scheduler's trained betas too."""
    family = get_family("diffusers")
    assert family.load(str(inputs / "dit_pipe")).resolution == 8
    shutil.copytree(inputs / "unet_pipe", tmp_path / "pipe")
    _edit_config(tmp_path / "pipe", "scheduler/scheduler_config.json", num_train_timesteps=4,
                 trained_betas=[0.1, 0.2, 0.3, 0.4])
    assert family.load(str(tmp_path / "pipe")).num_classes == 4


# ---------------------------------------------------------------------------------------------------------
# The example cache of self-training: trained on only as it was written for this very set.

def _train(base, data, out) -> dict[str, torch.Tensor]:
    """θs of `neon finetune` on `data` into `out`."""
    cli.main(_finetune(base, data, out))
    snapshots = json.loads((out / "finetune.json").read_text())["snapshots"]
    return load_state_dict(snapshots[-1])


def _tamper(cache, case: str) -> None:
    index = json.loads((cache / "index.json").read_text())
    x = index["keys"]["x"]
    if case == "dtype reinterpreted":
        x["dtype"] = "int32"
    elif case == "rows reshaped":
        x["shape"] = [x["shape"][0], *reversed(x["shape"][1:])]
    elif case == "half the rows":
        x["shape"][0] //= 2
        with open(cache / "x.bin", "r+b") as f:
            f.truncate(os.path.getsize(cache / "x.bin") // 2)
    elif case == "another cache dtype":
        x["dtype"] = "bfloat16"
        with open(cache / "x.bin", "r+b") as f:
            f.truncate(os.path.getsize(cache / "x.bin") // 2)
    elif case == "other bytes":
        data = bytearray((cache / "x.bin").read_bytes())
        data[:4] = struct.pack("<f", 1e30)
        (cache / "x.bin").write_bytes(bytes(data))
    elif case == "no fingerprint":
        del x["sha256"]
    (cache / "index.json").write_text(json.dumps(index))


TAMPERED = ["dtype reinterpreted", "rows reshaped", "half the rows", "another cache dtype", "other bytes",
            "no fingerprint"]


@pytest.fixture(scope="module")
def clean_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "ft"
    return out, _train(base, base["data"], out)


@pytest.mark.parametrize("case", TAMPERED)
def test_an_example_cache_not_as_it_was_written_is_encoded_again(capsys, tmp_path, base, clean_run, case):
    clean, theta_s = clean_run
    shutil.copytree(clean / "examples", tmp_path / "ft" / "examples")
    _tamper(tmp_path / "ft" / "examples", case)
    again = _train(base, base["data"], tmp_path / "ft")
    assert "encoding the examples again" in capsys.readouterr().out
    assert all(torch.equal(again[k], theta_s[k]) for k in theta_s)
    assert (tmp_path / "ft" / "examples" / "index.json").read_text() == (clean / "examples" / "index.json").read_text()


def test_an_untouched_example_cache_is_read_back_without_a_word(capsys, tmp_path, base, clean_run):
    clean, theta_s = clean_run
    shutil.copytree(clean / "examples", tmp_path / "ft" / "examples")
    again = _train(base, base["data"], tmp_path / "ft")
    assert "encoding the examples again" not in capsys.readouterr().out
    assert all(torch.equal(again[k], theta_s[k]) for k in theta_s)
