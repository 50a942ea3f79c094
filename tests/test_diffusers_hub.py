"""The Hugging Face Hub around `neon run`, with no network: a config's `base` may be a Hub repo id (taken here from
a fake Hub cache in huggingface_hub's own layout, offline), and `--push-to-hub REPO` uploads θneon's pipeline
folder with MODEL_CARD.md as its README.md (through a recording stand-in for HfApi)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from neon.checkpoint import load_state_dict
from neon.errors import NeonError
from neon.family import get_family
from neon.hub import push_run
from neon.merge import merge_tensor

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "tiny-org/tiny-ddpm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"   # the snapshot's revision in the fake cache


@pytest.fixture(scope="module")
def family():
    return get_family("diffusers")


def _smoke_config(tmp_path: Path, base: str) -> Path:
    """configs/diffusers_ddpm_cifar10.yaml at its smoke counts, on `base` instead of the tiny network."""
    config = yaml.safe_load((REPO / "configs" / "diffusers_ddpm_cifar10.yaml").read_text())
    config["smoke"]["base"] = base
    config["smoke"].pop("load_args")   # the tiny network's sizes; a real base has its own
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _pipeline(family, tmp_path: Path) -> Path:
    """A tiny pipeline folder of the size the smoke config's tiny network has."""
    config = yaml.safe_load((REPO / "configs" / "diffusers_ddpm_cifar10.yaml").read_text())
    folder = tmp_path / "pipeline"
    family.save(family.tiny(seed=21, **config["smoke"]["load_args"]), str(folder))
    return folder


def _fake_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """huggingface_hub's cache layout for `repo_id` at one revision: blobs named by their sha256, the snapshot's
    files as symlinks to them, refs/main naming the revision. Returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _offline_env(hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _neon_run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neon", "run", *map(str, args)], capture_output=True, text=True,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


# -- a Hub repo id as the config's base ------------------------------------------------------------------------

def test_a_hub_id_as_the_configs_base_runs_from_the_offline_cache(family, tmp_path):
    snapshot = _fake_hub_cache(tmp_path / "hf", HUB_ID, _pipeline(family, tmp_path / "src"))
    out = tmp_path / "run"
    res = _neon_run([_smoke_config(tmp_path, HUB_ID), "--smoke", "--out", out], _offline_env(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "run.json").read_text())
    w = doc["stages"]["sweep"]["best"]["w"]
    r, s = load_state_dict(str(snapshot)), load_state_dict(doc["stages"]["finetune"]["snapshots"][-1])
    neon = load_state_dict(str(out / "neon"))   # a pipeline folder named as for a local folder base
    assert set(neon) == set(r) and all(torch.equal(v, merge_tensor(r[k], s[k], w)) for k, v in neon.items())
    assert f"θneon of {HUB_ID}" in (out / "MODEL_CARD.md").read_text()   # the card names the base as the config


def test_a_hub_id_absent_from_the_offline_cache_is_one_line_and_leaves_no_run_folder(tmp_path):
    (tmp_path / "hf").mkdir()
    out = tmp_path / "run"
    res = _neon_run([_smoke_config(tmp_path, "nobody-here/no-such-pipeline"), "--smoke", "--out", out],
                    _offline_env(tmp_path / "hf"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert "nobody-here/no-such-pipeline" in res.stderr and "cannot get this Hub pipeline" in res.stderr
    assert not out.exists()


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "checkpoints" / "no-such-folder"   # more than one '/': no repo id
    res = _neon_run([_smoke_config(tmp_path, str(missing)), "--smoke", "--out", out], _offline_env(tmp_path))
    assert res.returncode == 2 and f"{missing} not found" in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists()


# -- --push-to-hub ---------------------------------------------------------------------------------------------

# `neon run ...` with huggingface_hub.HfApi replaced by a stand-in that records each call (and, for
# upload_folder, the folder's files and its README.md as they are at that moment) into the JSON file argv[1].
RECORDING_RUN = """
import json, os, sys
import huggingface_hub
calls = []
class RecordingHfApi:
    def create_repo(self, *args, **kwargs):
        calls.append({"call": "create_repo", "args": args, "kwargs": kwargs})
    def upload_folder(self, *args, **kwargs):
        folder = kwargs["folder_path"]
        files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
        with open(os.path.join(folder, "README.md")) as f:
            readme = f.read()
        calls.append({"call": "upload_folder", "args": args, "kwargs": kwargs, "files": files, "readme": readme})
