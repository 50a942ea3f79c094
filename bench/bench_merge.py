"""Merge time and peak memory on ≥1 GB checkpoints, in every container `neon merge` supports.

    python bench/bench_merge.py [--gb 1.0] [--tensors 400] [--dir /tmp/neon-bench-merge]

For each container it writes θr and θs (fp32, many tensors), then, each in a fresh process, (a) reads both files
plainly (the baseline) and (b) runs `neon.merge.merge_files`. It prints seconds, peak RSS above the process's
resident size before the work (the interpreter and torch), that peak divided by the checkpoint size, and the
merge's time relative to the plain read. Targets: RSS ratio ≤ 0.25 for safetensors, ≤ 1.25 for .pth.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import types

import torch

CONTAINERS = ("pth", "pth-model_ema", "safetensors", "pickle")


def _tensors(gb: float, count: int, seed: int) -> dict[str, torch.Tensor]:
    per = int(gb * 2**30 / 4 / count)
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.weight": torch.randn(per, generator=g) for i in range(count)}


class _Persistent:
    """Pickles like a torch_utils.persistence object (EDM/IMM releases), through a stand-in module."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (
            {"type": "class", "version": 6, "module_src": "# source omitted", "class_name": "BenchNet",
             "state": self.state},)


def _write(container: str, sd: dict, path: str) -> None:
    if container == "pth":
        torch.save(sd, path)
    elif container == "pth-model_ema":
        torch.save({"model_ema": sd, "epoch": 1}, path)
    elif container == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        fake = types.ModuleType("torch_utils.persistence")
        fake._reconstruct_persistent_obj = lambda meta: meta
        fake._reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        fake._reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        sys.modules["torch_utils"] = types.ModuleType("torch_utils")
        sys.modules["torch_utils.persistence"] = fake
        state = {"_parameters": sd, "_buffers": {}, "_non_persistent_buffers_set": set(), "_modules": {}}
        with open(path, "wb") as f:
            pickle.dump({"ema": _Persistent(state), "augment_pipe": None}, f, protocol=4)


_CHILD = r"""
import json, os, sys, time
import torch
from neon.merge import merge_files
def status_mb(field):  # VmRSS: resident now; VmHWM: peak resident (ru_maxrss would include the parent's, via exec)
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ':')) / 1024
def rss_mb():
    return status_mb('VmRSS')
mode, ref, synth, out = sys.argv[1:5]
before = rss_mb()
t0 = time.perf_counter()
if mode == 'read':
    for p in (ref, synth):
        with open(p, 'rb') as f:
            while f.read(64 << 20):
                pass
else:
    merge_files(ref, synth, 0.5, out, force=True)
seconds = time.perf_counter() - t0
peak = status_mb('VmHWM')
print(json.dumps({'seconds': seconds, 'peak_mb': peak, 'before_mb': before}))
"""


def _measure(mode: str, ref: str, synth: str, out: str) -> dict:
    # Drop the page cache's claim on these files is impossible without root; both modes read the same files
    # right after each other, so both see the same cache state.
    res = subprocess.run([sys.executable, "-c", _CHILD, mode, ref, synth, out], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of each checkpoint")
    p.add_argument("--tensors", type=int, default=400)
    p.add_argument("--dir", default="/tmp/neon-bench-merge")
    p.add_argument("--containers", nargs="+", default=list(CONTAINERS))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print(f"{'container':<15} {'size GB':>7} {'read s':>7} {'merge s':>8} {'merge/read':>10} "
          f"{'peak RSS MB':>11} {'RSS/size':>8}")
    try:
        for container in args.containers:
            ext = {"safetensors": ".safetensors", "pickle": ".pkl"}.get(container, ".pth")
            ref, synth, out = (os.path.join(args.dir, n + ext) for n in ("ref", "synth", "neon"))
            _write(container, _tensors(args.gb, args.tensors, 0), ref)
            _write(container, _tensors(args.gb, args.tensors, 1), synth)
            size = os.path.getsize(ref)
            read = _measure("read", ref, synth, out)
            merge = _measure("merge", ref, synth, out)
            extra = merge["peak_mb"] - merge["before_mb"]
            print(f"{container:<15} {size / 2**30:7.2f} {read['seconds']:7.2f} {merge['seconds']:8.2f} "
                  f"{merge['seconds'] / read['seconds']:10.2f} {extra:11.0f} {extra * 2**20 / size:8.3f}", flush=True)
            for path in (ref, synth, out):
                os.remove(path)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
