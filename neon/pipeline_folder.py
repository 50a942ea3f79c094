"""A diffusers pipeline folder as a checkpoint container: `model_index.json` beside one folder per component.

The merged network is one component: the EMA one where the folder keeps one (`unet_ema/`, `transformer_ema/`),
else `unet/` or `transformer/`; old single-model layouts keep it at the top level (`config.json` +
`diffusion_pytorch_model.safetensors` beside `model_index.json`). Its weights are one safetensors file or shards
listed in `diffusion_pytorch_model.safetensors.index.json`. Only safetensors are read: `.bin` pickles are never
opened.

`PipelineFolder` gives the merge what a one-file `Checkpoint` gives it: the component's tensors as lazy
references, `read(key)`, and `write(out, replace)`, which copies the whole folder and rewrites each shard tensor
by tensor (same layout, same dtypes), so `DiffusionPipeline.from_pretrained` loads the result as the input.

A copy takes regular files only: a symbolic link, device, FIFO or socket in the folder is refused before anything
is written (except the links of a Hugging Face Hub cache snapshot into its own `blobs/`). Every folder written
here lists its files in `.neon-output.json`, and only such a folder, holding nothing else, is ever replaced.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat

import torch

from neon import paths
from neon.errors import NeonError

MODEL_INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = WEIGHTS + ".index.json"
# Components that hold the denoising network, in the order the merge prefers them (the EMA network first).
NET_COMPONENTS = ("unet_ema", "transformer_ema", "unet", "transformer")
MARKER = ".neon-output.json"   # in every folder written here: the files written, so a rewrite knows what is ours
# A config is a few KB, the shard index of thousands of tensors a few hundred KB: a larger "JSON" file is neither,
# and parsing it could take gigabytes.
MAX_JSON_BYTES = 4 << 20


def is_pipeline_folder(path: str) -> bool:
    """A folder with a `model_index.json`: whatever that entry is, so one that is no regular file is refused by
    name when read (`read_json`), not taken for the absence of a pipeline."""
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, MODEL_INDEX))


def read_json(path: str) -> dict:
    """A JSON object from the regular file `path` (at most MAX_JSON_BYTES); anything else is a one-line NeonError
    naming the file."""
    raw = paths.read_input(path, "JSON file", MAX_JSON_BYTES)
    try:
        data = json.loads(raw)
    except ValueError as e:   # UnicodeDecodeError included
        raise NeonError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise NeonError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise NeonError(f"{path}: expected a JSON object")
    return data


def net_component(folder: str) -> tuple[str, str]:
    """(name, folder) of the network the merge touches: the EMA component first; '' names the flat layout."""
    for name in NET_COMPONENTS:
        sub = os.path.join(folder, name)
        if os.path.lexists(os.path.join(sub, "config.json")):
            return name, sub
    if os.path.lexists(os.path.join(folder, "config.json")):
        return "", folder
    raise NeonError(f"{folder}: no network component (expected one of {', '.join(NET_COMPONENTS)}/config.json)")


def _inside(folder: str, name: str) -> str:
    """`folder/name` for a plain file name listed in a shard index; a path that leaves the folder is refused."""
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise NeonError(f"{os.path.join(folder, SHARD_INDEX)}: bad shard name {name!r}")
    return os.path.join(folder, name)


def weight_files(component: str) -> list[str]:
    """The component's safetensors files: the one file, else the shards its index lists (in index order)."""
    single = os.path.join(component, WEIGHTS)
    if os.path.lexists(single):
        return [single]
    index = os.path.join(component, SHARD_INDEX)
    if not os.path.lexists(index):
        raise NeonError(f"{component}: no {WEIGHTS} (nor {SHARD_INDEX}); only safetensors weights are read")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise NeonError(f"{index}: no weight_map")
    return [_inside(component, name) for name in dict.fromkeys(weight_map.values())]


@dataclasses.dataclass
class PipelineFolder:
    """A pipeline folder whose network component's tensors are not yet read (the Checkpoint interface)."""
    path: str
    module: str                  # the component merged ('' for the flat layout)
    class_name: str | None       # the component's `_class_name` (config.json)
    shards: list                 # one safetensors Checkpoint per weight file
    format: str = "pipeline"

    @property
    def tensors(self) -> dict:
        return {k: ref for shard in self.shards for k, ref in shard.tensors.items()}

    def describe(self) -> str:
        return f"pipeline folder [{self.module or '.'}] {self.class_name or ''}".rstrip()

    def _shard(self, key: str):
        return next(s for s in self.shards if key in s.tensors)

    def read(self, key: str) -> torch.Tensor:
        return self._shard(key).read(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.read(k) for k in self.tensors}

    def write(self, out: str, replace) -> None:
        """Copy the folder to `out` with each network tensor t replaced by replace(key, t); built beside `out`
        and moved in only when whole, so a killed job never leaves a half-written pipeline at `out`."""
        files = self._files_to_copy()   # every entry checked before anything is written
        write_folder(out, lambda tmp: self._fill(tmp, files, replace))

    def _files_to_copy(self) -> list[tuple[str, str]]:
        """(path in the folder, file to read) of each file copied as it is; the shards are written, not copied."""
        rewritten = {os.path.relpath(shard.path, self.path) for shard in self.shards}
        blobs = _hub_blobs(self.path)
        files = [(rel, _regular_source(entry, blobs)) for rel, entry in _walk(self.path, _not_copied)]
        return [(rel, src) for rel, src in files if rel not in rewritten]

    def _fill(self, tmp: str, files: list[tuple[str, str]], replace) -> None:
        os.makedirs(tmp)
        for rel, src in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            _copy_regular(src, os.path.join(tmp, rel))
        for shard in self.shards:
            dst = os.path.join(tmp, os.path.relpath(shard.path, self.path))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shard._write_safetensors(dst, replace)


