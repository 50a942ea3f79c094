"""A file of one kind given where another is read: the CLI says in one line what the file is and what reads it,
before any family opens it."""
import numpy as np
import pytest
import torch

from conftest import fixtures_root
from neon import cli, containers
from neon.family import get_family

EDM_PICKLE = fixtures_root() / "edm" / "edm_cond_ddpmpp.pkl"   # an official-layout EDM network pickle


def _refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sample", *map(str, argv), "--num-images", "2", "--out", "unused.npz"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file (or folder) of every kind, each as small as it can be."""
    d = tmp_path_factory.mktemp("kinds")
    edm = get_family("edm")
    edm.save(edm.tiny(), str(d / "edm_snapshot.pth"))
    get_family("diffusers").save(get_family("diffusers").tiny(), str(d / "pipeline"))
    np.savez(d / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.zeros(2, np.int64))
    np.savez(d / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    torch.save({"w": torch.zeros(2)}, d / "plain.pth")
    torch.save({"w": torch.zeros(2)}, d / "legacy.pth", _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(d / "weights.safetensors"))
    (d / "notes.txt").write_text("not a checkpoint\n")
    return d


def test_each_kind_of_file_is_told_from_its_first_bytes_and_layout(files):
    assert containers.kind(files / "pipeline") == containers.PIPELINE_FOLDER
    assert containers.kind(EDM_PICKLE) == containers.PICKLE
    assert containers.kind(files / "edm_snapshot.pth") == containers.TORCH_ZIP
    assert containers.kind(files / "plain.pth") == containers.TORCH_ZIP
    assert containers.kind(files / "legacy.pth") == containers.LEGACY_TORCH
    assert containers.kind(files / "weights.safetensors") == containers.SAFETENSORS
    assert containers.kind(files / "images.npz") == containers.IMAGE_SET
    assert containers.kind(files / "stats.npz") == containers.STATISTICS
    assert containers.kind(files / "notes.txt") is None
    assert containers.kind(files) is None   # a folder without model_index.json
    assert containers.saved_by(files / "edm_snapshot.pth") == "edm"
    assert containers.saved_by(files / "plain.pth") is None


def test_a_diffusers_pipeline_folder_given_to_edm_is_named_as_one(files, capsys):
    err = _refused(capsys, "--family", "edm", "--ckpt", files / "pipeline")
    assert f"{files / 'pipeline'}: a diffusers pipeline folder" in err
    assert "--family edm does not read" in err and err.endswith("it is for --family diffusers")


def test_an_edm_pickle_given_to_var_is_named_before_var_asks_for_its_vqvae(capsys):
    err = _refused(capsys, "--family", "var", "--ckpt", EDM_PICKLE)
    assert f"{EDM_PICKLE}: an EDM/IMM network pickle, which --family var does not read" in err
    assert err.endswith("it is for --family edm or imm") and "VQVAE" not in err


def test_an_edm_snapshot_in_a_torch_zip_given_to_var_names_the_family_that_saved_it(files, capsys):
    err = _refused(capsys, "--family", "var", "--ckpt", files / "edm_snapshot.pth")
    assert "that --family edm saved" in err and err.endswith("it is for --family edm") and "VQVAE" not in err


@pytest.mark.parametrize("name, says", [("images.npz", "an image set"), ("stats.npz", "a statistics file")])
def test_an_npz_given_as_a_checkpoint_is_named_with_the_command_that_reads_it(files, capsys, name, says):
    err = _refused(capsys, "--family", "edm", "--ckpt", files / name)
    assert err.startswith(f"neon sample: error: {files / name}: {says}") and "not a checkpoint" in err
    assert "neon fid" in err


def test_an_npz_given_as_the_guide_is_named_too(files, capsys):
    err = _refused(capsys, "--family", "edm", "--tiny", "--guide", files / "images.npz")
    assert f"{files / 'images.npz'}: an image set" in err and "not a checkpoint" in err


def test_a_safetensors_file_whose_header_length_opens_like_a_pickle_is_safetensors(tmp_path):
    """One header length in 256 has 0x80, a pickle's first byte, as its low byte."""
    import struct

    from safetensors.torch import save_file

    from neon.checkpoint import detect_format, load_state_dict
    path = tmp_path / "weights.bin"   # no telling suffix: the bytes alone decide
    for pad in range(512):
        save_file({"w": torch.ones(3)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert containers.kind(str(path)) == containers.SAFETENSORS and detect_format(str(path)) == "safetensors"
    assert torch.equal(load_state_dict(str(path))["w"], torch.ones(3))
