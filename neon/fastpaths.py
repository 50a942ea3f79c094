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

import torch

COMPILED = "_neon_compiled_forward"   # where `compiled` keeps a module's compiled forwards, per backend


@contextlib.contextmanager
def tf32(on: bool = True):
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (CUDA only; the official IMM and VAR
    samplers turn both on, and cuDNN's default already allows it for convolutions)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def compiled(module: torch.nn.Module, on: bool | str = True):
    """Inside the block, `module(...)` runs its forward through torch.compile (compiled once per module and
    kept; the first call of each new input shape pays the compilation). Parameters and keys are untouched.
    on: True (the default inductor backend) or a backend name ('aot_eager' checks the graph capture without
    code generation, which takes minutes on a CPU)."""
    if not on:
        yield module
        return
    backend = "inductor" if on is True else str(on)
    cache = module.__dict__.setdefault(COMPILED, {})
    if backend not in cache:
        cache[backend] = torch.compile(type(module).forward.__get__(module), backend=backend)
    module.forward = cache[backend]
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
