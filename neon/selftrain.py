"""Stage 2 — self-training: briefly fine-tune θr on its own synthetic set S to get θs.

Data-parallel over torchrun ranks (gradients averaged after each backward pass), AdamW/Adam with the family's
official settings, a linear lr ramp, optional EMA started from θr, gradient clipping, and snapshots in the
family's official container. Everything a step does depends only on (seed, step, rank): the example order is a
fixed stream of seeded permutations and the loss's random draws are reseeded every step, so a job killed at any
point and rerun continues from its last saved state to bit-identical weights.

Gradients are averaged by hand instead of wrapping the network in DistributedDataParallel: each family's loss
calls its own network (several passes, no-grad target passes, helper methods), which DDP's wrapper would hide
or forbid; one all-reduce per step over flattened buckets is the same arithmetic.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from neon import dist, fastpaths, lora_train, paths
from neon.checkpoint import atomic_open, atomic_save
from neon.config import FinetuneConfig, build_config, check_args, snapshot_images
from neon.errors import NeonError, shown
from neon.family import Bundle, Family, TrainDefaults
from neon.fastpaths import copy_module
from neon.images import NpzImages, open_images
from neon.sampling import allows_null_class, check_label_range

STATE_FILE = "train_state.pt"
CACHE_FILE = "examples"   # the folder of encoded examples (neon run, neon finetune)
LOG_FILE = "log.jsonl"    # one JSON line per logging step: step, images, loss, ...


# ---------------------------------------------------------------------------------------------------------
# Examples: the synthetic images encoded once (VAE latents, VQ tokens, ...) and cached.

def _source_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_images(path: str) -> tuple[int, callable, np.ndarray | None]:
    """(count, read(i, j) -> uint8 NHWC, labels) for an .npz or an image folder."""
    images = open_images(path)
    return len(images), images.read, images.labels


# Dtypes a cache may hold, by name (the index names them; nothing else is turned into a dtype).
_CACHE_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
# A cached key's fingerprint: SHA-256 of its layout and of its file, the whole file up to FINGERPRINT_BYTES, else
# that many bytes in evenly spaced blocks (so checking a cache of hundreds of GB costs little next to training on
# it). It ties the layout the index gives to the bytes encoded with it.
FINGERPRINT_BYTES = 64 << 20
_BLOCK = 1 << 20
_MAX_INDEX_BYTES = 1 << 20   # an index lists a few keys


@torch.no_grad()
def _encode_range(family: Family, bundle: Bundle, read, labels, i: int, j: int,
                  float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    lab = None if labels is None else torch.as_tensor(labels[i:j])
    out = family.encode(bundle, torch.from_numpy(np.ascontiguousarray(read(i, j))), lab)
    return {k: (v.detach().cpu().to(float_dtype) if v.is_floating_point() else v.detach().cpu())
            for k, v in sorted(out.items())}


def encode_examples(family: Family, bundle: Bundle, data: str, cache: str | None = None, batch: int = 64,
                    cache_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Every image of `data` through the family's `encode`, each rank a share of the batches.

    With `cache` (a folder), the examples are written straight into one file per key there, each rank its own
    rows, and returned as copy-on-write memory maps of those files: no rank ever holds the whole set, which at
    the paper's sizes does not fit in memory (VAR caches 750k images at 288x288: about 190 GB). A later call
    with the same data file reads the cache, once it has checked the cache is what was written for this set
    (`_cache_problem`). Without `cache` they are gathered in memory, in order."""
    if cache_dtype not in _CACHE_DTYPES or not _CACHE_DTYPES[cache_dtype].is_floating_point:
        raise NeonError(f"finetune.cache_dtype: expected a float dtype (float32, bfloat16, ...), got {cache_dtype!r}")
    float_dtype = _CACHE_DTYPES[cache_dtype]
    n, read, labels = _read_images(data)
    if cache and (cached := _open_cache(cache, data, n, float_dtype)) is not None:
        return cached
    if n == 0:
        raise NeonError(f"{data}: no images to train on")
    if bundle.conditional and labels is None:
        raise NeonError(f"{data}: the model is class-conditional but the images have no labels")
    ranges = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    mine = dist.shard(ranges)
    progress = lambda items: tqdm(items, desc="encoding S", disable=not dist.is_main(), dynamic_ncols=True)
    if not cache:
        parts = [_encode_range(family, bundle, read, labels, i, j, float_dtype) for i, j in progress(mine)]
        index = torch.cat([torch.arange(i, j) for i, j in mine])
        order = dist.all_gather_cat(index).argsort()
        return {k: dist.all_gather_cat(torch.cat([p[k] for p in parts]))[order] for k in parts[0]}
    # The first batch fixes each key's row shape and dtype; rank 0 (whose share starts with it) lays out the files.
    first = _encode_range(family, bundle, read, labels, *ranges[0], float_dtype) if dist.is_main() else None
    if dist.is_main():
        _start_cache(cache, {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": [n, *v.shape[1:]]}
                             for k, v in first.items()})
    dist.barrier()
    layout = _read_index(cache)["keys"]
    files = {k: _cache_tensor(cache, k, spec, shared=True) for k, spec in layout.items()}
    for i, j in progress(mine):
        out = first if (i, j) == ranges[0] and first is not None else \
            _encode_range(family, bundle, read, labels, i, j, float_dtype)
        for k, v in out.items():
            if k not in files or tuple(v.shape[1:]) != tuple(files[k].shape[1:]) or v.dtype != files[k].dtype:
                raise NeonError(f"{family.name}: encode gave {k} {v.dtype} {tuple(v.shape)} for images {i}-{j - 1}, "
                                f"but {tuple(files[k].shape[1:])} {files[k].dtype} rows for the first batch")
            files[k][i:j] = v
    del files   # unmap: the rows are in the files
    dist.barrier()
    if dist.is_main():
        layout = {k: {**spec, "sha256": _fingerprint(_key_file(cache, k), spec)} for k, spec in layout.items()}
        _write_index(cache, {"source": _source_id(data), "keys": layout, "complete": True})
    dist.barrier()
    return _open_cache(cache, data, n, float_dtype)


