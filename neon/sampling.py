"""Stage 1 — the synthetic set S: draw images from θr with its usual sampler, sharded over ranks, resumable.

Each image depends on its seed (and label) alone, so the set is the same on any number of processes. Ranks write
shards of finished images atomically into `<out>.shards/`; a rerun after a kill skips every seed already in a
shard, and rank 0 joins the shards, in the order of the requested seeds, into one ADM-style `.npz`.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import time
from typing import Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from neon import dist, paths
from neon.errors import NeonError
from neon.family import Bundle, Family, get_family
from neon.images import NpzImages, export_png, save_images_npz, write_npz

LABEL_STREAM = 0x4C41424C  # 'LABL': labels drawn "from the seed" use their own stream, apart from the sampler's


def parse_seeds(spec: str) -> list[int]:
    """'0-999,2000,3000-3009' -> [0, ..., 999, 2000, 3000, ..., 3009] (ranges inclusive, as EDM's --seeds)."""
    seeds: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                seeds.extend(range(int(a), int(b) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise NeonError(f"bad seed list {spec!r} (expected e.g. '0-999,2000')") from None
    if any(s < 0 for s in seeds):
        raise NeonError(f"seed list {spec!r}: seeds must be non-negative")
    if len(set(seeds)) != len(seeds):
        raise NeonError(f"seed list {spec!r} repeats a seed")
    if not seeds:
        raise NeonError(f"seed list {spec!r} is empty")
    return seeds


def plan_seeds(num_images: int | None = None, per_class: int | None = None, num_classes: int = 0,
               seed_offset: int = 0) -> list[int]:
    """Seeds seed_offset .. seed_offset+N-1, with N = per_class·num_classes when per_class is given."""
    if per_class is not None:
        if num_classes <= 0:
            raise NeonError("per-class sampling needs a conditional model")
        num_images = per_class * num_classes
    if not num_images or num_images <= 0:
        raise NeonError("number of images must be positive")
    return list(range(seed_offset, seed_offset + num_images))


def class_labels(seeds: Sequence[int], num_classes: int, mode: str = "random",
                 label_list: Sequence[int] | None = None, null_class: bool = False) -> np.ndarray | None:
    """Labels for `seeds`: 'per_class' (the i-th seed gets class i mod C, so every prefix is balanced),
    'random' (drawn from the seed alone), 'list' (given), 'none' (unconditional models only).
    null_class: a given list may also hold C, the model's unconditional class (see `allows_null_class`)."""
    if num_classes <= 0:
        if mode == "list" and label_list is not None:
            raise NeonError("labels were given for an unconditional model")
        return None
    if mode == "none":
        raise NeonError("the model is class-conditional: it needs labels (per_class, random or a list)")
    if mode == "per_class":
        return np.arange(len(seeds), dtype=np.int64) % num_classes
    if mode == "random":
        return np.array([np.random.default_rng([int(s), LABEL_STREAM]).integers(num_classes) for s in seeds],
                        dtype=np.int64)
    if mode == "list":
        labels = np.asarray(label_list)
        if labels.dtype.kind not in "iu":
            raise NeonError(f"labels must be integers, got {labels.dtype}")
        if labels.shape != (len(seeds),):
            raise NeonError(f"{len(labels)} labels given for {len(seeds)} seeds")
        check_label_range(labels, num_classes, null_class)
        return labels.astype(np.int64)
    raise NeonError(f"unknown label mode {mode!r}")


def check_label_range(labels: np.ndarray, num_classes: int, null_class: bool = False, where: str = "") -> None:
    """Refuse labels outside [0, C) — or [0, C] where C, the unconditional class, is allowed."""
    top = num_classes + int(null_class)
    if len(labels) and (labels.min() < 0 or labels.max() >= top):
        allowed = f"[0, {num_classes}] ({num_classes}: unconditional)" if null_class else f"[0, {num_classes})"
        raise NeonError(f"{where}labels must lie in {allowed}, got {labels.min()}..{labels.max()}")


def allows_null_class(family: Family) -> bool:
    """Whether the family's models take the label C = num_classes as 'no class' (VAR's classifier-free
    guidance row, which its sampler accepts as a label): a fact the family declares as `allows_null_class`."""
    return bool(getattr(family, "allows_null_class", False))


def draw_labels(family: Family, bundle: Bundle, seeds: Sequence[int], mode: str = "random",
                label_list: Sequence[int] | None = None) -> np.ndarray | None:
    """`class_labels` for this model; 'random' labels come from the family's own rule where it has one
    (`family.labels_from_seeds(bundle, seeds)`, e.g. EDM's generate.py draws the class from the image's
    generator after its latents), so a seed gives the image the official code gives it."""
    rule = getattr(family, "labels_from_seeds", None)
    if mode == "random" and bundle.num_classes > 0 and rule is not None:
        return np.asarray(rule(bundle, list(seeds)), dtype=np.int64)
    return class_labels(seeds, bundle.num_classes, mode, label_list, allows_null_class(family))


def _done_seeds(shard_dir: str) -> set[int]:
    done: set[int] = set()
    for path in glob.glob(os.path.join(shard_dir, "shard-*.npz")):
        done.update(int(s) for s in NpzImages(path).seeds)
    return done


def generate(family: Family, bundle: Bundle, seeds: Sequence[int], labels: np.ndarray | None, batch: int,
             sampler_args: dict, progress: str | None = None):
    """Yield (seeds, labels, uint8 images) batch by batch for this rank's `seeds` (no files)."""
    bar = tqdm(total=len(seeds) * dist.world_size(), desc=progress, unit="img",
               disable=not progress or not dist.is_main(), dynamic_ncols=True)
    for i in range(0, len(seeds), batch):
        chunk = list(seeds[i:i + batch])
        chunk_labels = None if labels is None else torch.as_tensor(labels[i:i + batch])
        images = family.sample(bundle, chunk, chunk_labels, **sampler_args)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(chunk):
            raise NeonError(f"{family.name}.sample returned {images.dtype} {tuple(images.shape)}, "
                            f"expected uint8 ({len(chunk)}, H, W, C)")
        bar.update(len(chunk) * dist.world_size())
        yield chunk, None if chunk_labels is None else chunk_labels.numpy(), images.numpy()
    bar.close()


def _join(shard_dir: str, seeds: Sequence[int], labels: np.ndarray | None, out: str, block: int = 4096) -> None:
    shards = [NpzImages(p) for p in sorted(glob.glob(os.path.join(shard_dir, "shard-*.npz")))]
    where = {}
    for k, shard in enumerate(shards):
        for j, s in enumerate(shard.seeds):
            where[int(s)] = (k, j)
    missing = [s for s in seeds if s not in where]
    if missing:
        raise NeonError(f"{shard_dir}: {len(missing)} seeds have no image (first: {missing[0]})")
    shape = (len(seeds),) + tuple(shards[0].shape[1:])

    def image_blocks():
        for i in range(0, len(seeds), block):
            rows = [where[s] for s in seeds[i:i + block]]
            out_block = np.empty((len(rows),) + shape[1:], dtype=np.uint8)
            for k in sorted({k for k, _ in rows}):
                idx = [(n, j) for n, (kk, j) in enumerate(rows) if kk == k]
                lo, hi = min(j for _, j in idx), max(j for _, j in idx) + 1
                part = shards[k].read(lo, hi)
                for n, j in idx:
                    out_block[n] = part[j - lo]
            yield out_block

    arrays = {"arr_0": (shape, np.uint8, image_blocks())}
    if labels is not None:
        arrays["arr_1"] = (labels.shape, np.int64, [labels])
    arrays["seeds"] = ((len(seeds),), np.int64, [np.asarray(seeds, dtype=np.int64)])
    write_npz(out, arrays)


def sample_to_npz(family: Family, bundle: Bundle, seeds: Sequence[int], labels: np.ndarray | None, out: str,
                  batch: int = 64, sampler_args: dict | None = None, png: str | None = None) -> str:
    """Draw one image per seed into `out` (.npz), resuming from `<out>.shards/` if a previous run was killed.
    Every rank calls this; rank 0 joins and returns when the file exists."""
    if bundle.conditional and labels is None:
        raise NeonError("the model is class-conditional: it needs labels")
    if batch <= 0:
        raise NeonError(f"batch: must be positive, got {batch}")
    if os.path.exists(paths.output_file(out, ".npz file")):
        raise FileExistsError(f"{out} exists")
    if png:
        paths.output_folder(png)
    with paths.made_folder(out + ".shards") as shard_dir, _exclusive(out):
        _sample_shards(family, bundle, seeds, labels, out, shard_dir, batch, sampler_args)
    if dist.is_main() and png:
        export_png(NpzImages(out), png)
    dist.barrier()
    return out


@contextlib.contextmanager
def _exclusive(out: str):
    """Rank 0 holds `<out>.lock` while the ranks write `out`: a second job on the same output refuses at once
    (every rank of it) instead of racing this one for the same shards."""
    held, error = contextlib.ExitStack(), None
    if dist.is_main():
        try:
            held.enter_context(paths.output_lock(out))
        except NeonError as e:
            error = e
    if dist.all_reduce_sum(torch.tensor([float(error is not None)])).item():
        raise error or NeonError(f"{out}: in use by another job")
    with held:
        yield


def _sample_shards(family, bundle, seeds, labels, out, shard_dir, batch, sampler_args) -> None:
    dist.barrier()
    done = _done_seeds(shard_dir)
    # Every rank must split the same list of missing seeds: nobody writes a shard until all have looked.
    dist.barrier()
    todo = [(i, s) for i, s in enumerate(seeds) if s not in done]
    mine = dist.shard(todo)
    my_seeds = [s for _, s in mine]
    my_labels = None if labels is None else labels[[i for i, _ in mine]]
    if dist.is_main() and done:
        print(f"resuming: {len(done)} of {len(seeds)} images already drawn")
    for chunk, chunk_labels, images in generate(family, bundle, my_seeds, my_labels, batch, sampler_args or {},
                                                progress=f"sampling {os.path.basename(out)}"):
        save_images_npz(os.path.join(shard_dir, f"shard-{chunk[0]:010d}-{len(chunk)}.npz"), images,
                        chunk_labels, np.asarray(chunk, dtype=np.int64))
    dist.barrier()
    if dist.is_main():
        _join(shard_dir, list(seeds), labels, out)
        shutil.rmtree(shard_dir)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# CLI: neon sample

def parse_kv(items: Sequence[str] | None) -> dict:
    """['num_steps=18', 'cfg=1.5'] -> {'num_steps': 18, 'cfg': 1.5} (values parsed as YAML scalars)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise NeonError(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, help="model family: edm, var, xar, imm, tinypix, ...")
    p.add_argument("--ckpt", help="checkpoint of θr")
    p.add_argument("--tiny", action="store_true", help="use the family's tiny random network (tests)")
    p.add_argument("--load-arg", action="append", metavar="KEY=VALUE",
                   help="passed to the family's loader, e.g. vae_path=checkpoints/kl16.ckpt")


def load_model(args) -> tuple[Family, Bundle]:
    family = get_family(args.family)
    device = dist.init()
    load_args = parse_kv(args.load_arg)
    if args.tiny:
        return family, family.tiny(device, **load_args)
    if not args.ckpt:
        raise NeonError("--ckpt is required (or --tiny)")
    return family, family.load(paths.input_file(args.ckpt, "checkpoint"), device, **load_args)


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels, seeds)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--seeds", help="seed list, e.g. 0-49999")
    which.add_argument("--num-images", type=int, help="seeds 0..N-1")
    which.add_argument("--per-class", type=int, help="N images of every class (seeds 0..N·C-1, labels i mod C)")
    p.add_argument("--labels", default=None,
                   help="random | per_class | none | a .npy/.txt file with one label per seed "
                        "(default: per_class with --per-class, else random for conditional models)")
    p.add_argument("--batch", type=int, default=64, help="images per sampler call on one rank")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="sampler argument, e.g. num_steps=18")
    p.add_argument("--png", help="also export the images as PNGs into this folder")


def _labels_from_args(args, family, bundle, seeds):
    mode = args.labels or ("per_class" if args.per_class else "random" if bundle.num_classes else "none")
    if mode in ("random", "per_class", "none"):
        return draw_labels(family, bundle, seeds, mode)
    if not os.path.exists(mode):
        raise NeonError(f"--labels: {mode!r} is neither random/per_class/none nor a file")
    paths.input_file(mode, "label file (.npy, or text with one integer per line)")
    try:
        values = np.load(mode) if mode.endswith(".npy") else np.loadtxt(mode, dtype=np.int64, ndmin=1)
    except (ValueError, OSError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NeonError(f"{mode}: not a label file ({why})") from None
    try:
        return draw_labels(family, bundle, seeds, "list", values)
    except NeonError as e:
        raise NeonError(f"{mode}: {e}") from None


def sample_main(args) -> None:
    family, bundle = load_model(args)
    if args.seeds:
        seeds = parse_seeds(args.seeds)
    else:
        seeds = plan_seeds(args.num_images, args.per_class, bundle.num_classes)
    labels = _labels_from_args(args, family, bundle, seeds)
    t0 = time.time()
    sample_to_npz(family, bundle, seeds, labels, args.out, args.batch, parse_kv(args.arg), args.png)
    if dist.is_main():
        print(f"wrote {args.out}: {len(seeds)} images in {time.time() - t0:.1f} s")