huggingface_hub.HfApi = RecordingHfApi
from neon.cli import main
try:
    main(["run", *sys.argv[2:]])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(calls, f)
"""


def _recorded_run(tmp_path: Path, args: list) -> tuple[subprocess.CompletedProcess, list]:
    record = tmp_path / "calls.json"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    res = subprocess.run([sys.executable, "-c", RECORDING_RUN, str(record), *map(str, args)], capture_output=True,
                         text=True, env={**env, "OMP_NUM_THREADS": "1"})
    return res, json.loads(record.read_text())


def test_push_to_hub_uploads_the_neon_folder_with_the_model_card_as_readme(family, tmp_path):
    config = _smoke_config(tmp_path, str(_pipeline(family, tmp_path)))
    out = tmp_path / "run"
    res, calls = _recorded_run(tmp_path, [config, "--smoke", "--out", out, "--push-to-hub", "someone/neon-ddpm"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [c["call"] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0]["kwargs"]["repo_id"] == "someone/neon-ddpm" and calls[0]["kwargs"]["exist_ok"] is True
    upload = calls[1]
    assert upload["kwargs"]["repo_id"] == "someone/neon-ddpm"
    assert os.path.samefile(upload["kwargs"]["folder_path"], out / "neon")
    assert "model_index.json" in upload["files"] and "README.md" in upload["files"]
    assert upload["readme"] == (out / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("repo_id,env,message", [
    ("not a repo id", {}, "'not a repo id' is not a Hub repo id"),
    ("someone/neon-ddpm", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
])
def test_push_to_hub_is_refused_before_the_run_for_what_can_be_checked_offline(family, tmp_path, repo_id, env,
                                                                               message):
    config = _smoke_config(tmp_path, str(_pipeline(family, tmp_path)))
    out = tmp_path / "run"
    res = _neon_run([config, "--smoke", "--out", out, "--push-to-hub", repo_id],
                    {**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr[-3000:]
    assert not out.exists()


def test_push_to_hub_is_refused_before_the_run_when_the_base_is_one_file(tmp_path):
    base = tmp_path / "model.pth"
    base.write_bytes(b"a one-file checkpoint")
    out = tmp_path / "run"
    res = _neon_run([_smoke_config(tmp_path, str(base)), "--smoke", "--out", out, "--push-to-hub", "someone/x"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "is a file" in res.stderr, res.stderr[-3000:]
    assert not out.exists()


def test_push_to_hub_is_refused_for_a_study_config_which_has_no_single_neon(tmp_path):
    out = tmp_path / "run"
    res = _neon_run([REPO / "configs" / "fashion_mnist_diffusers.yaml", "--smoke", "--out", out,
                     "--push-to-hub", "someone/x"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "has no θneon to push" in res.stderr, res.stderr
    assert not out.exists()


class _Api:
    """HfApi's two calls, recorded; `fail` makes the upload raise as a refused login does."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise self.fail


def _finished_run(tmp_path: Path, neon: str) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "MODEL_CARD.md").write_text("# a card\n")
    if neon.endswith(".pth"):
        (out / neon).write_bytes(b"weights")
    else:
        (out / neon).mkdir()
        (out / neon / "model_index.json").write_text("{}")
    return out


def test_a_neon_that_is_one_file_is_not_pushed(tmp_path):
    out, api = _finished_run(tmp_path, "neon.pth"), _Api()
    with pytest.raises(NeonError, match=r"neon\.pth is a file, not a folder"):
        push_run(str(out), "someone/x", api)
    assert api.calls == []


def test_a_failed_upload_is_one_line_and_keeps_the_run(tmp_path):
    out = _finished_run(tmp_path, "neon")
    api = _Api(fail=RuntimeError("401 Client Error: Unauthorized\nmore detail"))
    with pytest.raises(NeonError, match="uploading .* to someone/x failed \\(401 Client Error: Unauthorized\\)") \
            as info:
        push_run(str(out), "someone/x", api)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(out)) == ["MODEL_CARD.md", "neon"] and (out / "neon" / "README.md").is_file()


def test_push_copies_the_card_into_the_folder_it_uploads(tmp_path):
    out, api = _finished_run(tmp_path, "neon"), _Api()
    assert push_run(str(out), "someone/x", api) == str(out / "neon")
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1][1]["folder_path"] == str(out / "neon") and api.calls[1][1]["repo_id"] == "someone/x"
    assert api.calls[1][1]["ignore_patterns"] == [".neon-output.json"]   # Neon's own list of what it wrote
    assert (out / "neon" / "README.md").read_text() == "# a card\n"
