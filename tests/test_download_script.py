"""download_models.sh: every release file listed with a destination and a hash entry; hashes verified offline."""
import hashlib
import os
import shutil
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


# Fake download tools on PATH, offline. Each refuses to run unless every manifest value follows `--`.
FAKE_CURL = """#!/usr/bin/env bash
# curl ... -o OUT -- https://files.test/PATH: copies $FAKE_SRC/PATH to OUT, or fails as curl -f does
set -e
while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift 2 ;; --) url="$2"; shift 2 ;; *) shift ;; esac; done
[ -n "${url:-}" ] || { echo "fake curl: no URL after --" >&2; exit 2; }
src="$FAKE_SRC/${url#https://files.test/}"
[ -f "$src" ] || { echo "curl: (22) The requested URL returned error: 404" >&2; exit 22; }
cp "$src" "$out"
"""

FAKE_HF = """#!/usr/bin/env bash
# hf download [--include GLOB]... --local-dir DIR -- REPO FILE...: copies $FAKE_SRC/REPO/FILE into DIR
set -e
shift
while [ $# -gt 0 ]; do case "$1" in
  --local-dir) dir="$2"; shift 2 ;; --include) shift 2 ;; --) shift; break ;;
  *) echo "fake hf: $1 before --" >&2; exit 2 ;; esac; done
repo="$1"; shift
for f in "$@"; do mkdir -p "$dir/$(dirname "$f")"; cp "$FAKE_SRC/$repo/$f" "$dir/$f"; done
"""


