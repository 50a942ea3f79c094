"""Run configuration: one YAML file per paper row, validated on load.

Every section is a dataclass; unknown keys, missing required keys and values of the wrong type are refused
with a one-line error that names the field (`finetune.lr: expected a number, got 'fast'`). The `smoke`
section holds overrides that `neon run --smoke` merges on top (tiny random network, tiny counts).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any

import yaml

from neon import paths
from neon.errors import NeonError, shown
from neon.family import Arg, Family, get_family
from neon.search import REFINE_CENTRES, REFINE_PATTERNS, STOP_RULES


class ConfigError(NeonError, ValueError):
    """A configuration problem, reported as one line naming the offending field."""


@dataclasses.dataclass
class SyntheticConfig:
    """Stage 1: the synthetic set S, drawn from θr with its usual mode-seeking sampler."""
    num_images: int | None = None        # number of seeds 0..N-1 (ignored when per_class is set)
    per_class: int | None = None         # conditional models: this many images of every class
    labels: str = "per_class"            # 'per_class' (balanced), 'random' (drawn from the seed) or 'none'
    seed_offset: int = 0                 # first seed
    batch: int = 64                      # images per sampler call on one rank
    sampler: dict[str, Any] = dataclasses.field(default_factory=dict)   # family sampler kwargs
    classes: list[int] | None = None     # [first, end): labels from these classes only (a text model's prompts
                                         # first..end-1 of its prompt set); per_class counts them. None: all


@dataclasses.dataclass
class FinetuneConfig:
    """Stage 2: brief self-training of θr on S (θs)."""
    lr: float = 1e-5
    batch: int = 64                      # global batch (split across ranks)
    total_images: int = 10_000           # training length, in images seen
    warmup_images: int = 0               # linear lr ramp from 0 over this many images
    ema: dict[str, float] | None = None  # None, {'beta': 0.9999} or {'halflife_images': 500_000}
    snapshot_every_images: int | None = None   # None = only the final snapshot
    # Or NVlabs/edm's training loop as the Neon repository runs it (training/training_loop.py, without the upstream
    # `cur_tick != 0` guard): training runs in ticks, a tick ending at the step where the images seen since its
    # start first reach tick_images; a snapshot follows every snapshot_ticks-th tick, counting from the first
    # (tick 0), and the last step.
    tick_images: int | None = None
    snapshot_ticks: int | None = None
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the family's TrainDefaults
    loss_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # passed to the family's loss via the bundle
    seed: int = 0
    log_every_images: int = 1000
    cache_dtype: str = "float32"         # dtype of cached float examples (latents); integer tokens keep theirs
    # Gradient accumulation: each process's share of a step's batch in this many micro-batches, their gradients
    # summed before the one optimizer step (the same global batch in less activation memory; each micro-batch
    # draws its own noise, so the result equals the one-pass step's in expectation, not bit for bit).
    accumulate: int = 1
    # Low-rank adapters instead of full fine-tuning (neon/lora_train.py): {rank: 4, alpha: 4, targets: [to_q, ...]};
    # None trains every weight.
    lora: dict[str, Any] | None = None


@dataclasses.dataclass
class SettingGrid:
    """One setting of the sampler arguments with its own grid (e.g. IMM's step count T, each with its own w and
    guidance lists in the official script)."""
    setting: dict[str, Any]              # sampler arguments of this setting, e.g. {steps: 1}
    w: list[float] | None = None         # its merge weights (None: the sweep's `w`)
    cfg: list[float] | None = None       # its guidance scales (None: the sweep's `cfg`)


@dataclasses.dataclass
class SweepConfig:
    """Stage 3: choose w (and the guidance scale) by FID on a few thousand samples."""
    w: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0])
    cfg: list[float] | None = None       # guidance scales to sweep jointly with w (AR / IMM rows)
    cfg_key: str = "cfg"                 # name of the guidance argument in the family's sampler
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # other sampler arguments, each value
                                         # a separate setting with its own best (w, cfg), e.g. IMM's {steps: [1, 8]}
    per_setting: list[SettingGrid] = dataclasses.field(default_factory=list)  # instead of `grid`: each setting
                                         # with its own w / cfg lists, walked in the order given
    num_images: int = 10_000
    per_class: int | None = None         # balanced labels for the sweep samples (else random from the seed)
    seed_offset: int = 0
    batch: int = 64
    classes: list[int] | None = None     # [first, end): the sweep's labels from these classes only (as synthetic's)
    # How the (w, cfg) plane is walked (neon/search.py):
    #   'grid': per cfg (outer), w in increasing order (inner), early stop once FID rises `tolerance` above the
    #           best along w; then best ± `refine` along w and along cfg.
    #   'official': the paper's protocol, as the official scripts: w (outer) in the order given, cfg (inner) in
    #           the order given; `stop`, `refine_pattern`, `refine_centre` and `refine_decimals` say which variant.
    #   'adaptive': the walk of neon/adaptive.py — each snapshot screened from the previous one's best on
    #           `start_images` images per point (bracket and shrink along w, then cfg), the snapshots' best points
    #           raced on the same seeds at doubling counts up to `num_images`; a user's config gets it by default.
    #   unset: 'adaptive', or 'grid' when the config gives a grid walk's options (tolerance, refine, grid,
    #           per_setting, objective kid), as configs written before 'adaptive' existed meant.
    search: str | None = None
    tolerance: float | None = None       # early stop: FID this much above the reference (None: no early stop)
    refine: float | None = None          # step of the refinement around the best point (None: no refinement)
    # search: official only —
    stop: str | None = None              # the w loop stops once a w's lowest FID is > tolerance above the 'previous'
                                         # w's lowest FID or the 'best' lowest FID of all earlier w (the cfg loop
                                         # always compares with the lowest FID of the current w)
    refine_pattern: str | None = None    # '3x3': all 8 neighbours (dw outer, dcfg inner); 'cross': the 4 on the axes
    refine_centre: str | None = None     # 'frozen': around the walk's best point; 'moving': each neighbour around the
                                         # best point so far (a better neighbour moves the rest of the pattern)
    refine_decimals: int | None = None   # neighbours printed with printf('%.Nf'), as the scripts (None: exact sums)
    # search: adaptive only —
    start_images: int | None = None      # images per point while screening (None: num_images/16, ≥ 4 per group)
    groups: int = 8                      # jackknife groups of a point's images (the std of paired differences)
    z: float = 2.0                       # a difference counts once it is z stds from zero
    indifference: float = 0.002          # points within this fraction of the leader's objective are equivalent:
                                         # the one closer to θr (smaller |w|) is kept
    sampler: dict[str, Any] = dataclasses.field(default_factory=dict)
    # which self-training snapshots are θs, each swept on its own: 'last', 'all', a file name, or a list of file
    # names or of image counts (images seen when the snapshot was written, as in its name snapshot-<images>)
    snapshot: str | list[int] | list[str] = "last"
    # what the search minimises, what picks each snapshot's best point and the best snapshot, and the main axis
    # of the plots: 'fid', 'fd_dinov2' (needs metrics.fd_dinov2) or 'kid' (KID's mean; needs metrics.kid).
    # Every point records every metric the metrics section asks for, whichever one is the objective.
    objective: str = "fid"
    # Prompt adherence kept: a point whose CLIP score (metrics.clip) falls more than this below θr's — w = 0 at the
    # same guidance and setting, on the same seeds — is not chosen, and ends the official walk along w as a worse
    # objective would. None: the objective alone decides. Grid and official searches only.
    clip_drop: float | None = None

    def __post_init__(self):
        check_search(self)


# sweep.objective -> the key of a metric result (neon.evaluate.FIDMetric) it minimises
OBJECTIVES = {"fid": "fid", "fd_dinov2": "fd_dinov2", "kid": "kid_mean"}
OBJECTIVE_LABELS = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "kid_mean": "KID"}
# Printed beside the objective when recorded (higher is better: not an objective)
METRIC_LABELS = {**OBJECTIVE_LABELS, "clip_score": "CLIP score"}


def metric_digits(key: str) -> int:
    """Decimals a metric is printed with: KID is ~1e-3 where FID is ~1."""
    return 6 if key.startswith("kid") else 4


def format_metric(key: str, value: float, sign: bool = False) -> str:
    """`value` of metric `key` with its decimals ('+' in front with `sign`); a value that rounds to zero is '0',
    never '-0.0000' or '+0.0000'."""
    digits = metric_digits(key)
    if round(value, digits) == 0:
        return "0"
    return f"{value:{'+' if sign else ''}.{digits}f}"


def objective_key(objective: str) -> str:
    """The result key `sweep.objective` names ('kid' -> 'kid_mean')."""
    return OBJECTIVES[objective]


SEARCHES = ("grid", "official", "adaptive")
OFFICIAL_ONLY = ("stop", "refine_pattern", "refine_centre", "refine_decimals")


def check_search(c: SweepConfig, where: str = "sweep") -> None:
    """Refuse an unknown search, a variant field the search does not use, or a value outside its range."""
    if c.search is None:
        walk = (c.tolerance, c.refine, c.grid or None, c.per_setting or None, c.objective == "kid" or None,
                *(getattr(c, name) for name in OFFICIAL_ONLY))
        c.search = "grid" if any(v is not None for v in walk) else "adaptive"
    if c.search not in SEARCHES:
        raise ConfigError(f"{where}.search: expected 'adaptive', 'grid' or 'official', got {c.search!r}")
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"{where}.objective: expected one of {', '.join(OBJECTIVES)}, got {c.objective!r}")
    if c.tolerance is not None and c.tolerance < 0:
        raise ConfigError(f"{where}.tolerance: must be >= 0, got {c.tolerance}")
    if c.refine is not None and c.refine <= 0:
        raise ConfigError(f"{where}.refine: must be positive, got {c.refine}")
    if c.search == "adaptive":
        check_adaptive(c, where)
    elif c.search == "grid":
        for name in OFFICIAL_ONLY:
            if getattr(c, name) is not None:
                raise ConfigError(f"{where}.{name}: only used by search: official")
    else:
        choices = {"stop": STOP_RULES, "refine_pattern": REFINE_PATTERNS, "refine_centre": REFINE_CENTRES}
        needed = {"stop": c.tolerance is not None, "refine_pattern": bool(c.refine), "refine_centre": bool(c.refine)}
        for name, options in choices.items():
            value = getattr(c, name)
            if value is None and needed[name]:
                raise ConfigError(f"{where}.{name}: search: official needs one of {', '.join(options)}")
            if value is not None and value not in options:
                raise ConfigError(f"{where}.{name}: expected one of {', '.join(options)}, got {shown(value)}")
        if c.refine_decimals is not None and not 0 <= c.refine_decimals <= 12:
            raise ConfigError(f"{where}.refine_decimals: expected 0 to 12, got {c.refine_decimals}")
    if c.per_setting and c.grid:
        raise ConfigError(f"{where}.per_setting: give either grid or per_setting, not both")
    if c.clip_drop is not None and not (isinstance(c.clip_drop, (int, float)) and c.clip_drop >= 0):
        raise ConfigError(f"{where}.clip_drop: a CLIP-score drop of 0 or more, got {shown(c.clip_drop)}")
    seen = []
    for i, s in enumerate(c.per_setting):
        if s.setting in seen:
            raise ConfigError(f"{where}.per_setting[{i}].setting: {s.setting} is listed twice")
        seen.append(s.setting)
        if s.w is not None and not s.w:
            raise ConfigError(f"{where}.per_setting[{i}].w: at least one merge weight is needed")


def check_adaptive(c: SweepConfig, where: str) -> None:
    """search: adaptive walks one setting's (w, cfg) grid by a Fréchet distance, without the grid walks' rules."""
    for name in OFFICIAL_ONLY + ("tolerance", "refine", "clip_drop"):
        if getattr(c, name) is not None:
            raise ConfigError(f"{where}.{name}: not used by search: adaptive (only by grid / official)")
    if c.grid or c.per_setting:
        raise ConfigError(f"{where}.{'grid' if c.grid else 'per_setting'}: search: adaptive walks one setting; "
                          "use search: official for a grid of settings")
    if c.objective == "kid":
        raise ConfigError(f"{where}.objective: search: adaptive needs a Fréchet distance (fid or fd_dinov2)")
    if c.groups < 2:
        raise ConfigError(f"{where}.groups: needs at least 2 jackknife groups, got {c.groups}")
    if c.start_images is not None and not 6 <= c.start_images <= c.num_images:
        raise ConfigError(f"{where}.start_images: expected 6 to num_images ({c.num_images}), got {c.start_images}")
    if c.num_images < 6:
        raise ConfigError(f"{where}.num_images: search: adaptive needs at least 6 (2 jackknife groups of 2 + 2), "
                          f"got {c.num_images}")
    if not (c.z > 0 and math.isfinite(c.z)):
        raise ConfigError(f"{where}.z: must be a positive number, got {c.z}")
    if not 0 <= c.indifference < 1:
        raise ConfigError(f"{where}.indifference: expected 0 ≤ indifference < 1, got {c.indifference}")
    if len(set(c.w)) != len(c.w) or (c.cfg and len(set(c.cfg)) != len(c.cfg)):
        raise ConfigError(f"{where}.{'w' if len(set(c.w)) != len(c.w) else 'cfg'}: a value is listed twice")


@dataclasses.dataclass
class FinalConfig:
    """Stage 4: the full-count evaluation of θneon at each swept snapshot's best (w, cfg), and of θr with its own
    published sampler settings, on seeds apart from the sweep's (so the chosen point is not scored on the noise
    it was chosen with)."""
    num_images: int = 50_000
    per_class: int | None = None
    seed_offset: int | None = None       # first seed; None: just past the sweep's seeds
    allow_overlap: bool = False          # accept final seeds that overlap the sweep's
    batch: int = 64
    classes: list[int] | None = None     # [first, end): the final labels from these classes only (as synthetic's),
                                         # e.g. prompts held out from the sweep's
    sampler: dict[str, Any] = dataclasses.field(default_factory=dict)   # θneon's (the sweep's cfg replaces its own)
    base_sampler: dict[str, Any] | None = None   # θr's own published settings; None: `sampler` as written
    evaluate_base: bool = True
    # the final evaluation of θr and θneon repeated on this many disjoint seed ranges of num_images (per_class)
    # each, one after another from seed_offset: per range, mean ± std, and the paired θneon − θr per range
    repeats: int = 1


@dataclasses.dataclass
class FDDinoV2Config:
    """FD_DINOv2 beside the main detector's FID, from the same images (EDM2's detector, neon/metrics/dinov2.py)."""
    weights: str                            # dinov2_vitl14_pretrain.pth (download_models.sh --only dinov2-vitl14)
    ref_stats: str | None = None            # DINOv2 statistics of the reference set (`neon stats --detector dinov2`);
                                            # None only in smoke runs, where S's statistics stand in


@dataclasses.dataclass
class MetricsConfig:
    detector: str = "inception-v3-compat"   # or 'nvidia' (NVIDIA's inception-2015-12-05 TorchScript, EDM rows)
    weights: str | None = None              # local detector weights; None = the detector's usual location
    inception_score: bool = True
    # Precision, recall, density, coverage with k = 5 against `real_features`, as the paper's Fig. 4
    # (SinaAlemohammad/Neon@9353b47 edm/cal_PR_single.py: prdc.compute_prdc, --nearest_k 5).
    precision_recall: bool = False
    kid: bool = False                       # KID against `real_features` (torch-fidelity's convention)
    real_features: str | None = None        # `neon stats --features` .npz of the real images, same detector
    kid_subsets: int = 100                  # toshas/torch-fidelity@5b1e99c defaults.py kid_subsets
    kid_subset_size: int = 1000             # ... kid_subset_size (the smaller set's size when it holds fewer)
    fd_dinov2: FDDinoV2Config | None = None  # also FD_DINOv2 ('fd_dinov2') of every point, from the same images
    # A CLIP folder (transformers' layout): also the CLIP score ('clip_score', prompt adherence, torchmetrics'
    # definition) of every point, each image against the text its label stands for (text-to-image models).
    clip: str | None = None
    # the generated images' covariance: 'unbiased', or 'neon_edm' (the Neon repository's EDM evaluation; results
    # made with it record 'covariance'; neon.metrics.frechet.COVARIANCES)
    covariance: str = "unbiased"


@dataclasses.dataclass
class ContinuedFinetuneConfig:
    """The "just train more" control: θr fine-tuned with the finetune section's recipe and compute."""
    real_data: str | None = None         # real images (.npz or folder) to fine-tune on; None: S, continuing θs's
                                         # own training for as many images again (twice the images in all)


