"""download_models.sh: every release file listed with a destination and a hash entry; hashes verified offline."""
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "download_models.sh"

# The files the reproduction needs (download_models.sh), by file name.
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
    row = f"a\turl\tfile://{root}/src/a.bin\t-\tcheckpoints/a.bin\t{digest}\t{len(b'first file')}"
    assert row in manifest.read_text()
    (root / "dst" / "checkpoints" / "a.bin").write_bytes(b"tampered")  # a changed file is refused, kept as it is
    out = _run("--only", "a", manifest=manifest, root=root / "dst")
    assert out.returncode == 1 and "checkpoints/a.bin exists and does not match the manifest" in out.stderr
    assert (root / "dst" / "checkpoints" / "a.bin").read_bytes() == b"tampered"
    (root / "dst" / "checkpoints" / "a.bin").unlink()                  # moved away: fetched again, verified
    (root / "src" / "a.bin").write_bytes(b"tampered upstream")
    out = _run("--only", "a", manifest=manifest, root=root / "dst")
    assert out.returncode == 1 and "SHA-256 mismatch for checkpoints/a.bin" in out.stderr
    assert sorted(os.listdir(root / "dst" / "checkpoints")) == []      # the bad download is gone, nothing else


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


# ---- hostile manifests and existing files ---------------------------------------------------------------

FAKE_HF = """#!/usr/bin/env bash
# hf download REPO FILE... --local-dir DIR: copies $FAKE_HF_SRC/REPO/FILE into DIR
set -e
shift; repo="$1"; shift; files=()
while [ $# -gt 0 ]; do case "$1" in --local-dir) dir="$2"; shift 2 ;; *) files+=("$1"); shift ;; esac; done
for f in "${files[@]}"; do mkdir -p "$dir/$(dirname "$f")"; cp "$FAKE_HF_SRC/$repo/$f" "$dir/$f"; done
"""


@pytest.fixture
def world(tmp_path):
    """(run, tmp_path): a source tree for file:// URLs and a fake `hf` on PATH, a root to download into,
    and files outside that root that no manifest may touch."""
    (tmp_path / "src" / "org" / "repo").mkdir(parents=True)
    (tmp_path / "src" / "payload.bin").write_bytes(b"payload")
    (tmp_path / "src" / "org" / "repo" / "model.bin").write_bytes(b"model")
    (tmp_path / "src" / "org" / "repo" / "config.json").write_text("{}")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hf").write_text(FAKE_HF)
    (tmp_path / "bin" / "hf").chmod(0o755)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    (tmp_path / "root").mkdir()

    def run(rows, *args):
        manifest = tmp_path / "manifest.tsv"
        manifest.write_text("".join("\t".join(r) + "\n" for r in rows))
        env = dict(os.environ, NEON_DOWNLOAD_MANIFEST=str(manifest), NEON_DOWNLOAD_ROOT=str(tmp_path / "root"),
                   FAKE_HF_SRC=str(tmp_path / "src"), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)
    return run, tmp_path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"<dir/link>")
            for p in sorted(folder.rglob("*"))}


def test_manifest_paths_outside_the_root_are_refused_and_nothing_is_written(world):
    run, tmp = world
    (tmp / "root" / "link").symlink_to(tmp / "outside")
    url = f"file://{tmp}/src/payload.bin"
    hostile = [("abs", "url", url, "-", str(tmp / "outside" / "x.bin"), "-"),
               ("up", "url", url, "-", "../outside/x.bin", "-"),
               ("inner-up", "url", url, "-", "checkpoints/../../outside/x.bin", "-"),
               ("dot", "url", url, "-", "./checkpoints/x.bin", "-"),
               ("link", "url", url, "-", "link/x.bin", "-"),
               ("link-overwrite", "url", url, "-", "link/keep.txt", "-"),
               ("hf-file-up", "hf", "org/repo", "../model.bin", "checkpoints/m.bin", "-"),
               ("hf-folder-link", "hf-folder", "org/repo", "model.bin", "link", "-")]
    before_outside, before_root = _tree(tmp / "outside"), _tree(tmp / "root")
    for row in hostile:
        out = run([row])
        assert out.returncode == 2, (row, out.stdout, out.stderr)
        assert out.stderr.startswith(f"download_models.sh: {row[0]}: ") and out.stderr.count("\n") == 1, out.stderr
        assert _tree(tmp / "outside") == before_outside and _tree(tmp / "root") == before_root, row


