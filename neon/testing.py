"""`tinypix`: a family of a few thousand parameters so every stage of the core runs end to end on CPU.

A small convolutional denoiser on 8×8 RGB images, conditional or not, with a 4-step deterministic sampler whose
only randomness is the per-seed initial noise. It is not a good generator; it is a real one — it trains, its
samples change with its weights, and its checkpoints go through the same containers as the paper's families.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from neon import containers
from neon.checkpoint import atomic_save, open_checkpoint
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults

# (module, parameter name within it, full name, parameter) -> the value made of its N(0, 1) draw z, or None to
# keep the tensor (and draw nothing for it).
Rule = Callable[[nn.Module, str, str, torch.Tensor], "Callable[[torch.Tensor], torch.Tensor] | None"]


def fan_in_rule(module: nn.Module, name: str, full_name: str, p: torch.Tensor):
    """Weights N(0, 1/fan_in), everything else N(0, 0.05²)."""
    if name == "weight":
        return lambda z: z / math.sqrt(p[0].numel())
    return lambda z: 0.05 * z


@torch.no_grad()
def randomize(net: nn.Module, seed: int, rule: Rule = fan_in_rule) -> None:
    """Overwrite the learnable tensors of a tiny network with values made of N(0, 1) draws, in parameter order,
    from a generator seeded with `seed`. Official initialisations zero some output layers, which would leave
    parts of a tiny network without effect on its output; these values make every parameter move it, so tests
    see every code path. The caller's RNG is left alone."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    seen = set()
    for module_name, module in net.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            value = rule(module, name, f"{module_name}.{name}" if module_name else name, p)
            if value is not None:
                p.copy_(value(torch.randn(p.shape, generator=g)))


class TinyDenoiser(nn.Module):
    """D(x, sigma, label) ≈ clean image; x: (B, 3, R, R) float, sigma: (B,), label: (B,) int64 or None."""

    def __init__(self, resolution: int = 8, channels: int = 16, num_classes: int = 0):
        super().__init__()
        self.resolution, self.num_classes = resolution, num_classes
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.noise_emb = nn.Linear(2, channels)
        self.label_emb = nn.Embedding(num_classes, channels) if num_classes else None
        self.conv_mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))  # an integer buffer, never merged

    def forward(self, x, sigma, label=None):
        c_noise = torch.stack([sigma.log() / 4, torch.ones_like(sigma)], dim=1)
        emb = self.noise_emb(c_noise)
        if self.label_emb is not None:
            if label is None:
                raise NeonError("conditional tinypix network called without labels")
            emb = emb + self.label_emb(label)
        h = torch.relu(self.conv_in(x / (1 + sigma[:, None, None, None] ** 2).sqrt()))
        h = torch.relu(self.conv_mid(h) + emb[:, :, None, None])
        return x / (1 + sigma[:, None, None, None] ** 2) + self.conv_out(h)


SIGMAS = (4.0, 1.5, 0.5, 0.1)


class TinyPixFamily(Family):
    name = "tinypix"
    CONTAINERS = (containers.TORCH_ZIP, containers.SAFETENSORS)   # what `load` reads
    train_defaults = TrainDefaults(optimizer="adam", betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0)
    SAMPLER_ARGS = (Arg("num_steps", int, 4, f"Euler steps, at most {len(SIGMAS)} (the first noise levels)"),)
    TINY_ARGS = (Arg("num_classes", int, 0, "0 = unconditional, else class-conditional"),)

    def _bundle(self, net: TinyDenoiser, source: str | None, device) -> Bundle:
        net.eval().requires_grad_(False).to(device)
        return Bundle(net=net, num_classes=net.num_classes, resolution=net.resolution, source=source)

    def tiny(self, device="cpu", seed: int = 0, num_classes: int = 0) -> Bundle:
        torch.manual_seed(seed)
        return self._bundle(TinyDenoiser(num_classes=int(num_classes)), None, device)

    def load(self, path: str, device="cpu") -> Bundle:
        ckpt = open_checkpoint(path)
        sd = ckpt.state_dict()
        if "conv_in.weight" not in sd:
            raise NeonError(f"{path}: not a tinypix checkpoint")
        num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0
        net = TinyDenoiser(channels=sd["conv_in.weight"].shape[0], num_classes=num_classes)
        net.load_state_dict(sd, strict=True)
        return self._bundle(net, path, device)

    @torch.no_grad()
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels=None, num_steps: int = 4) -> torch.Tensor:
        if bundle.conditional and labels is None:
            raise NeonError("tinypix: a conditional model needs labels")
        device = next(bundle.net.parameters()).device
        r = bundle.resolution
        x = torch.stack([torch.randn(3, r, r, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(device) * SIGMAS[0]
        labels = None if labels is None else labels.to(device)
        sigmas = list(SIGMAS[:num_steps]) + [0.0]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            denoised = bundle.net(x, torch.full((x.shape[0],), sigma, device=device), labels)
            x = denoised + (x - denoised) * (sigma_next / sigma)  # Euler step of the probability-flow ODE
        return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def encode(self, bundle: Bundle, images: torch.Tensor, labels=None) -> dict:
        out = {"x": images.permute(0, 3, 1, 2).float() / 127.5 - 1}
        if bundle.conditional:
            out["label"] = labels.long()
        return out

    def loss(self, bundle: Bundle, batch: dict) -> torch.Tensor:
        y = batch["x"]
        sigma = (torch.randn(y.shape[0], device=y.device) * 1.2 - 1.2).exp()
        n = torch.randn_like(y) * sigma[:, None, None, None]
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        D = bundle.net(y + n, sigma, batch.get("label"))
        return (weight[:, None, None, None] * (D - y) ** 2).mean()

    def save(self, bundle: Bundle, path: str) -> None:
        sd = {k: v.detach().cpu() for k, v in bundle.net.state_dict().items()}
        atomic_save({"model": sd, "family": "tinypix"}, path)

