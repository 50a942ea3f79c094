"""Faster arithmetic for sampling, behind flags: TF32 matmuls and convolutions, `torch.compile` of a network's
forward, channels-last memory for convolutional networks.

Each one keeps the computation and changes only its rounding: images agree with the eager float32 path to within
a few uint8 steps (tests check it on CPU), not bit for bit. All of them are off unless asked for, and each is
scoped to a `with` block, so a network leaves sampling exactly as it came (the same state_dict keys, memory
format and backend flags).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from neon.errors import NeonError

COMPILED = "_neon_compiled_forward"   # where `compiled` keeps a module's compiled forwards, per setting


_asked_tf32 = False   # inside `tf32(True)`: the user asked for TF32 sampling (neon sample --tf32)


@contextlib.contextmanager
def tf32(on: bool = True):
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (CUDA only; the official IMM and VAR
    samplers turn both on, and cuDNN's default already allows it for convolutions)."""
    global _asked_tf32
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, _asked_tf32
    if on:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = _asked_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, _asked_tf32 = previous


@dataclasses.dataclass(frozen=True)
class Backends:
    """The CUDA backend settings a stage runs under, as a family's official code sets them for it (a family
    declares one for sampling and one for training: Family.BACKENDS). The defaults are PyTorch's."""
    matmul_tf32: bool = False         # torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32: bool = True           # torch.backends.cudnn.allow_tf32
    cudnn_benchmark: bool = False     # torch.backends.cudnn.benchmark: time the convolution algorithms once


@contextlib.contextmanager
def backends(b: Backends | None):
    """Inside the block, torch.backends as `b` says (None: as they are); restored on exit. TF32 that the user
    asked for (`tf32(True)` around the block) stays on."""
    if b is None:
        yield
        return
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    previous = flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark
    flags[0].allow_tf32 = b.matmul_tf32 or _asked_tf32
    flags[1].allow_tf32 = b.cudnn_tf32 or _asked_tf32
    flags[1].benchmark = b.cudnn_benchmark
    try:
        yield
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark = previous


def compile_options(on: bool | str) -> dict | None:
    """A `compile` setting -> torch.compile's keyword arguments, None when off. True (or 'true'): inductor in its
    default mode; an inductor mode name ('reduce-overhead', 'max-autotune', ...): inductor in that mode; another
    backend's name ('aot_eager' checks the graph capture without code generation, which takes minutes on a CPU):
    that backend. False, None (or 'false', 'none', ''): off."""
    if isinstance(on, str) and on.strip().lower() in ("true", "false", "none", ""):
        on = on.strip().lower() == "true"
    if on is None or on is False:
        return None
    if on is True:
        return {}
    import torch._dynamo
    import torch._inductor
    modes = list(torch._inductor.list_mode_options())
    if on in modes:
        return {"mode": on}
    if on in torch._dynamo.list_backends(exclude_tags=()):
        return {"backend": on}
    raise NeonError(f"compile: {on!r} is neither true/false, a torch.compile mode ({', '.join(modes)}) "
                    f"nor a backend ('aot_eager', 'eager', ...)")


@contextlib.contextmanager
def compiled(module: torch.nn.Module, on: bool | str = True):
    """Inside the block, `module(...)` runs its forward through torch.compile (compiled once per module and
    setting, and kept; the first call of each new input shape pays the compilation). Parameters and keys are
    untouched. on: a `compile_options` setting."""
    options = compile_options(on)
    if options is None:
        yield module
        return
    key = ",".join(f"{k}={v}" for k, v in options.items()) or "inductor"
    cache = module.__dict__.setdefault(COMPILED, {})
    if key not in cache:
        cache[key] = torch.compile(type(module).forward.__get__(module), **options)
    module.forward = cache[key]
    try:
        yield module
    finally:
        del module.forward


@contextlib.contextmanager
def channels_last(module: torch.nn.Module, on: bool = True):
    """Inside the block the module's 4-D weights are in channels-last layout (NHWC convolution kernels on
    GPUs); they are made contiguous again afterwards."""
    if not on:
        yield module
        return
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


def copy_module(module: torch.nn.Module, shared: list[torch.nn.Module] = ()) -> torch.nn.Module:
    """A deep copy of `module` that shares the modules in `shared` (frozen helpers a network keeps a reference
    to, such as VAR's VQVAE) and leaves out the compiled forwards `compiled` kept: those are bound to the
    original and would silently run its weights in the copy."""
    memo = {id(m): m for helper in shared for m in helper.modules()}
    for m in module.modules():
        if COMPILED in m.__dict__:
            memo[id(m.__dict__[COMPILED])] = {}
    return copy.deepcopy(module, memo=memo)