def _index_path(cache: str) -> str:
    return os.path.join(cache, "index.json")


def _read_index(cache: str) -> dict | None:
    """The cache's index, None where there is none or it is no JSON object (a cache to encode again)."""
    if not os.path.lexists(_index_path(cache)):
        return None
    try:
        index = json.loads(paths.read_input(_index_path(cache), "cache index", _MAX_INDEX_BYTES))
    except (ValueError, RecursionError):
        return None
    return index if isinstance(index, dict) else None


def _write_index(cache: str, doc: dict) -> None:
    with atomic_open(_index_path(cache), "w") as f:
        json.dump(doc, f, indent=1)


def _key_file(cache: str, key: str) -> str:
    if not key.isidentifier():   # keys name files in the cache folder: no separators, no '..'
        raise NeonError(f"{_index_path(cache)}: example key {key!r} is not a plain name")
    return os.path.join(cache, f"{key}.bin")


def _cache_tensor(cache: str, key: str, spec: dict, shared: bool) -> torch.Tensor:
    """The (N, ...) tensor of one key mapped from its file: shared=True writes through to the file, False is a
    private copy-on-write view (the training loop only reads)."""
    dtype, shape = _CACHE_DTYPES.get(spec.get("dtype")), spec.get("shape")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise NeonError(f"{_index_path(cache)}: bad layout for {key!r}: {spec}")
    path, numel = _key_file(cache, key), math.prod(shape)
    if os.path.getsize(path) != numel * dtype.itemsize:
        raise NeonError(f"{path}: {os.path.getsize(path)} bytes, the index says {shape} {spec['dtype']}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(path, shared=shared, size=numel, dtype=dtype).view(shape)


def _start_cache(cache: str, layout: dict) -> None:
    """A fresh cache folder: files of the right size for every key, and an index that is not yet complete."""
    os.makedirs(paths.no_symlink(cache), exist_ok=True)
    for key in layout:   # a name planted as a link would have its target truncated and then written through
        paths.no_symlink(_key_file(cache, key))
    old = (_read_index(cache) or {}).get("keys")   # an older cache (another data file, killed while encoding, ...)
    for key in old if isinstance(old, dict) else ():
        if isinstance(key, str) and key.isidentifier() and os.path.isfile(_key_file(cache, key)):
            os.remove(_key_file(cache, key))
    for key, spec in layout.items():
        with os.fdopen(paths.open_nofollow(_key_file(cache, key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
            f.truncate(math.prod(spec["shape"]) * _CACHE_DTYPES[spec["dtype"]].itemsize)
    _write_index(cache, {"source": None, "keys": layout, "complete": False})


def _open_cache(cache: str, data: str, n: int, float_dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The cached examples of `data` (n images, floats cached as `float_dtype`), or None when the folder holds no
    complete cache of that very file, or one that is not as it was written (said, and then encoded again)."""
    index = _read_index(cache)
    if index is None or not index.get("complete") or index.get("source") != _source_id(data):
        return None
    problem = _cache_problem(cache, index.get("keys"), n, float_dtype)
    if problem:
        if dist.is_main():
            print(f"{cache}: {problem}; encoding the examples again", flush=True)
        return None
    return {k: _cache_tensor(cache, k, spec, shared=False) for k, spec in index["keys"].items()}


def _cache_problem(cache: str, keys, n: int, float_dtype: torch.dtype) -> str | None:
    """Why a complete cache of the right data file cannot be trained on, or None. Each key must hold one row per
    image, floats in the dtype asked for, and the fingerprint written with it: the layout the index gives and the
    bytes of the file are then those that were encoded (a shape or dtype edited in the index, a file replaced,
    would otherwise be trained on as it reads)."""
    if not isinstance(keys, dict) or not keys:
        return "its index lists no examples"
    for key, spec in keys.items():
        dtype = _CACHE_DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(key, str) and key.isidentifier()) or dtype is None or not isinstance(shape, list) \
                or not shape or not all(type(d) is int and d >= 0 for d in shape):
            return f"bad layout for {key!r} in its index"
        if shape[0] != n:
            return f"{key} holds {shape[0]} rows for {n} images"
        if dtype.is_floating_point and dtype != float_dtype:
            return f"{key} is {spec['dtype']}, the cache dtype asked for is {str(float_dtype).removeprefix('torch.')}"
        file = _key_file(cache, key)
        if not os.path.isfile(file) or os.path.getsize(file) != math.prod(shape) * dtype.itemsize:
            return f"{file} does not hold {shape} {spec['dtype']}"
        if spec.get("sha256") != _fingerprint(file, spec):
            return f"{key} is not as it was written (its layout or its bytes changed)"
    return None


def _fingerprint(path: str, spec: dict) -> str:
    """SHA-256 of a cached key's layout and of its file (see FINGERPRINT_BYTES)."""
    h = hashlib.sha256(json.dumps([spec["dtype"], spec["shape"]]).encode())
    with paths.open_input(path, "cache file") as f:
        size = os.fstat(f.fileno()).st_size
        blocks = FINGERPRINT_BYTES // _BLOCK
        starts = range(0, size, _BLOCK) if size <= FINGERPRINT_BYTES else \
            [i * (size - _BLOCK) // (blocks - 1) for i in range(blocks)]
        for start in starts:
            f.seek(start)
            h.update(f.read(_BLOCK))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The training loop.

def example_indices(step: int, global_batch: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at `step`: positions [step·B, (step+1)·B) of an endless stream made of
    seeded permutations of 0..n-1 (one per epoch)."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset:offset + global_batch - len(out)].tolist())
    return torch.tensor(out)


def make_optimizer(named_params, lr: float, d: TrainDefaults) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(d.optimizer)
    if kind is None:
        raise NeonError(f"unknown optimizer {d.optimizer!r} (adam or adamw)")
    named_params = list(named_params)
    no_decay = [] if d.decay_1d else [p for n, p in named_params if p.ndim == 1 or n.endswith(".bias")]
    decay = [p for _, p in named_params if not any(p is q for q in no_decay)]
    groups = [{"params": decay, "weight_decay": d.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return kind(groups, lr=lr, betas=tuple(d.betas), eps=d.eps)


def ema_beta(ema: dict | None, global_batch: int) -> float | None:
    """Per-step EMA decay: given directly, or from a half-life in images (EDM: 0.5^(B / half-life))."""
    if not ema:
        return None
    if "beta" in ema:
        return float(ema["beta"])
    return 0.5 ** (global_batch / float(ema["halflife_images"]))


@torch.no_grad()
def update_ema(ema_net: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    for e, p in zip(ema_net.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1 - beta)
    for e, b in zip(ema_net.buffers(), net.buffers()):
        e.copy_(b)


def average_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Mean of every gradient over ranks, all-reduced in flat buckets."""
    if dist.world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.flatten() for b in bucket])
            torch.distributed.all_reduce(flat)
            flat /= dist.world_size()
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def update_scale(scaler: torch.amp.GradScaler, max_scale: float | None) -> None:
    """GradScaler.update(), except that a scale above max_scale when the step was taken is set to max_scale
    (the rule of VAR's AmpOptimizer: fp16 overflows near 65536, so the scale is kept at 32768 or below)."""
    if max_scale is not None and scaler.is_enabled() and scaler.get_scale() > max_scale:
        scaler.update(new_scale=float(max_scale))
    else:
        scaler.update()


def train_defaults(family: Family, overrides: dict) -> TrainDefaults:
    fields = {f.name for f in dataclasses.fields(TrainDefaults)}
    bad = set(overrides) - fields
    if bad:
        raise NeonError(f"finetune.optimizer: unknown setting {sorted(bad)[0]!r} (known: {', '.join(sorted(fields))})")
    d = dataclasses.replace(family.train_defaults, **overrides)
    # ranges a typo or a sign slip would leave silently wrong: a negative clip norm clips nothing
    if d.grad_clip is not None and not (isinstance(d.grad_clip, (int, float)) and d.grad_clip > 0):
        raise NeonError(f"finetune.optimizer.grad_clip: a positive norm or null, got {shown(d.grad_clip)}")
    if not (isinstance(d.eps, (int, float)) and d.eps > 0):
        raise NeonError(f"finetune.optimizer.eps: must be positive, got {shown(d.eps)}")
    if not (isinstance(d.weight_decay, (int, float)) and d.weight_decay >= 0):
        raise NeonError(f"finetune.optimizer.weight_decay: must be 0 or more, got {shown(d.weight_decay)}")
    if not (isinstance(d.betas, (list, tuple)) and len(d.betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in d.betas)):
        raise NeonError(f"finetune.optimizer.betas: two numbers in [0, 1), got {shown(d.betas)}")
    return d


def snapshot_path(out_dir: str, images: int, bundle: Bundle, folder: bool = False) -> str:
    """Where the snapshot after `images` goes: a folder (`folder`: the family saves folders, or θr is one) or a
    file with θr's extension."""
    if folder or (bundle.source and os.path.isdir(bundle.source)):  # a pipeline folder: its snapshots are folders
        return os.path.join(out_dir, f"snapshot-{images:010d}")
    suffix = os.path.splitext(bundle.source)[1] if bundle.source else ".pth"
    return os.path.join(out_dir, f"snapshot-{images:010d}{suffix or '.pth'}")


def lora_path(snapshot: str) -> str:
    """Where a LoRA snapshot's factors go: finetune/lora/<snapshot name>.safetensors."""
    name = os.path.splitext(os.path.basename(snapshot))[0]   # snapshot-<images>, a folder or a file
    return os.path.join(os.path.dirname(snapshot), "lora", name + ".safetensors")


def _autocast(device: torch.device, mode: str | None):
    if device.type != "cuda" or not mode:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[mode])


def copy_net(bundle: Bundle) -> torch.nn.Module:
    """A deep copy of `bundle.net` that shares the frozen helpers (a network may keep a reference to its VAE,
    as VAR does; copying that too would cost memory and train nothing)."""
    return copy_module(bundle.net, shared=list(bundle.helpers.values()))


@dataclasses.dataclass
class Trainer:
    """One self-training run: `bundle.net` is the copy being trained (the caller's θr is left alone)."""
    family: Family
    bundle: Bundle
    cfg: FinetuneConfig
    defaults: TrainDefaults
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema_net: torch.nn.Module | None
    beta: float | None
    plain: torch.nn.Module | None = None   # LoRA: θr's architecture, to hold θs's fused weights when saved

    @classmethod
    def start(cls, family: Family, theta_r: Bundle, cfg: FinetuneConfig) -> Trainer:
        defaults = train_defaults(family, cfg.optimizer)
        bundle = dataclasses.replace(theta_r, net=copy_net(theta_r))
        device = next(bundle.net.parameters()).device
        bundle.net.train().requires_grad_(False)
        lora = lora_train.check_lora(cfg.lora)
        if theta_r.lora:       # θr = base + a user's LoRA: self-training continues that LoRA
            lora = lora or {}
            lora_train.continue_adapters(bundle.net, theta_r.lora)
            bundle.net.to(device)
        elif lora is not None:   # fresh adapters on the copy; only they train
            lora_train.add_adapters(bundle.net, lora, cfg.seed)
            bundle.net.to(device)
        named = lora_train.adapter_parameters(bundle.net) if lora is not None else \
            list(family.trainable_parameters(bundle))
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        beta = ema_beta(cfg.ema, cfg.batch)
        ema_net = copy_net(bundle).eval().requires_grad_(False) if beta is not None else None
        scaler = torch.amp.GradScaler("cuda", init_scale=defaults.scaler_init_scale,
                                      growth_interval=defaults.scaler_growth_interval,
                                      enabled=device.type == "cuda" and defaults.autocast == "fp16")
        return cls(family, bundle, cfg, defaults, params, make_optimizer(named, cfg.lr, defaults), scaler,
                   ema_net, beta, copy_net(theta_r).eval().requires_grad_(False) if lora is not None else None)

    @property
    def device(self) -> torch.device:
        return next(self.bundle.net.parameters()).device

    def resume(self, state_path: str) -> tuple[int, list[str]]:
        """(step, snapshots so far) from a saved training state, or (0, []) for a fresh start."""
        if not os.path.isfile(state_path):
            return 0, []
        # Read to the CPU: load_state_dict copies each tensor to its parameter's device, except the optimizer's
        # step counters, which Adam keeps on the CPU; on the GPU each would cost a host sync per parameter per step.
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        self.bundle.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        if self.ema_net is not None:
            self.ema_net.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        return int(state["step"]), list(state["snapshots"])

    def step(self, examples: dict[str, torch.Tensor], step: int) -> tuple[float, float]:
        """One optimizer step on the global batch `step` (this rank's share) -> (mean loss over ranks, lr)."""
        cfg, world = self.cfg, dist.world_size()
        n, local = len(next(iter(examples.values()))), cfg.batch // world
        idx = example_indices(step, cfg.batch, n, cfg.seed)[dist.rank() * local:(dist.rank() + 1) * local]
        images_seen = (step + 1) * cfg.batch
        lr = cfg.lr * min(1.0, images_seen / cfg.warmup_images) if cfg.warmup_images else cfg.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, dist.rank()]).generate_state(1)[0]))

        self.opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for part in idx.chunk(cfg.accumulate):   # micro-batches: gradients add up to the rank's whole share's
            batch = {k: v[part].to(self.device, non_blocking=True) for k, v in examples.items()}
            with _autocast(self.device, self.defaults.autocast):
                part_loss = self.family.loss(self.bundle, batch, **cfg.loss_args) * (len(part) / local)
            self.scaler.scale(part_loss).backward()
            loss += part_loss.detach().float()
        mean_loss = dist.all_reduce_sum(loss.reshape(1)) / world
        if not torch.isfinite(mean_loss).all():
            raise NeonError(f"self-training loss became {mean_loss.item()} at step {step} "
                            f"({step * cfg.batch} images): stopping (try a lower finetune.lr)")
        average_gradients(self.params)
        self.scaler.unscale_(self.opt)
        if self.defaults.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.defaults.grad_clip)
        self.scaler.step(self.opt)
        update_scale(self.scaler, self.defaults.scaler_max_scale)
        if self.ema_net is not None:
            update_ema(self.ema_net, self.bundle.net, self.beta)
        return mean_loss.item(), lr

    def snapshot(self, path: str, state_path: str, step: int, snapshots: list[str]) -> None:
        """θs so far (the EMA weights if EMA is on) in the family's container, and the state to resume from. With
        LoRA, θs is saved with its adapters fused, and their factors beside (`lora_path`)."""
        net = self.bundle.net
        theta_s = self.ema_net if self.ema_net is not None else net
        if dist.is_main():
            if self.plain is not None:
                lora_train.save_factors(lora_train.factors(theta_s), lora_path(path))
                self.plain.load_state_dict(lora_train.fused_state_dict(theta_s))
                theta_s = self.plain
            self.family.save(dataclasses.replace(self.bundle, net=theta_s), path)
            atomic_save({"step": step, "net": net.state_dict(), "opt": self.opt.state_dict(),
                         "ema": self.ema_net.state_dict() if self.ema_net is not None else {},
                         "scaler": self.scaler.state_dict(), "snapshots": snapshots}, state_path)
        dist.barrier()


def last_log_entry(out_dir: str) -> dict | None:
    """The last line of a self-training folder's log (its step, images seen, loss), None without one."""
    path = os.path.join(out_dir, LOG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _crossed(images_seen: int, batch: int, every: int | None) -> bool:
    """True when the last step crossed a multiple of `every` images."""
    return bool(every) and images_seen // every != (images_seen - batch) // every


def finetune(family: Family, bundle: Bundle, examples: dict[str, torch.Tensor], cfg: FinetuneConfig,
             out_dir: str, desc: str = "self-training") -> list[str]:
    """Self-train a copy of `bundle.net` (θr; the bundle keeps it) on `examples`; write snapshots (the EMA
    weights if EMA is on) into `out_dir`. Returns the snapshot paths, the last one being θs. Resumes from
    `out_dir/train_state.pt`."""
    check_args(family.LOSS_ARGS, cfg.loss_args, "finetune.loss_args")
    world = dist.world_size()
    if cfg.batch % world:
        raise NeonError(f"finetune.batch {cfg.batch} is not divisible by the {world} processes")
    steps = math.ceil(cfg.total_images / cfg.batch)
    trainer = Trainer.start(family, bundle, cfg)

    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, STATE_FILE)
    step, snapshots = trainer.resume(state_path)
    if step and dist.is_main():
        print(f"resuming self-training at step {step} of {steps} ({step * cfg.batch} images)")
    log_path = paths.no_symlink(os.path.join(out_dir, LOG_FILE))   # appended to below, never through a link
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not dist.is_main(),
               dynamic_ncols=True)
    losses, t0 = [], time.time()
    snapshot_at = set(snapshot_images(cfg))
    with fastpaths.backends(family.BACKENDS.get("train")):   # TF32 and cuDNN as the official loop sets them
        while step < steps:
            loss, lr = trainer.step(examples, step)
            step += 1
            images_seen = step * cfg.batch
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)   # drawn at the bar's own pace
            bar.update(1)
            if dist.is_main() and (_crossed(images_seen, cfg.batch, cfg.log_every_images) or step == steps):
                with os.fdopen(paths.open_nofollow(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
                    f.write(json.dumps({"step": step, "images": images_seen, "loss": float(np.mean(losses)),
                                        "lr": lr, "seconds": round(time.time() - t0, 3)}) + "\n")
                losses = []
            if images_seen in snapshot_at:
                snapshots.append(snapshot_path(out_dir, images_seen, bundle, family.SAVES_FOLDERS))
                trainer.snapshot(snapshots[-1], state_path, step, snapshots)
    bar.close()
    return snapshots


# ---------------------------------------------------------------------------------------------------------
# Bad input, refused before anything is written.

def check_finetune_config(cfg: FinetuneConfig) -> None:
    """Refuse sizes that cannot train: a non-positive batch, length or interval, a batch the ranks cannot split."""
    positive = {"batch": cfg.batch, "total_images": cfg.total_images, "log_every_images": cfg.log_every_images}
    for name in ("snapshot_every_images", "tick_images", "snapshot_ticks"):
        if getattr(cfg, name) is not None:
            positive[name] = getattr(cfg, name)
    if (cfg.tick_images is None) != (cfg.snapshot_ticks is None):
        raise NeonError("finetune.snapshot_ticks: give tick_images and snapshot_ticks together (EDM's ticks)")
    if cfg.snapshot_ticks is not None and cfg.snapshot_every_images is not None:
        raise NeonError("finetune.snapshot_ticks: snapshots every N images or every N ticks, not both "
                        "(set snapshot_every_images: null)")
    for name, value in positive.items():
        if value <= 0:
            raise NeonError(f"finetune.{name}: must be positive, got {value}")
    if cfg.warmup_images < 0:
        raise NeonError(f"finetune.warmup_images: must be 0 or more, got {cfg.warmup_images}")
    if not cfg.lr > 0:
        raise NeonError(f"finetune.lr: must be positive, got {cfg.lr}")
    ema = cfg.ema or {}
    if ema and not (list(ema) == ["beta"] and 0 <= ema["beta"] < 1
                    or list(ema) == ["halflife_images"] and ema["halflife_images"] >= 1):
        raise NeonError(f"finetune.ema: expected beta in [0, 1) or halflife_images of at least one image, got "
                        f"{shown(cfg.ema)}")
    if cfg.batch % dist.world_size():
        raise NeonError(f"finetune.batch {cfg.batch} is not divisible by the {dist.world_size()} processes")
    if not (isinstance(cfg.accumulate, int) and 1 <= cfg.accumulate <= cfg.batch // dist.world_size()):
        raise NeonError(f"finetune.accumulate: micro-batches per step, from 1 to the {cfg.batch // dist.world_size()} "
                        f"images each process trains on per step, got {shown(cfg.accumulate)}")
    lora_train.check_lora(cfg.lora)


def check_finetune_data(family: Family, bundle: Bundle, data: str) -> None:
    """Refuse a training set the model cannot learn from: empty, images of another size or channel count than
    the model's, missing labels, or labels outside the model's classes (as `neon sample` refuses them)."""
    images = open_images(data)
    if len(images) == 0:
        raise NeonError(f"{data}: the image set is empty")
    got = tuple(images.read(0, 1).shape[1:])
    want = (bundle.resolution, bundle.resolution, bundle.channels)
    if bundle.resolution and got != want:
        raise NeonError(f"{data}: images are {got[0]}x{got[1]} with {got[2]} channels, the model's are "
                        f"{want[0]}x{want[1]} with {want[2]}")
    if not bundle.conditional:
        return
    if images.labels is None:
        raise NeonError(f"{data}: the model is class-conditional but the images have no labels")
    if isinstance(images, NpzImages) and images.label_dtype.kind not in "iu":  # int64 would truncate 2.7 to 2
        raise NeonError(f"{data}: labels must be integers, got {images.label_dtype}")
    check_label_range(np.asarray(images.labels), bundle.num_classes, allows_null_class(family), f"{data}: ")


def check_finetune_inputs(family: Family, bundle: Bundle, cfg: FinetuneConfig, data: str, out: str,
                          encode_batch: int) -> None:
    """Everything `neon finetune` is given, checked before its output folder exists."""
    check_finetune_config(cfg)
    if encode_batch <= 0:
        raise NeonError(f"--encode-batch: must be positive, got {encode_batch}")
    paths.output_folder(out)
    for name in (LOG_FILE, CACHE_FILE):   # a link planted there is refused before any work (and where written)
        paths.no_symlink(os.path.join(out, name))
    check_finetune_data(family, bundle, data)


# ---------------------------------------------------------------------------------------------------------
# CLI: neon finetune

def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    from neon.sampling import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="synthetic set: .npz (arr_0, arr_1) or an image folder "
                                                 "(labels from its dataset.json)")
    p.add_argument("--out", required=True, help="output folder: snapshots, log.jsonl, train_state.pt")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--batch", type=int, required=True, help="global batch size")
    p.add_argument("--total-images", type=int, required=True, help="training length in images")
    p.add_argument("--warmup-images", type=int, default=0, help="linear lr ramp length")
    p.add_argument("--ema-beta", type=float, help="EMA decay per step (EMA started from θr)")
    p.add_argument("--ema-halflife-images", type=float, help="EMA half-life in images (EDM style)")
    p.add_argument("--snapshot-every-images", type=int)
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="optimizer override: optimizer=adamw, betas=[0.9,0.95], weight_decay=0.0, grad_clip=2.0")
    p.add_argument("--loss-arg", action="append", metavar="KEY=VALUE", help="family loss argument")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per step on each process (gradient accumulation: the batch in less memory)")
    p.add_argument("--encode-batch", type=int, default=64)


def finetune_main(args) -> None:
    from neon.sampling import load_model, parse_kv
    family, bundle = load_model(args)
    ema = {"beta": args.ema_beta} if args.ema_beta else \
        {"halflife_images": args.ema_halflife_images} if args.ema_halflife_images else None
    cfg = build_config(FinetuneConfig, {
        "lr": args.lr, "batch": args.batch, "total_images": args.total_images, "warmup_images": args.warmup_images,
        "ema": ema, "snapshot_every_images": args.snapshot_every_images, "optimizer": parse_kv(args.opt),
        "loss_args": parse_kv(args.loss_arg), "seed": args.seed, "accumulate": args.accumulate}, "finetune")
    check_finetune_inputs(family, bundle, cfg, args.data, args.out, args.encode_batch)
    from neon.sampling import exclusive
    with paths.made_folder(args.out), exclusive(os.path.join(args.out, "finetune.json")):   # one writer at a time
        examples = encode_examples(family, bundle, args.data, os.path.join(args.out, CACHE_FILE), args.encode_batch,
                                   cfg.cache_dtype)
        snapshots = finetune(family, bundle, examples, cfg, args.out)
    if dist.is_main():
        print(f"θs: {snapshots[-1]}")
        with atomic_open(os.path.join(args.out, "finetune.json"), "w") as f:
            json.dump({"snapshots": snapshots, "config": dataclasses.asdict(cfg)}, f, indent=1)
