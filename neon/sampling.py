"""Stage 1 — the synthetic set S: draw images from θr with its usual sampler, sharded over ranks, resumable.

Every random draw of an image comes from its seed, and the seed list is cut into fixed batches of `batch`
consecutive seeds before anything is dealt to ranks. A batch therefore holds the same seeds, and the network
sees the same inputs, on 1, 8 or 64 processes: for a given batch size and device type the set is byte-identical
on any number of processes, with every family's fast batched sampler (on CPU and GPU alike). It does depend on
the batch size, since CPU BLAS, oneDNN and CUDA pick kernels (and so their last bits) by batch shape; with
`batch_invariant` every image is computed as if drawn alone and depends on its seed and label only.

Ranks write one shard per batch atomically into `<out>.shards/`; a rerun after a kill skips the batches already
there, and rank 0 streams the shards, in the order of the requested seeds, into one ADM-style `.npz`.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from neon import containers, dist, fastpaths, gpu_options, paths
from neon.checkpoint import load_state_dict
from neon.config import check_args
from neon.errors import NeonError, shown
from neon.family import Bundle, Family, get_family, public, readers
from neon.guidance import active_guide, with_guide
from neon.images import NpzImages, export_png, read_npy, save_images_npz, write_npz
from neon.pipeline_folder import is_pipeline_folder

LABEL_STREAM = 0x4C41424C  # 'LABL': labels drawn "from the seed" use their own stream, apart from the sampler's


MAX_SEEDS = 100_000_000   # seeds one command may list (the largest paper set, S of VAR-d16, is 750k)


def parse_seeds(spec: str) -> list[int]:
    """'0-999,2000,3000-3009' -> [0, ..., 999, 2000, 3000, ..., 3009] (ranges inclusive, as EDM's --seeds)."""
    seeds: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                if int(b) - int(a) + 1 + len(seeds) > MAX_SEEDS:
                    raise NeonError(f"seed list {shown(spec)}: more than {MAX_SEEDS} seeds")
                seeds.extend(range(int(a), int(b) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise NeonError(f"bad seed list {shown(spec)} (expected e.g. '0-999,2000')") from None
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
                 label_list: Sequence[int] | None = None, null_class: bool = False,
                 classes: Sequence[int] | None = None) -> np.ndarray | None:
    """Labels for `seeds`: 'per_class' (the i-th seed gets class i mod C, so every prefix is balanced),
    'random' (drawn from the seed alone), 'list' (given), 'none' (unconditional models only).
    null_class: a given list may also hold C, the model's unconditional class (see `allows_null_class`).
    classes: [first, end): 'per_class' and 'random' labels from these classes only (first + i mod (end − first))."""
    if classes is not None and mode in ("per_class", "random") and num_classes > 0:
        first, end = classes
        if not 0 <= first < end <= num_classes:
            raise NeonError(f"classes {list(classes)}: not within the model's {num_classes} classes")
        return first + class_labels(seeds, end - first, mode)
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
                label_list: Sequence[int] | None = None, classes: Sequence[int] | None = None) -> np.ndarray | None:
    """`class_labels` for this model; 'random' labels over all classes come from the family's own rule where it
    has one (`family.labels_from_seeds(bundle, seeds)`, e.g. EDM's generate.py draws the class from the image's
    generator after its latents), so a seed gives the image the official code gives it. classes: [first, end),
    labels from these only."""
    if classes is not None:
        return class_labels(seeds, bundle.num_classes, mode, label_list, allows_null_class(family), classes)
    if mode == "random" and bundle.num_classes > 0:
        own = family.labels_from_seeds(bundle, list(seeds))
        if own is not None:
            return np.asarray(own, dtype=np.int64)
    return class_labels(seeds, bundle.num_classes, mode, label_list, allows_null_class(family))


def plan_batches(num_seeds: int, batch: int) -> list[range]:
    """Positions 0..num_seeds-1 cut into batches of `batch` consecutive positions (the last one may be short).

    The cut depends on the seed list and the batch size only, never on the number of processes: batch k holds
    the same seeds on 1, 8 or 64 ranks, so the network computes every image in the same company."""
    if not isinstance(batch, int) or batch < 1:
        raise NeonError(f"batch must be a positive integer, got {batch!r}")
    return [range(i, min(i + batch, num_seeds)) for i in range(0, num_seeds, batch)]


def deal(batches: Sequence[range], r: int | None = None, n: int | None = None) -> list[range]:
    """Rank r's share (default: this rank's) of n ranks: every n-th whole batch starting at r."""
    return dist.shard(list(batches), r, n)


def draw_batch(family: Family, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None,
               sampler_args: dict, batch_invariant: bool = False) -> torch.Tensor:
    """One batch -> uint8 (B, H, W, C). batch_invariant: compute every image as if it were drawn alone, so it
    does not depend on the batch size either: with the family's own batch-invariant arithmetic where its
    `sample` takes a `batch_invariant` argument, else one `sample` call per seed."""
    sampler_args = gpu_options.on_cpu(_device(bundle), sampler_args)   # GPU options named, autocast left out
    with fastpaths.backends(family.BACKENDS.get("sample")):   # TF32 and cuDNN as the official sampler sets them
        if not batch_invariant:
            images = family.sample(bundle, seeds, labels, **sampler_args)
        elif "batch_invariant" in inspect.signature(family.sample).parameters:
            images = family.sample(bundle, seeds, labels, batch_invariant=True, **sampler_args)
        else:
            images = torch.cat([family.sample(bundle, [s], None if labels is None else labels[i:i + 1],
                                              **sampler_args) for i, s in enumerate(seeds)])
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(seeds):
        raise NeonError(f"{family.name}.sample returned {images.dtype} {tuple(images.shape)}, "
                        f"expected uint8 ({len(seeds)}, H, W, C)")
    return images


def _device(bundle: Bundle) -> torch.device:
    p = next(bundle.net.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def generate(family: Family, bundle: Bundle, seeds: Sequence[int], labels: np.ndarray | None, batch: int,
             sampler_args: dict, progress: str | None = None, batch_invariant: bool = False,
             total: int | None = None):
    """Yield (seeds, labels, uint8 images) for consecutive batches of `batch` of `seeds` (no files).
    total: images counted by the progress bar (default: len(seeds) on every rank)."""
    check_args(family.SAMPLER_ARGS, sampler_args, "sampler")
    bar = tqdm(total=total or len(seeds) * dist.world_size(), desc=progress, unit="img",
               disable=not progress or not dist.is_main(), dynamic_ncols=True)
    for part in plan_batches(len(seeds), batch):
        chunk = [seeds[i] for i in part]
        chunk_labels = None if labels is None else torch.as_tensor(labels[part.start:part.stop])
        images = draw_batch(family, bundle, chunk, chunk_labels, sampler_args, batch_invariant)
        bar.update(len(chunk) * dist.world_size())
        yield chunk, None if chunk_labels is None else chunk_labels.numpy(), images.numpy()
    bar.close()


def _shard_path(shard_dir: str, k: int) -> str:
    return os.path.join(shard_dir, f"shard-{k:08d}.npz")


def _done_batches(shard_dir: str, seeds: Sequence[int], batches: Sequence[range]) -> set[int]:
    """Indices of the batches whose shard is on disk; a shard that is not exactly a batch of this plan is an error
    (the folder was begun with another seed list or --batch, and resuming would mix two cuts)."""
    done = set()
    for path in sorted(glob.glob(os.path.join(shard_dir, "shard-*.npz"))):
        name = os.path.basename(path)[len("shard-"):-len(".npz")]
        k = int(name) if name.isdigit() else -1
        held = NpzImages(path).seeds
        if not 0 <= k < len(batches) or held is None or \
                held.tolist() != [seeds[i] for i in batches[k]]:
            raise NeonError(f"{path}: not a batch of this run (begun with another seed list or --batch?); "
                            f"rerun with the same arguments or remove {shard_dir}")
        done.add(k)
    return done


def _remove_shards(shard_dir: str, num_batches: int) -> None:
    """Delete the shards, by the names this sampler gives them, then the folder if that empties it: a file
    someone else put there is kept, and so is the folder holding it."""
    for k in range(num_batches):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_shard_path(shard_dir, k))
    paths.remove_stale_temps(shard_dir)   # killed ranks' half-written shards
    with contextlib.suppress(OSError):
        os.rmdir(shard_dir)


def _join(shard_dir: str, num_batches: int, labels: np.ndarray | None, seeds: Sequence[int], out: str) -> None:
    """Concatenate the shards of batches 0..num_batches-1 into `out`, one shard in memory at a time."""
    first = NpzImages(_shard_path(shard_dir, 0))
    shape = (len(seeds),) + tuple(first.shape[1:])
    arrays = {"arr_0": (shape, np.uint8, (NpzImages(_shard_path(shard_dir, k)).read(0, None)
                                          for k in range(num_batches)))}
    if labels is not None:
        arrays["arr_1"] = (labels.shape, np.int64, [labels])
    arrays["seeds"] = ((len(seeds),), np.int64, [np.asarray(seeds, dtype=np.int64)])
    write_npz(out, arrays)


def sample_to_npz(family: Family, bundle: Bundle, seeds: Sequence[int], labels: np.ndarray | None, out: str,
                  batch: int = 64, sampler_args: dict | None = None, png: str | None = None,
                  batch_invariant: bool = False) -> str:
    """Draw one image per seed into `out` (.npz), resuming from `<out>.shards/` if a previous run was killed.
    Every rank calls this; rank 0 joins and returns when the file exists.

    The seed list is cut into batches of `batch` consecutive seeds (`plan_batches`), whole batches are dealt to
    the ranks, and a rerun skips the batches already on disk. So for a given batch size and device type the
    file is byte-identical on any number of processes, resumed or not, with each family's batched sampler.
    batch_invariant: images that do not depend on the batch size either (`draw_batch`; slower)."""
    if bundle.conditional and labels is None:
        raise NeonError("the model is class-conditional: it needs labels")
    if batch <= 0:
        raise NeonError(f"batch: must be positive, got {batch}")
    if os.path.exists(paths.output_file(out, ".npz file")):
        raise FileExistsError(f"{out} exists")
    if png:
        paths.output_folder(png)
        if os.path.isdir(png) and os.listdir(png):   # its PNGs and dataset.json would replace what is there
            raise NeonError(f"--png {png}: a folder with files in it; choose a new or empty folder")
    with paths.made_folder(paths.no_symlink(out + ".shards")) as shard_dir, exclusive(out):
        _sample_shards(family, bundle, seeds, labels, out, shard_dir, batch, sampler_args, batch_invariant)
    if dist.is_main() and png:
        export_png(NpzImages(out), png)
    dist.barrier()
    return out


@contextlib.contextmanager
def exclusive(out: str):
    """Rank 0 holds `<out>.lock` while the ranks write `out` (a file, or a run folder's record): a second job
    on the same output refuses at once (every rank of it) instead of racing this one for the same files."""
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


def _sample_shards(family, bundle, seeds, labels, out, shard_dir, batch, sampler_args,
                   batch_invariant) -> None:
    batches = plan_batches(len(seeds), batch)
    dist.barrier()
    done = _done_batches(shard_dir, seeds, batches)
    # Every rank must deal the same list of missing batches: nobody writes a shard until all have looked.
    dist.barrier()
    todo = [k for k in range(len(batches)) if k not in done]
    if dist.is_main() and done:
        print(f"resuming: {sum(len(batches[k]) for k in done)} of {len(seeds)} images already drawn")
    bar = tqdm(total=sum(len(batches[k]) for k in todo), desc=f"sampling {os.path.basename(out)}", unit="img",
               disable=not dist.is_main(), dynamic_ncols=True)
    for k in dist.shard(todo):
        part = batches[k]
        chunk = [seeds[i] for i in part]
        chunk_labels = None if labels is None else torch.as_tensor(labels[part.start:part.stop])
        images = draw_batch(family, bundle, chunk, chunk_labels, sampler_args or {}, batch_invariant)
        save_images_npz(_shard_path(shard_dir, k), images.numpy(),
                        None if chunk_labels is None else chunk_labels.numpy(), np.asarray(chunk, dtype=np.int64))
        bar.update(len(chunk) * dist.world_size())
    bar.close()
    dist.barrier()
    if dist.is_main():
        _join(shard_dir, len(batches), labels, seeds, out)
        _remove_shards(shard_dir, len(batches))
    dist.wait_for_main(lambda: os.path.isfile(out))   # the join may outlast a collective's timeout
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
    p.add_argument("--family", required=True,
                   help=f"model family: {', '.join(public())} (their arguments: neon families)")
    p.add_argument("--ckpt", help="checkpoint of θr")
    p.add_argument("--tiny", action="store_true", help="use the family's tiny random network (tests)")
    p.add_argument("--load-arg", action="append", metavar="KEY=VALUE",
                   help="passed to the family's loader, e.g. vae_path=checkpoints/kl16.ckpt")
    p.add_argument("--trust-architecture", action="store_true",
                   help="EDM/IMM: read pickles (θr, --guide, --synth) whose embedded source is no official "
                        "release's (warned)")


def model_load_args(args) -> dict:
    """The loader's arguments: --load-arg KEY=VALUE pairs, and trust_architecture for --trust-architecture."""
    load_args = parse_kv(args.load_arg)
    if getattr(args, "trust_architecture", False):
        load_args["trust_architecture"] = True
    return load_args


def load_model(args) -> tuple[Family, Bundle]:
    family = get_family(args.family)
    device = dist.init()
    load_args = model_load_args(args)
    check_args(family.LOAD_ARGS + (family.TINY_ARGS if args.tiny else ()), load_args, "--load-arg")
    if args.tiny:
        return family, family.tiny(device, **load_args)
    if not args.ckpt:
        raise NeonError("--ckpt is required (or --tiny)")
    # A pipeline folder is a checkpoint too; a family that downloads by name (`loads_hub_ids`, the diffusers
    # family) is handed a name that is not a local path.
    by_name = getattr(family, "loads_hub_ids", False) and not os.path.exists(args.ckpt)
    ckpt = args.ckpt if by_name or is_pipeline_folder(args.ckpt) else paths.input_file(args.ckpt, "checkpoint")
    containers.check_reads(ckpt, family, readers)   # a file of another family or kind: said before `load`
    return family, family.load(ckpt, device, **load_args)


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
    p.add_argument("--batch", type=int, default=64,
                   help="images per sampler call; the seed list is cut into batches of this many consecutive seeds, "
                        "so the images depend on it (not on the number of processes)")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 matmuls and convolutions on CUDA (as the official IMM and VAR samplers; faster, not "
                        "bit-compatible with float32)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="compute every image as if drawn alone: images independent of --batch too (slower)")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="sampler argument, e.g. num_steps=18 (each family's, with defaults: neon families NAME)")
    p.add_argument("--guide", metavar="CKPT",
                   help="θs (a self-training snapshot of the same network) as a sampling-time guide: with "
                        "--arg guide_scale=ω every network output is (1+ω)·θr − ω·θs")
    p.add_argument("--png", help="also export the images as PNGs into this folder")


def _labels_from_args(args, family, bundle, seeds):
    mode = args.labels or ("per_class" if args.per_class else "random" if bundle.num_classes else "none")
    if mode in ("random", "per_class", "none"):
        return draw_labels(family, bundle, seeds, mode)
    if not os.path.exists(mode):
        raise NeonError(f"--labels: {mode!r} is neither random/per_class/none nor a file")
    paths.input_file(mode, "label file (.npy, or text with one integer per line)")
    try:
        values = read_npy(mode) if mode.endswith(".npy") else np.loadtxt(mode, dtype=np.int64, ndmin=1)
    except (ValueError, OSError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NeonError(f"{mode}: not a label file ({why})") from None
    try:
        return draw_labels(family, bundle, seeds, "list", values)
    except NeonError as e:
        raise NeonError(f"{mode}: {e}") from None


def load_guide(bundle: Bundle, path: str, trust_architecture: bool = False) -> Bundle:
    """`bundle` with θs read from `path` (any checkpoint container, or a pipeline folder) as its guide;
    trust_architecture: accept embedded source no family recognises (neon.checkpoint.open_checkpoint)."""
    where = path if is_pipeline_folder(path) else paths.input_file(path, "guide checkpoint")
    containers.check_reads(where)   # an image set or statistics file is no checkpoint
    return with_guide(bundle, load_state_dict(where, trust_architecture), f"--guide {path}")


def sample_main(args) -> None:
    family, bundle = load_model(args)
    if args.guide:
        bundle = load_guide(bundle, args.guide, args.trust_architecture)
    if args.seeds:
        seeds = parse_seeds(args.seeds)
    else:
        seeds = plan_seeds(args.num_images, args.per_class, bundle.num_classes)
    labels = _labels_from_args(args, family, bundle, seeds)
    t0 = time.time()
    sampler_args = parse_kv(args.arg)
    check_args(family.SAMPLER_ARGS, sampler_args, "--arg")
    active_guide(bundle, sampler_args.get("guide_scale", 0.0))   # refuse ω ≠ 0 without --guide before any file
    gpu_options.on_cpu(_device(bundle), sampler_args, tf32=args.tf32)   # warned before the first batch
    with fastpaths.tf32(args.tf32):
        sample_to_npz(family, bundle, seeds, labels, args.out, args.batch, sampler_args, args.png,
                      batch_invariant=args.batch_invariant)
    if dist.is_main():
        print(f"wrote {args.out}: {len(seeds)} images in {time.time() - t0:.1f} s")
