"""Batch-invariant arithmetic on CPU: an image's floating-point result must not depend on the batch it is in.

Per-image generators make every random draw depend on the seed alone, but that is not enough for bit-identical
images: CPU BLAS picks different kernels (different summation orders) for a matrix product with 2 rows than
with 14, and oneDNN picks different convolution algorithms for different batch sizes. The last bits then
differ, and now and then a pixel lands on the other side of a uint8 step. Inside `batch_invariant()`:
  - VAR's linear layers run as one matrix product per image (`torch.bmm`, whose per-matrix kernel depends on
    that matrix's shape only);
  - convolutions bypass oneDNN (PyTorch's own kernel computes each image with the same product).
Attention, normalisation, interpolation and the sampler's element-wise steps are per-row already. The mode is
slower (no oneDNN; the VQVAE decoder's convolutions dominate), so sampling uses it only when asked for
(`VARFamily.sample(batch_invariant=True)`, `neon sample --batch-invariant`); encoding uses it on CPU so that
cached tokens do not depend on the encoding batch. CUDA kernels make no such promise; on a GPU an image is
reproducible for a fixed batch composition and device type.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

_state = threading.local()


def enabled() -> bool:
    return getattr(_state, "on", False)


@contextlib.contextmanager
def batch_invariant(on: bool = True):
    previous, previous_onednn = enabled(), torch.backends.mkldnn.enabled
    _state.on = on
    if on:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        _state.on = previous
        torch.backends.mkldnn.enabled = previous_onednn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or in batch-invariant mode one product per leading index: x (B, ..., in) -> (B, ..., out)."""
    if not enabled() or x.ndim < 2:
        return F.linear(x, weight, bias)
    B = x.shape[0]
    x3 = x.reshape(B, -1, x.shape[-1])
    w = weight.t().unsqueeze(0).expand(B, -1, -1)
    if bias is None:
        out = torch.bmm(x3, w)
    else:
        out = torch.baddbmm(bias.expand(B, 1, -1), x3, w)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) that follows the batch-invariant mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
