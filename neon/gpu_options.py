"""GPU options given for a CPU run: --tf32 and the sampler arguments compile and autocast.

Each is named in a one-line warning on stderr, once per process and by rank 0 only. autocast is left out on a
CPU: the official samplers keep it to CUDA, so CPU images stay the float32 ones, while a config written for GPUs
(a smoke run of it, say) still runs. compile is kept, since it changes the speed, not the images.
"""
from __future__ import annotations

import os
import sys

import torch

# A GPU option given for a CPU run -> why it is no use there (the warning's second half).
CPU_WARNINGS = {
    "tf32": "TF32 is a CUDA tensor-core format; a CPU computes float32 as before",
    "compile": "torch.compile makes a CPU spend minutes compiling the network, far longer than the sampling it "
               "would speed up",
    "autocast": "autocast is a CUDA option here (as in the official samplers): ignored, the CPU samples in float32",
}
_warned: set[str] = set()


def warn_once(option: str, why: str) -> None:
    """'warning: {option} on a CPU: {why}' on stderr, by rank 0, the first time this process meets `option`."""
    if option not in _warned and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {option} on a CPU: {why}", file=sys.stderr, flush=True)
    _warned.add(option)


def _on(value) -> bool:
    return value not in (None, False) and str(value).strip().lower() not in ("false", "none", "")


def on_cpu(device: torch.device | str, sampler_args: dict, tf32: bool = False) -> dict:
    """The sampler arguments for a run on `device`: unchanged on a GPU; on a CPU, with each GPU option given
    warned about (once per process) and autocast left out."""
    if torch.device(device).type != "cpu":
        return sampler_args
    if tf32:
        warn_once("--tf32", CPU_WARNINGS["tf32"])
    if _on(sampler_args.get("compile")):
        warn_once(f"compile={sampler_args['compile']}", CPU_WARNINGS["compile"])
    if "autocast" in sampler_args:
        if _on(sampler_args["autocast"]):
            warn_once(f"autocast={sampler_args['autocast']}", CPU_WARNINGS["autocast"])
        return {k: v for k, v in sampler_args.items() if k != "autocast"}
    return sampler_args
