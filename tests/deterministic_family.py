"""A test family whose loss draws nothing at random, so data-parallel training can be compared across process
counts (imported by subprocesses as `deterministic_family:DeterministicPix`)."""
import torch

from neon.testing import TinyPixFamily


class DeterministicPix(TinyPixFamily):
    name = "deterministic-pix"

    def loss(self, bundle, batch):
        y = batch["x"]
        sigma = torch.full((y.shape[0],), 0.5, device=y.device)
        noise = y.flip(-1).roll(1, dims=-2) * 0.5  # a fixed function of the example: no random draws
        D = bundle.net(y + noise, sigma, batch.get("label"))
        return ((D - y) ** 2).mean()
