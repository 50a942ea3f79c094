"""Outputs never follow or replace what they did not write: an output is never an input, nor holds one, nor lies
inside one; `--force` replaces a folder only where a merge wrote it; a folder copy takes regular files only; and a
name planted in an output folder as a link is never written through. Each refusal is one line naming the entry,
exit status 2, and every file inside and outside the workspace is as it was."""
import json
import os
import socket
import stat
import struct

import pytest
import torch
from test_core_bad_input import _finetune, _sample
from test_malformed_files import safetensors_bytes

from neon import cli, paths
from neon.pipeline_folder import MARKER

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _snapshot(root) -> dict:
    """Every entry below `root`, links not followed: a file's bytes, a link's target, or its kind."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            found[os.path.relpath(path, root)] = (
                open(path, "rb").read() if stat.S_ISREG(mode) else ("link", os.readlink(path))
                if stat.S_ISLNK(mode) else ("kind", stat.S_IFMT(mode)))
    return found


def _refused(capsys, argv, root) -> str:
    """Run `neon ARGV` in this process: exit status 2, one line on stderr, and nothing below `root` changed."""
    before = _snapshot(root)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    assert _snapshot(root) == before
    return err


def _pipeline(folder, value: float) -> None:
    """A diffusers pipeline folder whose network is one 4-float tensor `w` filled with `value`."""
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    files = {"model_index.json": json.dumps({"_class_name": "DDPMPipeline"}).encode(),
             "scheduler/scheduler_config.json": b"{}",
             "unet/config.json": json.dumps({"_class_name": "UNet2DModel"}).encode(),
             WEIGHTS: safetensors_bytes(header, struct.pack("<4f", *[value] * 4))}
    for name, data in files.items():
        os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """tmp_path/ws, the working folder: pipelines ref/ and synth/, a file of the user's; and tmp_path/outside,
    which holds a secret and a victim that nothing may touch."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text("secret key")
    (tmp_path / "outside" / "victim").write_text("victim")
    _pipeline(tmp_path / "ws" / "ref", 1.0)
    _pipeline(tmp_path / "ws" / "synth", 0.5)
    (tmp_path / "ws" / "notes.txt").write_text("the user's notes")
    monkeypatch.chdir(tmp_path / "ws")
    return tmp_path


def _merge(out, *extra, ref="ref", synth="synth", w="1"):
    return ["merge", "--ref", ref, "--synth", synth, "--w", w, "--out", out, *extra]


# ---------------------------------------------------------------------------------------------------------
# Merge outputs and inputs.

INPUT_OVERLAPS = [  # (--out, what the one line says)
    (".", "holds the input ref"),
    ("..", "holds the input ref"),
    ("ref", "is the input ref"),
    ("./synth/", "is the input synth"),
    ("alias/ref", "is the input ref"),              # the same folder through a link
    ("ref/unet/neon", "lies inside the input folder ref"),
]


@pytest.mark.parametrize("out,message", INPUT_OVERLAPS, ids=[o for o, _ in INPUT_OVERLAPS])
def test_a_merge_output_that_is_holds_or_lies_inside_an_input_is_refused_even_with_force(capsys, ws, out,
                                                                                          message):
    os.symlink(ws / "ws", ws / "ws" / "alias")
    assert message in _refused(capsys, _merge(out, "--force"), ws)


def test_a_file_merge_never_replaces_its_input_but_replaces_another_file_with_force(capsys, ws):
    for name in ("ref", "synth"):
        os.replace(ws / "ws" / name / WEIGHTS, ws / "ws" / f"{name}.safetensors")
    (ws / "ws" / "old.safetensors").write_bytes(b"an earlier output")
    files = {"ref": "ref.safetensors", "synth": "synth.safetensors"}
    assert "is the input ref.safetensors" in _refused(capsys, _merge("ref.safetensors", "--force", **files), ws)
    assert "exists (use --force" in _refused(capsys, _merge("old.safetensors", **files), ws)
    cli.main(_merge("old.safetensors", "--force", **files))
    assert (ws / "ws" / "old.safetensors").read_bytes() != b"an earlier output"


def _planted(ws, kind: str) -> str:
    """An existing --out folder the merge did not write (or wrote, and someone added to)."""
    out = ws / "ws" / "neon"
    if kind == "link":
        os.symlink(ws / "outside", out)
        return "is a symbolic link"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    if kind == "no-marker":
        return "was not written by neon"
    (out / MARKER).write_text(json.dumps({"written_by": "neon", "files": ["model_index.json"]}))
    return "holds mine.txt, which neon did not write"


@pytest.mark.parametrize("kind", ["no-marker", "file-added", "link"])
def test_force_never_replaces_a_folder_the_merge_did_not_write(capsys, ws, kind):
    message = _planted(ws, kind)
    err = _refused(capsys, _merge("neon", "--force"), ws)
    assert message in err and "neon" in err


