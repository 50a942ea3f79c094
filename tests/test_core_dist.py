"""Which GPU a torchrun process takes: its LOCAL_RANK among the GPUs it can see."""
import pytest
import torch

from neon import dist


@pytest.fixture
def gpus(monkeypatch):
    """A process launched as rank LOCAL_RANK of a torchrun job on a machine that shows it `n` GPUs; records the
    device it selects and the process group it asks for (none is started)."""
    calls = {"set_device": [], "backend": []}

    def launch(local_rank: int, n: int):
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
        monkeypatch.setattr(torch.distributed, "init_process_group",
                            lambda backend, **kw: calls["backend"].append(backend))
        return calls
    return launch


def test_a_process_shown_only_its_own_gpu_takes_cuda_0_whatever_its_local_rank(gpus):
    calls = gpus(local_rank=3, n=1)
    assert dist.init() == torch.device("cuda", 0)
    assert calls == {"set_device": [torch.device("cuda", 0)], "backend": ["nccl"]}


def test_a_process_shown_every_gpu_takes_the_one_of_its_local_rank(gpus):
    calls = gpus(local_rank=3, n=4)
    assert dist.init() == torch.device("cuda", 3)
    assert calls["set_device"] == [torch.device("cuda", 3)]
