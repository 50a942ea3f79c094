"""What a pipeline folder's JSON configs may ask diffusers to build, checked before anything is built.

diffusers allocates what a config describes: a scheduler of `num_train_timesteps` steps, embedding tables of
`num_class_embeds` rows, convolutions of `block_out_channels` channels, a DiT's table of (sample_size / patch_size)²
positions. A config of a few hundred bytes could so ask for gigabytes before a weight is compared. Each check is a
one-line refusal naming the file and the field (or tensor):

- every number at most MAX_NUMBER, every list at most MAX_LEVELS long, the fields that repeat blocks at most
  MAX_LAYERS; a scheduler's `num_train_timesteps` in [1, MAX_TIMESTEPS], its `trained_betas` one number per step;
- the network is built on the meta device (no memory) and must hold exactly the tensors, of the shapes, that its
  safetensors headers give (read without the data): what the real build allocates is then what the weights hold;
- what its constructor computes besides (buffers such as a DiT's positional table) is at most MAX_BUFFER_BYTES.
"""
from __future__ import annotations

import math

import torch

from neon.checkpoint import check_state_dict, open_checkpoint
from neon.errors import NeonError, shown

# The released configs (google/ddpm-*, facebook/DiT-XL-2-*, the Stable Diffusion VAEs) have at most 1280
# channels, 1000 classes and steps, sides of 1024 and 6 levels of at most 3 blocks (a DiT: 28 layers). These bounds
# leave them far more room than any of them takes, and stop what no real network holds.
MAX_NUMBER = 1 << 16        # any integer in a config: channels, classes, sides, heads, ...
MAX_LEVELS = 16             # entries of a list: block_out_channels, down_block_types, ...
MAX_LAYERS = 128            # blocks a field repeats
REPEATS = ("layers_per_block", "num_layers", "transformer_layers_per_block")
MAX_TIMESTEPS = 1 << 16     # a scheduler's training steps (1000 in every released pipeline, 4000 in some papers)
MAX_BUFFER_BYTES = 1 << 28  # buffers a constructor computes (DiT-XL/2 at 512x512: a 5 MB positional table)


def class_name(path: str, config: dict) -> str:
    """The config's `_class_name`, refused unless it is a string."""
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise NeonError(f"{path}: _class_name must be a class name (a string), got {shown(name)}")
    return name


def _integral(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or \
        isinstance(value, float) and math.isfinite(value) and value == int(value)


def check_numbers(path: str, config: dict, long_lists: dict[str, int] | None = None) -> None:
    """Every field's integers at most MAX_NUMBER (infinities and fractions are left to diffusers), lists at most
    MAX_LEVELS long (`long_lists`: name -> its own bound), repeat counts at most MAX_LAYERS."""
    for field, value in config.items():
        if field.startswith("_"):
            continue
        values = value if isinstance(value, list) else [value]
        bound = (long_lists or {}).get(field, MAX_LEVELS)
        if isinstance(value, list) and len(value) > bound:
            raise NeonError(f"{path}: {field} has {len(value)} entries, at most {bound}")
        limit = MAX_LAYERS if field in REPEATS else MAX_NUMBER
        big = next((v for v in values if _integral(v) and abs(v) > limit), None)
        if big is not None:
            raise NeonError(f"{path}: {field} is {shown(value)}, larger than any real config's (at most {limit})")


def check_scheduler(path: str, config: dict) -> None:
    """A scheduler config's numbers, its number of training steps and its trained betas."""
    check_numbers(path, config, long_lists={"trained_betas": MAX_TIMESTEPS})
    steps = config.get("num_train_timesteps", 1000)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_TIMESTEPS):
        raise NeonError(f"{path}: num_train_timesteps must be an integer in [1, {MAX_TIMESTEPS}], got {shown(steps)}")
    betas = config.get("trained_betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == steps and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise NeonError(f"{path}: trained_betas must be null or {steps} numbers in [0, 1) (one per training step), "
                        f"got {shown(betas)}")


def build_scheduler(path: str, cls, config: dict):
    """cls.from_config(config), every failure one line naming the file."""
    check_scheduler(path, config)
    return _built(path, cls, lambda: cls.from_config(config))


def check_network(path: str, cls, config: dict, weight_files: list[str]) -> None:
    """Refuse a network config whose network (built on the meta device) is not the one its weight files hold."""
    check_numbers(path, config)
    with torch.device("meta"):
        model = _built(path, cls, lambda: cls.from_config(config))
    expected = model.state_dict()
    stored = {key: ref for file in weight_files for key, ref in open_checkpoint(file).tensors.items()}
    _check_shapes(path, config, expected, stored)
    check_state_dict(expected, stored, f"{path}: the {cls.__name__} it describes is not the one its weights hold")
    extra = {name: b for name, b in model.named_buffers() if name not in expected}
    size = sum(b.numel() * b.element_size() for b in extra.values())
    if size > MAX_BUFFER_BYTES:
        name, b = max(extra.items(), key=lambda item: item[1].numel())
        raise NeonError(f"{path}: the network computes {size} bytes of buffers besides its weights ({name} of shape "
                        f"{tuple(b.shape)}), more than {MAX_BUFFER_BYTES}; sample_size or patch_size is implausible")


def _check_shapes(path: str, config: dict, expected: dict, stored: dict) -> None:
    """Refuse the first tensor the config gives another shape than its weights do, naming the fields that hold
    the sizes that differ (block_out_channels, num_class_embeds, ...)."""
    for key, t in expected.items():
        want, got = tuple(t.shape), tuple(stored[key].shape) if key in stored else None
        if got is None or want == got:
            continue
        differ = {w for i, w in enumerate(want) if len(want) != len(got) or got[i] != w}
        fields = [f for f, v in config.items() if not f.startswith("_") and
                  any(_integral(x) and x in differ for x in (v if isinstance(v, list) else [v]))]
        if fields:
            raise NeonError(f"{path}: {', '.join(fields)} give{'s' * (len(fields) == 1)} {key} the shape {want}, "
                            f"its weights the shape {got}")
        return


def _built(path: str, cls, build):
    try:
        return build()
    except Exception as e:   # diffusers' own refusals (ValueError), and what a bad value breaks (TypeError, ...)
        why = str(e).splitlines()[0] if str(e) else ""
        raise NeonError(f"{path}: diffusers cannot build {cls.__name__} from it ({type(e).__name__}: {why})") from None
