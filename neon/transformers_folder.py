"""A transformers model folder's weights, read as data: `model.safetensors`, or the shards that
`model.safetensors.index.json` lists by plain file name inside the folder. Never a `.bin` (a pickle)."""
from __future__ import annotations

import os

import torch

from neon import paths
from neon.errors import NeonError, one_line
from neon.pipeline_folder import read_json

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(folder: str) -> list[str]:
    """model.safetensors, else the shards model.safetensors.index.json lists (plain names inside `folder`)."""
    single, index = os.path.join(folder, WEIGHTS), os.path.join(folder, INDEX)
    if not os.path.lexists(single) and os.path.lexists(index):
        shards = read_json(index).get("weight_map")
        names = list(dict.fromkeys(shards.values())) if isinstance(shards, dict) and shards else [None]
        if not all(isinstance(n, str) and n not in ("", ".", "..") and os.path.basename(n) == n for n in names):
            raise NeonError(one_line(f"{index}: weight_map must map tensors to file names in the folder"))
        return [paths.input_file(os.path.join(folder, n), "safetensors file") for n in names]
    if not os.path.lexists(single):
        raise NeonError(f"{single}: not found (nor {INDEX}); only safetensors weights are read, never a .bin")
    return [paths.input_file(single, "safetensors file")]


def read_safetensors(path: str, data: bool) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`; data=False: meta tensors of its header's shapes (no data read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) if data else torch.empty(f.get_slice(k).get_shape(), device="meta")
                    for k in f.keys()}
    except Exception as e:   # safetensors' refusals: not its format, a bad header, offsets beyond the file
        raise NeonError(one_line(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})")) from None