def test_force_replaces_a_folder_an_earlier_merge_wrote(capsys, ws):
    cli.main(_merge("neon"))
    listed = json.loads((ws / "ws" / "neon" / MARKER).read_text())["files"]
    assert sorted(listed) == sorted(p for p in _snapshot(ws / "ws" / "ref") if os.path.isfile(ws / "ws" / "ref" / p))
    first = (ws / "ws" / "neon" / WEIGHTS).read_bytes()
    cli.main(_merge("neon", "--force", w="3"))
    assert (ws / "ws" / "neon" / WEIGHTS).read_bytes() != first
    assert sorted(os.listdir(ws / "ws")) == ["neon", "notes.txt", "ref", "synth"]   # nothing left beside it


# ---------------------------------------------------------------------------------------------------------
# Folder copies: regular files only.

def _hostile_entry(ref, kind: str, outside) -> str:
    """Put an entry of `kind` into the reference folder; returns its path relative to the folder."""
    if kind == "link-to-secret":
        os.symlink(outside / "id_rsa", ref / "README.md")
        return "README.md"
    if kind == "link-to-dev-zero":
        os.symlink("/dev/zero", ref / "scheduler" / "big.bin")
        return "scheduler/big.bin"
    if kind == "link-loop":
        os.symlink(".", ref / "scheduler" / "loop")
        return "scheduler/loop"
    if kind == "link-as-weights":
        os.replace(ref / WEIGHTS, outside / "weights.safetensors")
        os.symlink(outside / "weights.safetensors", ref / WEIGHTS)
        return WEIGHTS
    if kind == "fifo":
        os.mkfifo(ref / "fifo")
        return "fifo"
    if kind == "device":
        try:   # /dev/zero's numbers; making a device needs privileges a test may not have
            os.mknod(ref / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        except PermissionError:
            pytest.skip("cannot make a device file here")
        return "zero"
    cwd = os.getcwd()
    os.chdir(ref)   # a socket's path is limited to about 100 bytes: bind it by its relative name
    try:
        socket.socket(socket.AF_UNIX).bind("sock")
    finally:
        os.chdir(cwd)
    return "sock"


HOSTILE = {"link-to-secret": "a symbolic link", "link-to-dev-zero": "a symbolic link", "link-loop": "a symbolic link",
           "link-as-weights": "a symbolic link", "fifo": "a FIFO", "socket": "a socket", "device": "a device"}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_reference_folder_holding_anything_but_regular_files_is_refused_before_writing(capsys, ws, kind):
    entry = _hostile_entry(ws / "ws" / "ref", kind, ws / "outside")
    err = _refused(capsys, _merge("neon"), ws)
    assert f"{ws / 'ws' / 'ref' / entry}: is {HOSTILE[kind]}; only regular files are copied" in err, err


def test_a_hub_cache_snapshot_is_copied_as_regular_files(capsys, ws):
    """The Hub's cache keeps a snapshot's files as links into the repo's blobs/: those are followed, nothing else."""
    repo = ws / "ws" / "hub" / "models--org--pipe"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for rel in [p for p in _snapshot(ws / "ws" / "ref") if os.path.isfile(ws / "ws" / "ref" / p)]:
        blob = repo / "blobs" / rel.replace("/", "-")
        os.replace(ws / "ws" / "ref" / rel, blob)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / rel).parent), snapshot / rel)
    cli.main(_merge("neon", ref=str(snapshot)))
    out = ws / "ws" / "neon"
    assert all(isinstance(v, bytes) for k, v in _snapshot(out).items() if os.path.isfile(out / k))
    assert (out / "model_index.json").read_bytes() == (repo / "blobs" / "model_index.json").read_bytes()
    os.symlink(ws / "outside" / "id_rsa", snapshot / "README.md")   # a link out of blobs/ is still refused
    assert "README.md: is a symbolic link" in _refused(capsys, _merge("neon2", ref=str(snapshot)), ws)


# ---------------------------------------------------------------------------------------------------------
# Names planted in output folders.

@pytest.mark.parametrize("name", ["s.npz.lock", "s.npz.shards"])
def test_sampling_never_writes_through_a_link_planted_at_its_lock_or_shards(capsys, ws, base, name):
    os.symlink(ws / "outside" / ("victim" if name.endswith(".lock") else ""), ws / "ws" / name)
    err = _refused(capsys, _sample(base, "s.npz", "--batch", "2"), ws)
    assert f" {name}: is a symbolic link" in err, err


def test_sampling_removes_only_its_own_shards_from_an_existing_shards_folder(capsys, ws, base):
    (ws / "ws" / "s.npz.shards").mkdir()
    (ws / "ws" / "s.npz.shards" / "keep.txt").write_text("the user's")
    cli.main(_sample(base, "s.npz", "--batch", "2"))
    assert (ws / "ws" / "s.npz").is_file()
    assert os.listdir(ws / "ws" / "s.npz.shards") == ["keep.txt"]