@dataclasses.dataclass
class GuideBaselineConfig:
    """θs as a sampling-time guide (SIMS / autoguidance): ω swept as w is, with the sweep's search and grid."""
    omega: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0])   # guide scales ω


@dataclasses.dataclass
class BaselinesConfig:
    """What Neon's gain is compared with, in the same run, on the same seeds (all off by default)."""
    guidance_retune: bool = False        # θr (w = 0) over the sweep's guidance grid: guided families only
    continued_finetune: ContinuedFinetuneConfig | None = None
    self_guidance: GuideBaselineConfig | None = None    # θr guided by the best snapshot's θs
    neon_guidance: GuideBaselineConfig | None = None    # θneon guided by θs: do merge and guidance add up?

    def enabled(self) -> list[str]:
        """The names of the baselines turned on, in the order the run computes them."""
        return [n for n in BASELINES if getattr(self, n) not in (None, False)]


BASELINES = ("guidance_retune", "continued_finetune", "self_guidance", "neon_guidance")


def sweep_is_guided(s: SweepConfig) -> bool:
    """True when the sweep walks a guidance scale (its own cfg list, or one of its settings')."""
    return s.cfg is not None or any(g.cfg is not None for g in s.per_setting)


def check_baselines(cfg: RunConfig) -> None:
    b = cfg.baselines
    if b.guidance_retune and not sweep_is_guided(cfg.sweep):
        raise ConfigError("baselines.guidance_retune: the sweep has no guidance grid (sweep.cfg) to re-tune θr on")
    for name in ("self_guidance", "neon_guidance"):
        if getattr(b, name) is not None and not getattr(b, name).omega:
            raise ConfigError(f"baselines.{name}.omega: at least one guide scale is needed")
    real = b.continued_finetune.real_data if b.continued_finetune else None
    if real is not None and not os.path.exists(real):
        raise ConfigError(f"baselines.continued_finetune.real_data: {real} not found")


