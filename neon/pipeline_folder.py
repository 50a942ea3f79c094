"""A diffusers pipeline folder as a checkpoint container: `model_index.json` beside one folder per component.

The merged network is one component: the EMA one where the folder keeps one (`unet_ema/`, `transformer_ema/`),
else `unet/` or `transformer/`; old single-model layouts keep it at the top level (`config.json` +
`diffusion_pytorch_model.safetensors` beside `model_index.json`). Its weights are one safetensors file or shards
listed in `diffusion_pytorch_model.safetensors.index.json`. Only safetensors are read: `.bin` pickles are never
opened.

`PipelineFolder` gives the merge what a one-file `Checkpoint` gives it: the component's tensors as lazy
references, `read(key)`, and `write(out, replace)`, which copies the whole folder and rewrites each shard tensor
by tensor (same layout, same dtypes), so `DiffusionPipeline.from_pretrained` loads the result as the input.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from neon import paths
from neon.errors import NeonError

MODEL_INDEX = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = WEIGHTS + ".index.json"
# Components that hold the denoising network, in the order the merge prefers them (the EMA network first).
NET_COMPONENTS = ("unet_ema", "transformer_ema", "unet", "transformer")


def is_pipeline_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


def read_json(path: str) -> dict:
    """A JSON object from `path`; anything else is a one-line NeonError naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise NeonError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NeonError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NeonError(f"{path}: expected a JSON object")
    return data


def net_component(folder: str) -> tuple[str, str]:
    """(name, folder) of the network the merge touches: the EMA component first; '' names the flat layout."""
    for name in NET_COMPONENTS:
        sub = os.path.join(folder, name)
        if os.path.isfile(os.path.join(sub, "config.json")):
            return name, sub
    if os.path.isfile(os.path.join(folder, "config.json")):
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
    if os.path.isfile(single):
        return [single]
    index = os.path.join(component, SHARD_INDEX)
    if not os.path.isfile(index):
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
        write_folder(out, lambda tmp: self._fill(tmp, replace))

    def _fill(self, tmp: str, replace) -> None:
        rewritten = {os.path.abspath(shard.path) for shard in self.shards}

        def skip(folder: str, names: list[str]) -> list[str]:   # the shards are written below, not copied
            return [n for n in names if n in (".cache", "__pycache__") or paths.TEMP_TAG in n
                    or os.path.abspath(os.path.join(folder, n)) in rewritten]
        shutil.copytree(self.path, tmp, symlinks=False, ignore=skip)
        for shard in self.shards:
            shard._write_safetensors(os.path.join(tmp, os.path.relpath(shard.path, self.path)), replace)


def write_folder(out: str, fill) -> None:
    """fill(tmp) builds a folder at a temporary path beside `out`; it then replaces `out` (an existing `out`
    is moved aside first and removed once the new one is in place). On error the temporary folder is removed."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise NeonError(f"{out}: exists and is not a folder")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp, old = paths.temp_path(out), paths.temp_path(out) + "-old"
    remove_stale_folders(os.path.dirname(out))
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        fill(tmp)
        if os.path.exists(out):
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