PLANTED = {  # name in the finetune --out folder -> where its link points
    "log.jsonl": "victim",
    "examples": "",               # the cache folder itself
    "examples/x.bin": "victim",   # one of the cache's files (tinypix encodes `x` and `label`)
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_finetune_never_writes_through_a_link_planted_in_its_folder(capsys, ws, base, name):
    os.makedirs(ws / "ws" / "ft" / os.path.dirname(name), exist_ok=True)
    os.symlink(ws / "outside" / PLANTED[name], ws / "ws" / "ft" / name)
    err = _refused(capsys, _finetune(base, base["data"], "ft"), ws)
    assert f"ft/{name}: is a symbolic link" in err, err


def test_an_atomic_write_never_follows_a_link_planted_at_its_temporary_name(capsys, ws):
    for name in ("ref", "synth"):
        os.replace(ws / "ws" / name / WEIGHTS, ws / "ws" / f"{name}.safetensors")
    os.symlink(ws / "outside" / "victim", paths.temp_path(str(ws / "ws" / "neon.safetensors")))
    err = _refused(capsys, _merge("neon.safetensors", ref="ref.safetensors", synth="synth.safetensors"), ws)
    assert "neon-tmp" in err and "is a symbolic link" in err


def test_the_cases_above_are_well_formed(ws, base):
    """With nothing planted the workspace merges, samples and self-trains: each refusal above is the plant's."""
    cli.main(_merge("neon"))
    merged = torch.frombuffer(bytearray((ws / "ws" / "neon" / WEIGHTS).read_bytes()[-16:]), dtype=torch.float32)
    assert torch.equal(merged, torch.full((4,), 1.5))   # (1+w)·1 − w·0.5 at w = 1
    cli.main(_sample(base, "s.npz", "--batch", "2"))
    assert (ws / "ws" / "s.npz").is_file() and not (ws / "ws" / "s.npz.shards").exists()
    cli.main(_finetune(base, base["data"], "ft"))
    assert (ws / "ws" / "ft" / "log.jsonl").is_file() and (ws / "ws" / "ft" / "examples" / "x.bin").is_file()


@pytest.mark.parametrize("case", ["stats out is the images", "stats out exists", "fid json is the reference",
                                  "fid json is the images"])
def test_metric_outputs_never_name_an_input_nor_replace_a_file_unasked(tmp_path, capsys, case):
    import numpy as np

    from neon.images import save_images_npz
    from neon.metrics import save_stats
    images, ref, out = tmp_path / "images.npz", tmp_path / "ref.npz", tmp_path / "stats.npz"
    save_images_npz(str(images), np.zeros((4, 8, 8, 3), np.uint8), None)
    save_stats(str(ref), np.zeros(2048), np.eye(2048), count=4)
    out.write_bytes(b"statistics of another day")
    argv, expected = {
        "stats out is the images": (["stats", "--images", images, "--out", images], "is the input"),
        "stats out exists": (["stats", "--images", images, "--out", out], "exists (use --force to replace it)"),
        "fid json is the reference": (["fid", "--images", images, "--ref", ref, "--json", ref], "is the input"),
        "fid json is the images": (["fid", "--images", images, "--ref", ref, "--json", images], "is the input"),
    }[case]
    assert expected in _refused(capsys, argv + ["--detector-weights", "fid-helper"], tmp_path)


def test_statistics_record_their_detector_and_another_detectors_are_refused_in_one_line(tmp_path, capsys):
    import numpy as np

    from neon.images import save_images_npz
    from neon.metrics import load_stats, save_stats
    images = tmp_path / "images.npz"
    save_images_npz(str(images), np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), None)
    cli.main(["stats", "--images", str(images), "--out", str(tmp_path / "ref.npz"), "--detector-weights", "fid-helper",
              "--quiet"])
    assert load_stats(tmp_path / "ref.npz").detector == "inception-v3-compat"
    err = _refused(capsys, ["fid", "--images", images, "--ref", tmp_path / "ref.npz", "--detector", "nvidia",
                            "--inception-weights", "fid-helper"], tmp_path)
    assert "statistics of the 'inception-v3-compat' detector, but the images are measured with 'nvidia'" in err
    save_stats(str(tmp_path / "edm.npz"), np.zeros(2048), np.eye(2048))   # as EDM's fid-refs: no detector recorded
    cli.main(["fid", "--images", str(images), "--ref", str(tmp_path / "edm.npz"), "--detector", "nvidia",
              "--inception-weights", "fid-helper", "--quiet"])


def test_a_png_export_never_replaces_files_in_an_existing_folder(tmp_path, capsys):
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "00000000.png").write_bytes(b"the user's own picture")
    err = _refused(capsys, ["sample", "--family", "tinypix", "--tiny", "--seeds", "0-1", "--out", tmp_path / "s.npz",
                            "--png", tmp_path / "pngs"], tmp_path)
    assert "pngs: a folder with files in it" in err