def _script_with_fake_tools(tmp_path: Path, src: Path) -> tuple[Path, dict]:
    """(a copy of the script in a folder without .venv, the environment that puts fake curl and hf on PATH)."""
    (tmp_path / "bin").mkdir()
    for name, text in (("curl", FAKE_CURL), ("hf", FAKE_HF)):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "project").mkdir()
    script = Path(shutil.copy(SCRIPT, tmp_path / "project"))
    return script, dict(os.environ, FAKE_SRC=str(src), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")


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
    """(tmp_path, manifest, run): three https entries served by the fake curl from tmp_path/src."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"first file")
    (src / "b.bin").write_bytes(b"second file")
    good = hashlib.sha256(b"second file").hexdigest()
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "# local test manifest\n"
        "a\turl\thttps://files.test/a.bin\t-\tcheckpoints/a.bin\t-\n"
        f"b\turl\thttps://files.test/b.bin\t-\tfid_stats/b.bin\t{good}\n"
        f"bad\turl\thttps://files.test/b.bin\t-\tcheckpoints/bad.bin\t{'0' * 64}\n")
    script, env = _script_with_fake_tools(tmp_path, src)
    env.update(NEON_DOWNLOAD_MANIFEST=str(manifest), NEON_DOWNLOAD_ROOT=str(tmp_path / "dst"))

    def run(*args):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env)
    return tmp_path, manifest, run


def test_unknown_hash_is_recorded_on_first_download_then_enforced(local_source):
    root, manifest, run = local_source
    out = run("--only", "a")
    assert out.returncode == 0, out.stderr
    digest = hashlib.sha256(b"first file").hexdigest()
    assert (root / "dst" / "checkpoints" / "a.bin").read_bytes() == b"first file"
    assert f"a\turl\thttps://files.test/a.bin\t-\tcheckpoints/a.bin\t{digest}" in manifest.read_text()
    assert "trust on first use" in out.stdout
    row = f"a\turl\thttps://files.test/a.bin\t-\tcheckpoints/a.bin\t{digest}\t{len(b'first file')}"
    assert row in manifest.read_text()
    (root / "dst" / "checkpoints" / "a.bin").write_bytes(b"tampered")  # a changed file is refused, kept as it is
    out = run("--only", "a")
    assert out.returncode == 1 and "checkpoints/a.bin exists and does not match the manifest" in out.stderr
    assert (root / "dst" / "checkpoints" / "a.bin").read_bytes() == b"tampered"
    (root / "dst" / "checkpoints" / "a.bin").unlink()                  # moved away: fetched again, verified
    (root / "src" / "a.bin").write_bytes(b"tampered upstream")
    out = run("--only", "a")
    assert out.returncode == 1 and "SHA-256 mismatch for checkpoints/a.bin" in out.stderr
    assert sorted(os.listdir(root / "dst" / "checkpoints")) == []      # the bad download is gone, nothing else


def test_known_hash_verified_and_mismatch_deletes_the_file(local_source):
    root, manifest, run = local_source
    ok = run("--only", "b")
    assert ok.returncode == 0 and "sha256 ok" in ok.stdout
    assert (root / "dst" / "fid_stats" / "b.bin").exists()
    again = run("--only", "b")
    assert "✓ fid_stats/b.bin" in again.stdout  # already there and verified: not fetched again
    bad = run("--only", "bad")
    assert bad.returncode == 1 and "SHA-256 mismatch for checkpoints/bad.bin" in bad.stderr
    assert not (root / "dst" / "checkpoints" / "bad.bin").exists()


# ---- hostile manifests and existing files ---------------------------------------------------------------

@pytest.fixture
def world(tmp_path):
    """(run, tmp_path): a source tree for the fake curl (https://files.test/...) and the fake `hf`, a root to
    download into, and files outside that root that no manifest may touch."""
    (tmp_path / "src" / "org" / "repo").mkdir(parents=True)
    (tmp_path / "src" / "payload.bin").write_bytes(b"payload")
    (tmp_path / "src" / "org" / "repo" / "model.bin").write_bytes(b"model")
    (tmp_path / "src" / "org" / "repo" / "config.json").write_text("{}")
    script, env = _script_with_fake_tools(tmp_path, tmp_path / "src")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    (tmp_path / "root").mkdir()
    env.update(NEON_DOWNLOAD_MANIFEST=str(tmp_path / "manifest.tsv"), NEON_DOWNLOAD_ROOT=str(tmp_path / "root"))

    def run(rows, *args, script=script, **env_over):  # rows=None: the manifest as it is
        if rows is not None:
            (tmp_path / "manifest.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                              env={**env, **env_over})
    return run, tmp_path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"<dir/link>")
            for p in sorted(folder.rglob("*"))}


def test_manifest_paths_outside_the_root_are_refused_and_nothing_is_written(world):
    run, tmp = world
    (tmp / "root" / "link").symlink_to(tmp / "outside")
    url = "https://files.test/payload.bin"
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
                ("url", "url", "https://files.test/org/repo/model.bin", "-", "checkpoints/m.bin", good)]:
        out = run([row])
        assert out.returncode == 1 and "exists and does not match the manifest" in out.stderr, out.stderr
        assert target.read_bytes() == b"user's own file"
        assert sorted(os.listdir(target.parent)) == ["m.bin"]        # no temporary left beside it


def test_a_bad_download_is_deleted_but_nothing_that_was_there(world):
    run, tmp = world
    (tmp / "root" / "checkpoints").mkdir()
    (tmp / "root" / "checkpoints" / "other.bin").write_bytes(b"other")
    for row in [("hf", "hf", "org/repo", "model.bin", "checkpoints/m.bin", "0" * 64),
                ("url", "url", "https://files.test/payload.bin", "-", "checkpoints/m.bin", "0" * 64),
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
    rows = [("p", "url", "https://files.test/payload.bin", "-", "fid_stats/p.bin", "-")]
    dry = run(rows, "--dry-run")
    assert dry.returncode == 0 and "size unknown" in dry.stdout
    os.chmod(manifest, 0o644)
    out = run(None)
    assert out.returncode == 0, out.stderr
    assert oct(manifest.stat().st_mode & 0o777) == "0o644"
    size = len((tmp / "src" / "payload.bin").read_bytes())
    assert manifest.read_text().rstrip("\n").endswith(f"\t{size}")
    dry = run(None, "--dry-run")
    assert f"{size} B, present: {size} B" in dry.stdout


# ---- manifest values that could pass for options, and the download tools ---------------------------------

HOSTILE_SOURCES = [  # (name, kind, source, file): refused while the manifest is read, before any tool runs
    ("curl-config", "url", "-K/dev/stdin", "-"),
    ("curl-output", "url", "-o/tmp/x", "-"),
    ("plain-http", "url", "http://files.test/payload.bin", "-"),
    ("local-file", "url", "file:///etc/passwd", "-"),
    ("space", "url", "https://files.test/payload.bin -o x", "-"),
    ("control", "url", "https://files.test/pay\x1bload.bin", "-"),
    ("hf-option", "hf", "--local-dir=/tmp", "model.bin"),
    ("hf-up", "hf", "org/..", "model.bin"),
    ("hf-three-parts", "hf", "org/repo/x", "model.bin"),
    ("hf-file-option", "hf", "org/repo", "--local-dir=x"),
    ("hf-folder-option", "hf-folder", "-K/x", "model.bin"),
    ("bad-hash", "url", "https://files.test/payload.bin", "-"),
]


@pytest.mark.parametrize("name,kind,source,file", HOSTILE_SOURCES, ids=[r[0] for r in HOSTILE_SOURCES])
def test_a_manifest_value_that_could_pass_for_an_option_is_refused_in_one_line(world, name, kind, source, file):
    run, tmp = world
    sha = "not-a-hash" if name == "bad-hash" else "-"
    good = ("good", "url", "https://files.test/payload.bin", "-", "checkpoints/good.bin", "-")
    before = _tree(tmp)
    out = run([good, (name, kind, source, file, "checkpoints/x.bin", sha)], "--only", "good")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith(f"download_models.sh: {name}: ") and out.stderr.count("\n") == 1, out.stderr
    after = _tree(tmp)
    after.pop("manifest.tsv"), before.pop("manifest.tsv", None)
    assert after == before          # not even the good entry, listed first, was fetched


def test_a_curl_config_source_writes_nothing_anywhere_with_the_real_curl(world):
    """`-K/dev/stdin` makes curl read its options from the rest of the manifest (the loop's stdin): two URLs,
    the second saved outside the download root."""
    run, tmp = world
    url = f"file://{tmp}/src/payload.bin"
    rows = [("evil", "url", "-K/dev/stdin", "-", "checkpoints/x.bin", "-"),
            (f'url = "{url}"',), (f'url = "{url}"',), (f'output = "{tmp}/outside/pwned"',)]
    before = _tree(tmp / "outside"), _tree(tmp / "root")
    out = run(rows, PATH=os.environ["PATH"])   # the system's curl
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "evil: source '-K/dev/stdin' must be an https:// URL" in out.stderr
    assert (_tree(tmp / "outside"), _tree(tmp / "root")) == before


def test_the_projects_own_hf_is_used_before_one_on_path(world):
    run, tmp = world
    project = tmp / "with-venv"
    (project / ".venv" / "bin").mkdir(parents=True)
    script = Path(shutil.copy(SCRIPT, project))
    (project / ".venv" / "bin" / "hf").write_text(FAKE_HF)
    (project / ".venv" / "bin" / "hf").chmod(0o755)
    (tmp / "bin" / "hf").write_text("#!/usr/bin/env bash\necho 'the hf on PATH ran' >&2; exit 3\n")
    out = run([("m", "hf", "org/repo", "model.bin", "checkpoints/m.bin", "-")], script=script)
    assert out.returncode == 0, out.stderr
    assert (tmp / "root" / "checkpoints" / "m.bin").read_bytes() == b"model"


def test_a_missing_hf_names_the_projects_pip_and_makes_nothing(world):
    run, tmp = world
    (tmp / "bin" / "hf").unlink()
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(f"{d}/hf"))
    before = _tree(tmp / "root")
    out = run([("m", "hf", "org/repo", "model.bin", "checkpoints/m.bin", "-")], PATH=f"{tmp / 'bin'}:{path}")
    assert out.returncode == 1
    assert out.stderr.strip().endswith("the 'hf' command is missing: .venv/bin/pip install -U huggingface_hub")
    assert _tree(tmp / "root") == before


@pytest.mark.parametrize("kind,source,file", [("url", "https://files.test/missing.bin", "-"),
                                              ("hf", "org/repo", "missing.bin")])
def test_a_failed_download_names_its_manifest_entry(world, kind, source, file):
    run, tmp = world
    rows = [("p", "url", "https://files.test/payload.bin", "-", "checkpoints/p.bin", "-"),
            ("gone", kind, source, file, "checkpoints/gone.bin", "-")]
    out = run(rows)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith("download_models.sh: gone: downloading checkpoints/gone.bin failed")
    assert sorted(os.listdir(tmp / "root" / "checkpoints")) == ["p.bin"]   # the entry before it is kept