# ---------------------------------------------------------------------------------------------------------
# Copying regular files only.

def _not_copied(name: str) -> bool:
    """Caches, a killed writer's temporaries, and the source's own record of what Neon wrote."""
    return name in (".cache", "__pycache__", MARKER) or paths.TEMP_TAG in name


def _walk(folder: str, skip=lambda name: False):
    """(path relative to `folder`, DirEntry) of every entry below it that is not a folder, `skip(name)` ones and
    what they hold left out; links are not followed, so a link to a folder (or a loop of links) is one entry."""
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(folder, rel)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if skip(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(os.path.join(rel, entry.name))
                else:
                    yield os.path.join(rel, entry.name), entry


def _hub_blobs(folder: str) -> str | None:
    """The `blobs/` folder of a Hugging Face Hub cache snapshot (`<repo>/snapshots/<revision>/`), whose files
    are links into it; None for any other folder."""
    snapshots = os.path.dirname(os.path.realpath(folder))
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return blobs if os.path.basename(snapshots) == "snapshots" and os.path.isdir(blobs) else None


def _regular_source(entry: os.DirEntry, blobs: str | None) -> str:
    """The file to copy for `entry`: itself if regular, its blob for a Hub snapshot's link; a link elsewhere
    (it would copy, say, a private key into the output), a device (endless) or a FIFO (blocks) is refused."""
    mode = entry.stat(follow_symlinks=False).st_mode
    if stat.S_ISREG(mode):
        return entry.path
    if stat.S_ISLNK(mode) and blobs is not None:
        target = os.path.realpath(entry.path)
        if os.path.dirname(target) == blobs and os.path.isfile(target):
            return target
    raise NeonError(f"{entry.path}: is {paths.file_kind(mode)}; only regular files are copied")


def _copy_regular(src: str, dst: str) -> None:
    """Copy `src`, refusing it if it was swapped for a link or a special file since it was listed (O_NONBLOCK:
    opening a FIFO does not wait for a writer)."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NeonError(f"{src}: is {paths.file_kind(os.fstat(fd).st_mode)}; only regular files are copied")
        with open(dst, "xb") as out:
            shutil.copyfileobj(f, out, 16 << 20)


# ---------------------------------------------------------------------------------------------------------
# Writing a folder, and replacing only what was written here.

def check_replaceable(out: str) -> None:
    """Refuse an existing `out` unless a previous write here made it and it holds nothing else: replacing an
    output (`--force`) must never delete a folder, or a file in it, that the user made."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out):
        raise NeonError(f"{out}: is a symbolic link; refusing to replace it or what it points to")
    if not os.path.isdir(out):
        raise NeonError(f"{out}: exists and is not a folder")
    marker = os.path.join(out, MARKER)
    if os.path.islink(marker) or not os.path.isfile(marker):
        raise NeonError(f"{out}: exists and was not written by neon (no {MARKER}); move it away or choose "
                        "another output")
    listed = read_json(marker).get("files")
    if not isinstance(listed, list):
        raise NeonError(f"{marker}: no list of files")
    for rel, _ in _walk(out, lambda name: name == MARKER):
        if rel not in listed:
            raise NeonError(f"{out}: holds {rel}, which neon did not write; move it away or choose another output")


def _write_marker(folder: str) -> None:
    files = sorted(rel for rel, _ in _walk(folder))
    with open(os.path.join(folder, MARKER), "x") as f:
        json.dump({"written_by": "neon", "files": files}, f, indent=1)


def write_folder(out: str, fill) -> None:
    """fill(tmp) builds a folder at a temporary path beside `out`; it then replaces `out` (an existing `out`,
    which `check_replaceable` allows, is moved aside first and removed once the new one is in place). On error
    the temporary folder is removed."""
    out = os.path.abspath(os.fspath(out))
    check_replaceable(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp, old = paths.temp_path(out), paths.temp_path(out) + "-old"
    remove_stale_folders(os.path.dirname(out))
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        fill(tmp)
        _write_marker(tmp)
        if os.path.lexists(out):
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(out):
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_folders(parent: str) -> None:
    """Remove the temporary folders that killed writers (dead PIDs of this host) left in `parent`: the core's
    sweep of stale temporaries removes files only."""
    for name in os.listdir(parent):
        full = os.path.join(parent, name)
        if os.path.isdir(full) and not os.path.islink(full) and paths._stale(name.removesuffix("-old")):
            shutil.rmtree(full, ignore_errors=True)


def open_pipeline_folder(path: str, open_safetensors) -> PipelineFolder:
    """Open a pipeline folder lazily: its network component's safetensors headers are read, no tensor.
    open_safetensors: the reader of one weight file (neon.checkpoint's, which opens folders through this)."""
    path = os.path.abspath(os.fspath(path))
    read_json(os.path.join(path, MODEL_INDEX))
    module, component = net_component(path)
    class_name = read_json(os.path.join(component, "config.json")).get("_class_name")
    shards = []
    for file in weight_files(component):
        shards.append(open_safetensors(paths.input_file(file, "safetensors weight file")))
    seen: set[str] = set()
    for shard in shards:
        twice = seen & set(shard.tensors)
        if twice:
            raise NeonError(f"{shard.path}: tensor {sorted(twice)[0]!r} is also in another shard")
        seen |= set(shard.tensors)
    return PipelineFolder(path, module, class_name if isinstance(class_name, str) else None, shards)

