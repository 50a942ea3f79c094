"""download_models.sh: every release file listed with a destination and a hash entry; hashes verified offline."""
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "download_models.sh"

# The files the reproduction needs (issue: download_models.sh), by file name.
REQUIRED = [
    "Neon_xARL_imagenet256.pth", "Neon_xARB_imagenet256.pth", "Neon_VARd16_imagenet256.pth",
    "Neon_VARd36_imagenet512.pth", "Neon_imm_imagenet256.pkl", "Neon_EDM_conditional_CIFAR10.pkl",
    "Neon_EDM_unconditional_CIFAR10.pkl", "Neon_EDM_FFHQ.pkl", "adm_in256_stats.npz", "adm_in512_stats.npz",
    "vae_ch160v4096z32.pth", "var_d16.pth", "var_d36.pth", "kl16.ckpt", "xAR-B.pth", "xAR-L.pth",
    "edm-cifar10-32x32-cond-vp.pkl", "edm-cifar10-32x32-uncond-vp.pkl", "edm-ffhq-64x64-uncond-vp.pkl",
    "imagenet256_ts_a2.pkl", "sd-vae-ft-ema", "cifar10-32x32.npz", "ffhq-64x64.npz",
]


def _run(*args, manifest=None, root=None):
    env = dict(os.environ)
    if manifest:
        env["NEON_DOWNLOAD_MANIFEST"] = str(manifest)
    if root:
        env["NEON_DOWNLOAD_ROOT"] = str(root)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_dry_run_lists_every_file_with_destination_and_hash_entry():
    out = _run("--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in REQUIRED:
        line = next((l for l in lines if f"/{name} " in l or l.split("->")[-1].split()[0].endswith(name)), None)
        assert line is not None, f"{name} is not listed"
        dest = line.split("->")[1].split()[0]
        assert dest.startswith(("checkpoints/", "fid_stats/")), line
        assert "[sha256 " in line, line
    stats = [l for l in lines if l.split("->")[1].split()[0].startswith("fid_stats/")]
    assert len(stats) == 4


def test_only_selects_entries_and_unknown_names_fail():
    out = _run("--dry-run", "--only", "var-d16", "--only", "kl16.ckpt")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2
    assert _run("--dry-run", "--only", "nope").returncode == 2


@pytest.fixture
def local_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"first file")
    (src / "b.bin").write_bytes(b"second file")
    good = hashlib.sha256(b"second file").hexdigest()
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "# local test manifest\n"
        f"a\turl\tfile://{src}/a.bin\t-\tcheckpoints/a.bin\t-\n"
        f"b\turl\tfile://{src}/b.bin\t-\tfid_stats/b.bin\t{good}\n"
        f"bad\turl\tfile://{src}/b.bin\t-\tcheckpoints/bad.bin\t{'0' * 64}\n")
    return tmp_path, manifest


def test_unknown_hash_is_recorded_on_first_download_then_enforced(local_source):
    root, manifest = local_source
    out = _run("--only", "a", manifest=manifest, root=root / "dst")
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256(b"first file").hexdigest()
    assert (root / "dst" / "checkpoints" / "a.bin").read_bytes() == b"first file"
    assert f"a\turl\tfile://{root}/src/a.bin\t-\tcheckpoints/a.bin\t{digest}" in manifest.read_text()
    assert "trust on first use" in out.stdout
    (root / "dst" / "checkpoints" / "a.bin").write_bytes(b"tampered")  # a changed file is fetched again
    (root / "src" / "a.bin").write_bytes(b"tampered upstream")
    out = _run("--only", "a", manifest=manifest, root=root / "dst")
    assert out.returncode == 1 and "mismatch" in out.stderr
    assert not (root / "dst" / "checkpoints" / "a.bin").exists()


def test_known_hash_verified_and_mismatch_deletes_the_file(local_source):
    root, manifest = local_source
    ok = _run("--only", "b", manifest=manifest, root=root / "dst")
    assert ok.returncode == 0 and "sha256 ok" in ok.stdout
    assert (root / "dst" / "fid_stats" / "b.bin").exists()
    again = _run("--only", "b", manifest=manifest, root=root / "dst")
    assert "✓ fid_stats/b.bin" in again.stdout  # already there and verified: not fetched again
    bad = _run("--only", "bad", manifest=manifest, root=root / "dst")
    assert bad.returncode == 1 and "SHA-256 mismatch for checkpoints/bad.bin" in bad.stderr
    assert not (root / "dst" / "checkpoints" / "bad.bin").exists()
