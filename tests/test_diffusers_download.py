"""download_models.sh fetches a diffusers pipeline (an hf-folder entry whose file lies inside a component) as a
whole folder of configs and safetensors, without the pickled .bin copies beside them (a fake `hf`, offline)."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "download_models.sh"

# hf download [--include GLOB]... --local-dir DIR -- REPO [FILE...]: copies from $FAKE_HF_SRC/REPO the named files,
# or, with --include, every file whose path matches one of the globs (as huggingface_hub's fnmatch: * spans /).
FAKE_HF = """#!/usr/bin/env bash
set -e
shift; files=(); globs=()
while [ $# -gt 0 ]; do case "$1" in
  --local-dir) dir="$2"; shift 2 ;;
  --include) globs+=("$2"); shift 2 ;;
  --) shift; break ;;
  *) echo "fake hf: $1 before --" >&2; exit 2 ;; esac; done
repo="$1"; shift; files+=("$@")
src="$FAKE_HF_SRC/$repo"
if [ ${#globs[@]} -gt 0 ]; then
  while IFS= read -r f; do
    for g in "${globs[@]}"; do if [[ "$f" == $g ]]; then files+=("$f"); break; fi; done
  done < <(cd "$src" && find . -type f | sed 's|^\\./||')
fi
for f in "${files[@]}"; do mkdir -p "$dir/$(dirname "$f")"; cp "$src/$f" "$dir/$f"; done
"""

PIPELINE = {"model_index.json": b'{"_class_name": "DDPMPipeline"}', "unet/config.json": b"{}",
            "unet/diffusion_pytorch_model.safetensors": b"weights", "unet/diffusion_pytorch_model.bin": b"pickle",
            "scheduler/scheduler_config.json": b"{}"}


def test_a_pipeline_entry_fetches_every_config_and_safetensors_file_and_no_pickle(tmp_path):
    src = tmp_path / "src" / "org" / "pipe"
    for name, data in PIPELINE.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hf").write_text(FAKE_HF)
    (tmp_path / "bin" / "hf").chmod(0o755)
    weights = "unet/diffusion_pytorch_model.safetensors"
    good = hashlib.sha256(PIPELINE[weights]).hexdigest()
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(f"pipe\thf-folder\torg/pipe\t{weights}\tcheckpoints/diffusers/pipe\t{good}\n")
    env = dict(os.environ, NEON_DOWNLOAD_MANIFEST=str(manifest), NEON_DOWNLOAD_ROOT=str(tmp_path / "root"),
               FAKE_HF_SRC=str(tmp_path / "src"), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "root").mkdir()
    (tmp_path / "project").mkdir()   # a copy of the script in a folder without .venv: the fake hf on PATH runs
    script = shutil.copy(SCRIPT, tmp_path / "project")
    out = subprocess.run(["bash", str(script), "--only", "pipe"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "root" / "checkpoints" / "diffusers" / "pipe"
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == sorted(n for n in PIPELINE if not n.endswith(".bin"))
    assert sorted(os.listdir(folder.parent)) == ["pipe"]   # no staging folder left beside it