METHOD_KIND = "neon"   # a config's `kind` when it names none: the paper's method, run by neon/run.py


@dataclasses.dataclass
class RunConfig:
    family: str
    kind: str = METHOD_KIND                 # which runner reads the file; an experiment registers its own kind
    base: str | None = None                 # θr checkpoint; None only with --smoke (the family's tiny network)
    load_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    ref_stats: str | None = None             # reference statistics .npz (mu, sigma)
    description: str = ""
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    final: FinalConfig = dataclasses.field(default_factory=FinalConfig)
    baselines: BaselinesConfig = dataclasses.field(default_factory=BaselinesConfig)
    smoke: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(value: Any, tp: Any, where: str) -> Any:
    """Validate `value` against annotation `tp` (coercing int -> float and numeric strings -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {shown(value)}")
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {shown(value)}")
        return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        _, vt = typing.get_args(tp)
        return {k: _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # PyYAML reads '1e-5' (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {shown(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shown(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build_config(cls, data: Any, where: str):
    """The dataclass `cls` from the mapping `data`, every field checked (`where` names it in errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where + '.' if where else ''}{key}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], hints[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing")
    return cls(**kwargs)


def deep_update(base: dict, overrides: dict) -> dict:
    """Recursively merge `overrides` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _semantic_checks(cfg: RunConfig, smoke: bool = False) -> None:
    if cfg.kind != METHOD_KIND:
        raise ConfigError(f"kind: {cfg.kind!r} is not a run of the method ({METHOD_KIND!r}); `neon run` hands such "
                          "a file to the runner registered for its kind")
    if cfg.synthetic.labels not in ("per_class", "random", "none"):
        raise ConfigError(f"synthetic.labels: expected 'per_class', 'random' or 'none', got {cfg.synthetic.labels!r}")
    if cfg.synthetic.num_images is None and cfg.synthetic.per_class is None:
        raise ConfigError("synthetic.num_images: set num_images or per_class")
    for section in ("synthetic", "finetune", "sweep", "final"):
        if getattr(cfg, section).batch <= 0:
            raise ConfigError(f"{section}.batch: must be positive")
    for section in ("synthetic", "sweep", "final"):
        check_classes(getattr(cfg, section).classes, f"{section}.classes")
    if cfg.finetune.lr <= 0:
        raise ConfigError(f"finetune.lr: must be positive, got {cfg.finetune.lr}")
    if cfg.finetune.ema is not None and set(cfg.finetune.ema) - {"beta", "halflife_images"}:
        raise ConfigError(f"finetune.ema: expected 'beta' or 'halflife_images', got {sorted(cfg.finetune.ema)}")
    if not cfg.sweep.w:
        raise ConfigError("sweep.w: at least one merge weight is needed")
    if cfg.metrics.detector not in ("inception-v3-compat", "nvidia", "dinov2"):
        raise ConfigError(f"metrics.detector: {cfg.metrics.detector!r} is not inception-v3-compat, nvidia or dinov2")
    _metrics_checks(cfg.metrics, smoke)
    check_objective(cfg)
    if cfg.final.repeats < 1:
        raise ConfigError(f"final.repeats: must be at least 1, got {cfg.final.repeats}")
    if cfg.final.repeats > MAX_REPEATS:
        raise ConfigError(f"final.repeats: at most {MAX_REPEATS} (each is a full final evaluation), got "
                          f"{cfg.final.repeats}")
    check_snapshot_choice(cfg)
    check_seed_overlap(cfg)
    check_baselines(cfg)


def _metrics_checks(m: MetricsConfig, smoke: bool) -> None:
    if m.kid_subsets < 1:
        raise ConfigError(f"metrics.kid_subsets: must be at least 1, got {m.kid_subsets}")
    if m.kid_subset_size < 2:
        raise ConfigError(f"metrics.kid_subset_size: must be at least 2, got {m.kid_subset_size}")
    from neon.metrics.frechet import COVARIANCES
    if m.covariance not in COVARIANCES:
        raise ConfigError(f"metrics.covariance: {m.covariance!r} is not one of {', '.join(COVARIANCES)}")
    # A smoke run lets features of S stand in (FIDMetric.from_config), as its statistics stand in for ref_stats.
    if (m.precision_recall or m.kid) and m.real_features is None and not smoke:
        asked = " and ".join(n for n, on in (("precision_recall", m.precision_recall), ("kid", m.kid)) if on)
        raise ConfigError(f"metrics.real_features: {asked} need the real images' features "
                          "(`neon stats --images REAL --out real.npz --features`)")
    if m.fd_dinov2 is not None:
        if m.detector == "dinov2":
            raise ConfigError("metrics.fd_dinov2: the detector is dinov2 already ('fid' is FD_DINOv2); "
                              "use one or the other")
        if m.fd_dinov2.ref_stats is None and not smoke:
            raise ConfigError("metrics.fd_dinov2.ref_stats: needs the reference set's DINOv2 statistics "
                              "(`neon stats --detector dinov2 --detector-weights W --images REAL --out ref.npz`)")


def check_objective(cfg: RunConfig) -> None:
    """`sweep.objective` is a metric the metrics section computes."""
    objective, m = cfg.sweep.objective, cfg.metrics
    needs = {"kid": ("metrics.kid: true", m.kid), "fd_dinov2": ("metrics.fd_dinov2", m.fd_dinov2 is not None)}
    if objective in needs and not needs[objective][1]:
        hint = " (with metrics.detector: dinov2, 'fid' is FD_DINOv2)" if m.detector == "dinov2" else ""
        raise ConfigError(f"sweep.objective: {objective!r} is not computed by the metrics section: it needs "
                          f"{needs[objective][0]}{hint}")
    if cfg.sweep.clip_drop is not None and m.clip is None:
        raise ConfigError("sweep.clip_drop: the CLIP score is not computed: it needs metrics.clip (a CLIP folder)")


# ---------------------------------------------------------------------------------------------------------
# Which snapshots the sweep reads: the names self-training writes, known from the finetune section alone.

SNAPSHOT_NAME = re.compile(r"snapshot-(\d{10})(\.\w+)?")


def snapshot_images(ft: FinetuneConfig) -> list[int]:
    """Images seen at each snapshot self-training writes: after the step that crosses each multiple of
    snapshot_every_images, or at the ticks `snapshot_ticks` names, and after the last step
    (neon.selftrain.finetune). [] for sizes it refuses."""
    if ft.batch <= 0 or ft.total_images <= 0 or min(ft.snapshot_every_images or 1, ft.tick_images or 1,
                                                    ft.snapshot_ticks or 1) <= 0:
        return []
    last = math.ceil(ft.total_images / ft.batch) * ft.batch
    if ft.snapshot_ticks:
        tick = math.ceil(ft.tick_images / ft.batch) * ft.batch   # every tick is this many images: whole steps
        return sorted({k * tick for k in range(1, last // tick + 1) if (k - 1) % ft.snapshot_ticks == 0} | {last})
    every = ft.snapshot_every_images
    crossings = {math.ceil(k * every / ft.batch) * ft.batch for k in range(1, last // every + 1)} if every else set()
    return sorted(crossings | {last})


def _images_list(images: list[int]) -> str:
    shown = [str(n) for n in images[:3]] + (["…", str(images[-1])] if len(images) > 4 else
                                            [str(n) for n in images[3:]])
    return ", ".join(shown)


def snapshot_suffix(cfg: RunConfig) -> str | None:
    """The extension of the snapshot files (that of θr's file, '.pth' for the tiny network); None where the
    base's name does not tell (a pipeline folder's snapshots are folders, with none)."""
    if not cfg.base:
        return ".pth"
    return os.path.splitext(cfg.base)[1] or None


def check_snapshot_choice(cfg: RunConfig) -> None:
    """`sweep.snapshot` names snapshots the finetune section writes: 'last', 'all', or names / image counts."""
    choice, written = cfg.sweep.snapshot, snapshot_images(cfg.finetune)
    if choice in ("last", "all") or not written:
        return
    items = [choice] if isinstance(choice, str) else choice
    if not items:
        raise ConfigError("sweep.snapshot: an empty list (use 'last', 'all', or snapshot names or image counts)")
    for i, item in enumerate(items):
        where = "sweep.snapshot" + ("" if isinstance(choice, str) else f"[{i}]")
        if isinstance(item, str):
            match = SNAPSHOT_NAME.fullmatch(item)
            if not match:
                raise ConfigError(f"{where}: {item!r} is not 'last', 'all' or a snapshot name (snapshot-<10-digit "
                                  "images>[.ext])")
            suffix = snapshot_suffix(cfg)
            if match.group(2) and suffix is not None and match.group(2) != suffix:
                raise ConfigError(f"{where}: {item!r}: this run's snapshots are {suffix} files "
                                  f"(snapshot-{int(match.group(1)):010d}{suffix})")
            item = int(match.group(1))
        if item not in written:
            raise ConfigError(f"{where}: no snapshot at {item} images (self-training writes them at "
                              f"{_images_list(written)} images)")


# ---------------------------------------------------------------------------------------------------------
# Seeds: the final evaluation draws its images from seeds the sweep did not choose its point with.

def seed_range(num_images: int | None, per_class: int | None, seed_offset: int,
               num_classes: int | None = None) -> tuple[int, int] | None:
    """(first, last) seed of a sampling section, laid out as neon.sampling.plan_seeds does: per_class·C seeds
    with per_class (C unknown before the model loads: the section's num_images, which states that total), else
    num_images. None when the count is not known yet."""
    count = num_images if per_class is None else per_class * num_classes if num_classes else num_images
    return None if not count else (seed_offset, seed_offset + count - 1)


def class_count(section, num_classes: int | None) -> int | None:
    """The classes a section's labels come from: its `classes` span, else the model's (None before it loads)."""
    return section.classes[1] - section.classes[0] if section.classes else num_classes


def final_seed_offset(cfg: RunConfig, num_classes: int | None = None) -> int | None:
    """final.seed_offset, or where it is None the seed just past the sweep's last one."""
    if cfg.final.seed_offset is not None:
        return cfg.final.seed_offset
    sweep = seed_range(cfg.sweep.num_images, cfg.sweep.per_class, cfg.sweep.seed_offset,
                       class_count(cfg.sweep, num_classes))
    return None if sweep is None else sweep[1] + 1


def final_seed_ranges(cfg: RunConfig, offset: int | None,
                      num_classes: int | None = None) -> list[tuple[int, int]] | None:
    """(first, last) seed of each of the final evaluation's `final.repeats` ranges, one after another from
    `offset`; None when the count is not known yet."""
    f = cfg.final
    first = None if offset is None else seed_range(f.num_images, f.per_class, offset, class_count(f, num_classes))
    if first is None:
        return None
    count = first[1] - first[0] + 1
    return [(first[0] + k * count, first[1] + k * count) for k in range(f.repeats)]


def check_classes(classes, where: str, num_classes: int | None = None) -> None:
    """A section's `classes`: [first, end) with 0 <= first < end (<= the model's classes, once it is loaded)."""
    if classes is None:
        return
    if not (isinstance(classes, list) and len(classes) == 2 and all(type(c) is int for c in classes)
            and 0 <= classes[0] < classes[1]):
        raise ConfigError(f"{where}: expected [first, end) with 0 <= first < end, got {shown(classes)}")
    if num_classes is not None and classes[1] > num_classes:
        raise ConfigError(f"{where}: {classes} reaches past the model's {num_classes} classes (prompts)")


def check_seed_overlap(cfg: RunConfig, num_classes: int | None = None) -> None:
    """Refuse final seeds, in any of the `final.repeats` ranges, that overlap the sweep's (unless
    final.allow_overlap). `num_classes`: the model's, once loaded (per-class sections count per_class·C seeds)."""
    s, f = cfg.sweep, cfg.final
    sweep = seed_range(s.num_images, s.per_class, s.seed_offset, class_count(s, num_classes))
    ranges = final_seed_ranges(cfg, final_seed_offset(cfg, num_classes), num_classes)
    if f.allow_overlap or sweep is None or ranges is None:
        return
    for k, final in enumerate(ranges):
        if not (final[1] < sweep[0] or sweep[1] < final[0]):
            which = f"final seeds {final[0]}–{final[1]}" + (f" (repeat {k + 1} of {f.repeats})" if f.repeats > 1
                                                            else "")
            raise ConfigError(f"final.seed_offset: {which} overlap the sweep's {sweep[0]}–{sweep[1]} "
                              "(set final.allow_overlap: true to allow)")


def check_args(declared: typing.Sequence[Arg], given: dict, where: str) -> None:
    """Refuse a keyword that is not declared, or a value of the wrong type, in one line naming it and the known
    names (`synthetic.sampler.num_stepz: unknown argument (known: num_steps, sigma_min, ...)`)."""
    known = {a.name: a for a in declared}
    for key, value in given.items():
        path = f"{where} {key}" if where.startswith("-") else f"{where}.{key}"
        if key not in known:
            raise ConfigError(f"{path}: unknown argument (known: {', '.join(known) or 'none'})")
        if isinstance(value, float) and math.isinf(value) and _accepts_float(known[key].type):
            continue   # an unbounded setting, e.g. EDM's S_max = inf (the official default)
        _check(value, known[key].type, path)


def _accepts_float(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


def check_family_args(cfg: RunConfig, family: Family, smoke: bool = False) -> None:
    """Every sampler, loss and load argument of `cfg` is one that `family` declares, with a value of its type."""
    load_args = family.LOAD_ARGS + (family.TINY_ARGS if smoke and not cfg.base else ())
    check_args(load_args, cfg.load_args, "load_args")
    for section in ("synthetic", "sweep", "final"):
        check_args(family.SAMPLER_ARGS, getattr(cfg, section).sampler, f"{section}.sampler")
    if cfg.final.base_sampler is not None:
        check_args(family.SAMPLER_ARGS, cfg.final.base_sampler, "final.base_sampler")
    sampler = {a.name: a for a in family.SAMPLER_ARGS}
    for key, values in cfg.sweep.grid.items():
        for i, value in enumerate(values):
            check_args(family.SAMPLER_ARGS, {key: value}, f"sweep.grid[{i}]")
    for i, grid in enumerate(cfg.sweep.per_setting):
        check_args(family.SAMPLER_ARGS, grid.setting, f"sweep.per_setting[{i}].setting")
    guided = sweep_is_guided(cfg.sweep)
    if guided and cfg.sweep.cfg_key not in sampler:
        raise ConfigError(f"sweep.cfg_key: {cfg.sweep.cfg_key!r} is not a sampler argument of {family.name} "
                          f"(known: {', '.join(sampler) or 'none'})")
    check_args(family.LOSS_ARGS, cfg.finetune.loss_args, "finetune.loss_args")
    for name in ("self_guidance", "neon_guidance"):
        if getattr(cfg.baselines, name) is not None and "guide_scale" not in sampler:
            raise ConfigError(f"baselines.{name}: the {family.name} sampler takes no guide network (guide_scale)")


def parse_config(data: dict, smoke: bool = False, where: str = "", family_args: bool = False) -> RunConfig:
    """The run config in `data`; with `family_args`, its sampler, loss and load arguments are also checked
    against what its family declares."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping at the top level")
    if smoke:
        data = apply_smoke(data)
    cfg = build_config(RunConfig, data, "")
    _semantic_checks(cfg, smoke)
    if family_args:
        check_family_args(cfg, get_family(cfg.family), smoke)
    return cfg


MAX_REPEATS = 1000            # final seed ranges a run may ask for (each one is a full final evaluation)
MAX_CONFIG_VALUES = 100_000   # values a config may hold once YAML aliases are expanded (a real one: a few hundred)


def _expanded_size(data: Any, sizes: dict) -> int:
    """How many values `data` holds with every alias expanded, counted once per shared node (memo `sizes`), so
    a "billion laughs" file is measured without being expanded."""
    if id(data) in sizes:
        return sizes[id(data)]
    items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else ()
    sizes[id(data)] = 1 + sum(_expanded_size(v, sizes) for v in items)
    return sizes[id(data)]


def load_yaml(path: str, parse, **kwargs):
    """parse(data, **kwargs) of the YAML file `path`; every problem is a one-line ConfigError naming the file."""
    try:
        with paths.open_input(path, "config file") as f:
            data = yaml.safe_load(f)
        size = _expanded_size(data, {})
    except NeonError as e:   # not found, or not a regular file
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if size > MAX_CONFIG_VALUES:
        raise ConfigError(f"{path}: holds {size:.3g} values once its YAML aliases are expanded (at most "
                          f"{MAX_CONFIG_VALUES} are read)")
    try:
        return parse(data, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_smoke(data: dict) -> dict:
    """The config with its `smoke:` overrides merged in (and the section itself removed)."""
    return deep_update({k: v for k, v in data.items() if k != "smoke"}, data.get("smoke") or {})


def config_kind(path: str) -> str:
    """The `kind` a config file declares (which runner reads it), `METHOD_KIND` where it declares none."""
    def kind(data):
        value = data.get("kind", METHOD_KIND) if isinstance(data, dict) else METHOD_KIND
        if not isinstance(value, str):
            raise ConfigError(f"kind: expected a string, got {shown(value)}")
        return value
    return load_yaml(path, kind)


def load_config(path: str, smoke: bool = False) -> RunConfig:
    """The run config in the YAML file `path`, every field checked, and every family argument too."""
    return load_yaml(path, parse_config, smoke=smoke, family_args=True)
