"""The evaluation seam: a point of the selection is data, and `Scorer.score(point, seeds)` measures it.

A point says which weights are sampled (θneon(w) = (1+w)·θr − w·θs, θr itself, a fine-tuned θ, ...), with which
sampler arguments (guidance scale, guide scale ω), and how the record names it. Every selection protocol walks
points through `score`; the run's final evaluations and its baselines do too. `Scorer.holding` is the one place
weights enter the sampled network, and θr is back in it on exit, so no stage relies on another to restore it.

The point functions below are the methods compared: Neon's merge, θr alone (its guidance re-tuned), and a
network sampled with θs as a guide (self-guidance, Neon + guidance). Each maps a walk's coordinates — the first
one is w, or ω for a guide — to a Point.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch

from neon.evaluate import MetricFactory, evaluate_images
from neon.family import Bundle, Family
from neon.guidance import GUIDE_SCALE
from neon.merge import check_compatible, merge_state_dicts

Weights = Callable[[], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Point:
    at: dict                     # how the record names it: {'w', 'cfg', 'setting'} (+ 'omega' for a guide)
    weights: Weights | None      # the state dict sampled; None: θr, as the network holds it
    sampler: dict                # the sampler's arguments at this point


@dataclasses.dataclass(frozen=True)
class Seeds:
    """Which images a score is measured on: num_images seeds from `offset` (or per_class per class), labels from
    the classes [first, end) when `classes` is given."""
    num_images: int | None
    per_class: int | None
    offset: int
    batch: int
    classes: tuple[int, int] | None = None


class Scorer:
    """Samples a point's images with its weights in `bundle.net` and measures them with `metric`."""

    def __init__(self, family: Family, bundle: Bundle, metric: MetricFactory, theta_r: dict[str, torch.Tensor]):
        self.family, self.bundle, self.metric, self.theta_r = family, bundle, metric, theta_r

    @contextlib.contextmanager
    def holding(self, state: dict[str, torch.Tensor] | None) -> Iterator[Bundle]:
        """The bundle with the state dict `state` in its network (θr when None); θr is back in it on exit."""
        if state is None:
            yield self.bundle
            return
        self.bundle.net.load_state_dict(state)
        try:
            yield self.bundle
        finally:
            self.bundle.net.load_state_dict(self.theta_r)

    def score(self, point: Point, seeds: Seeds, desc: str | None = None) -> dict:
        """The metric's result on the point's images (plus 'num_images')."""
        with self.holding(None if point.weights is None else point.weights()) as bundle:
            return evaluate_images(self.family, bundle, self.metric, seeds.num_images, seeds.per_class, seeds.offset,
                                   seeds.batch, point.sampler, desc=desc, classes=seeds.classes)

    def with_bundle(self, bundle: Bundle) -> Scorer:
        """The same scorer sampling `bundle` (the same network with a guide set, say)."""
        return Scorer(self.family, bundle, self.metric, self.theta_r)


# ---------------------------------------------------------------------------------------------------------
# Point functions: (first coordinate, guidance scale, setting, base sampler arguments) -> Point.

PointAt = Callable[[float, "float | None", dict, dict], Point]


def sampler_args(base: dict, guidance: float | None, setting: dict, cfg_key: str) -> dict:
    """The sampler's arguments at one point: the configured ones, the setting, the guidance scale."""
    args = {**base, **setting}
    if guidance is not None:
        args[cfg_key] = guidance
    return args


def on_device(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(iter(like.values())).device
    return {k: v.to(device) for k, v in state.items()}


def neon(theta_r: dict, theta_s: dict, cfg_key: str) -> PointAt:
    """θneon(w) = (1+w)·θr − w·θs."""
    check_compatible(theta_r, theta_s)
    theta_s = on_device(theta_s, theta_r)

    def at(w, guidance, setting, base):
        return Point({"w": w, "cfg": guidance, "setting": setting},
                     functools.partial(merge_state_dicts, theta_r, theta_s, w),
                     sampler_args(base, guidance, setting, cfg_key))
    return at


def base_only(cfg_key: str) -> PointAt:
    """θr alone, whatever w the walk asks for: its guidance re-tuned on the same grid (w is recorded as 0)."""
    def at(w, guidance, setting, base):
        return Point({"w": 0.0, "cfg": guidance, "setting": setting}, None,
                     sampler_args(base, guidance, setting, cfg_key))
    return at


def guided(weights: dict | None, cfg_key: str) -> PointAt:
    """`weights` (None: θr) sampled with the bundle's guide θs at guide scale ω, the walk's first coordinate."""
    def at(omega, guidance, setting, base):
        return Point({"w": omega, "cfg": guidance, "setting": setting, "omega": omega},
                     None if weights is None else (lambda: weights),
                     {**sampler_args(base, guidance, setting, cfg_key), GUIDE_SCALE.name: omega})
    return at
