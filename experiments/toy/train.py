"""Adam on a fixed point set, in order, batch by batch — used for the base models and for self-training.

Not neon.selftrain's loop: that one trains a family's checkpoint on encoded image files and snapshots to disk;
the toy trains bare 2-D models in memory, keeping a state dict at each of many epochs."""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]   # (model, batch (B, 2)) -> scalar loss


_GLOBAL_RNG = threading.Lock()   # init_model borrows the global RNG: one model at a time, whatever the thread


def init_model(factory: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    """factory() with its default initialisation drawn from `generator` (the global RNG is left untouched)."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        return factory()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of model's state dict (a snapshot that later steps do not change)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, epochs: int, lr: float, batch: int = 2048,
        snapshots: Iterable[int] = (), desc: str = "train", progress: bool = True) -> dict[int, dict]:
    """Train `model` in place with a fresh Adam: each epoch visits x: (N, 2) in order, `batch` rows per step
    (N ≤ batch is full-batch, one step per epoch). Returns {epoch: state dict} for each epoch in `snapshots`."""
    snapshots = set(snapshots)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)   # one op per step, same numbers
    model.train()
    saved = {}
    for epoch in tqdm(range(1, epochs + 1), desc=desc, disable=not progress, leave=False):
        for i in range(0, x.shape[0], batch):
            loss = loss_fn(model, x[i:i + batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in snapshots:
            saved[epoch] = state(model)
    model.eval()
    return saved


def finetune(theta_r: nn.Module, loss_fn: LossFn, synthetic: torch.Tensor, epochs: Iterable[int], lr: float,
             batch: int = 2048, desc: str = "self-train", progress: bool = True) -> dict[int, dict]:
    """Self-training: a copy of θr trained on its own samples with a fresh Adam -> {epoch: θs state dict}."""
    epochs = sorted(set(epochs))
    theta_s = copy.deepcopy(theta_r)
    return fit(theta_s, loss_fn, synthetic, epochs[-1], lr, batch, epochs, desc, progress)