def test_an_existing_file_that_does_not_verify_is_never_overwritten_or_deleted(world):
    run, tmp = world
    target = tmp / "root" / "checkpoints" / "m.bin"
    target.parent.mkdir()
    target.write_bytes(b"user's own file")
    good = hashlib.sha256(b"model").hexdigest()
    for row in [("hf", "hf", "org/repo", "model.bin", "checkpoints/m.bin", good),
                ("url", "url", f"file://{tmp}/src/org/repo/model.bin", "-", "checkpoints/m.bin", good)]:
        out = run([row])
        assert out.returncode == 1 and "exists and does not match the manifest" in out.stderr, out.stderr
        assert target.read_bytes() == b"user's own file"
        assert sorted(os.listdir(target.parent)) == ["m.bin"]        # no temporary left beside it


def test_a_bad_download_is_deleted_but_nothing_that_was_there(world):
    run, tmp = world
    (tmp / "root" / "checkpoints").mkdir()
    (tmp / "root" / "checkpoints" / "other.bin").write_bytes(b"other")
    for row in [("hf", "hf", "org/repo", "model.bin", "checkpoints/m.bin", "0" * 64),
                ("url", "url", f"file://{tmp}/src/payload.bin", "-", "checkpoints/m.bin", "0" * 64),
                ("folder", "hf-folder", "org/repo", "model.bin", "checkpoints/vae", "0" * 64)]:
        out = run([row])
        assert out.returncode == 1 and "SHA-256 mismatch" in out.stderr, out.stderr
        assert sorted(os.listdir(tmp / "root" / "checkpoints")) == ["other.bin"], row


def test_hf_folder_never_replaces_an_existing_folder(world):
    run, tmp = world
    folder = tmp / "root" / "checkpoints" / "vae"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    good = hashlib.sha256(b"model").hexdigest()
    out = run([("vae", "hf-folder", "org/repo", "model.bin", "checkpoints/vae", good)])
    assert out.returncode == 1 and "exists but holds no model.bin" in out.stderr
    assert _tree(folder) == {"notes.txt": b"mine"}
    (folder / "model.bin").write_bytes(b"not the model")
    out = run([("vae", "hf-folder", "org/repo", "model.bin", "checkpoints/vae", good)])
    assert out.returncode == 1 and "does not match the manifest" in out.stderr
    assert _tree(folder) == {"model.bin": b"not the model", "notes.txt": b"mine"}
    folder.rename(tmp / "moved")                                      # moved away: a fresh folder, verified
    out = run([("vae", "hf-folder", "org/repo", "model.bin", "checkpoints/vae", good)])
    assert out.returncode == 0, out.stderr
    assert _tree(folder) == {"config.json": b"{}", "model.bin": b"model"}
    assert sorted(os.listdir(folder.parent)) == ["vae"]


def test_recording_a_hash_keeps_the_manifest_mode_and_dry_run_shows_sizes(world):
    run, tmp = world
    manifest = tmp / "manifest.tsv"
    rows = [("p", "url", f"file://{tmp}/src/payload.bin", "-", "fid_stats/p.bin", "-")]
    dry = run(rows, "--dry-run")
    assert dry.returncode == 0 and "size unknown" in dry.stdout
    os.chmod(manifest, 0o644)
    env = dict(os.environ, NEON_DOWNLOAD_MANIFEST=str(manifest), NEON_DOWNLOAD_ROOT=str(tmp / "root"))
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert oct(manifest.stat().st_mode & 0o777) == "0o644"
    size = len((tmp / "src" / "payload.bin").read_bytes())
    assert manifest.read_text().rstrip("\n").endswith(f"\t{size}")
    dry = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env)
    assert f"{size} B, present: {size} B" in dry.stdout
