"""torchrun helpers: one process or many, NCCL on GPU and gloo on CPU, same results either way.

Work is dealt in units that do not depend on the number of processes: rank r takes every world_size-th unit
starting at r (`shard`). Sampling deals whole batches of consecutive seeds (neon.sampling.plan_batches), so each
image is computed in the same batch, and comes out the same, however many processes draw the set.
"""
from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def init(backend: str | None = None) -> torch.device:
    """Join the torchrun process group if there is one (idempotent); return this rank's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        if use_cuda:
            torch.cuda.set_device(device())
        timeout = float(os.environ.get("NEON_COLLECTIVE_TIMEOUT_S", 3600))   # a collective's longest wait
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout))
    return device()


def device() -> torch.device:
    """This rank's device: GPU LOCAL_RANK modulo the GPUs the process sees (a launcher that shows each process only
    its own GPU makes that cuda:0 for every rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wait_for_main(done: Callable[[], bool], poll_s: float = 2.0) -> None:
    """Every rank but 0 polls `done()` (a file rank 0 writes, on a file system all ranks share) instead of
    waiting in a collective: rank 0's solo work — joining a synthetic set of hundreds of GB — may outlast any
    collective's timeout. If rank 0 dies, torchrun stops the others."""
    if not is_main():
        while not done():
            time.sleep(poll_s)


def shard(items: Sequence, r: int | None = None, n: int | None = None) -> list:
    """This rank's share of `items`: every n-th item starting at r (balanced to within one item)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    return list(items[r::n])


def _comm_device() -> torch.device:
    return device() if is_distributed() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 (ranks may hold different numbers of rows), in rank order."""
    if not is_distributed():
        return x
    dev = _comm_device()
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes) - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)
    padded = torch.cat([x.to(dev), pad])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(x.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks (returns a new tensor on x's device)."""
    if not is_distributed():
        return x.clone()
    y = x.to(_comm_device()).clone()
    dist.all_reduce(y)
    return y.to(x.device)

