"""FID/IS of an xAR model with the flags of the official Neon `xAR/calculate_fid.py`, under torchrun:

    torchrun --standalone --nproc_per_node=8 -m xar.calculate_fid --model xar_large \\
        --model_ckpt checkpoints/Neon_xARL_imagenet256.pth --cfg 2.3 --vae_path checkpoints/kl16.ckpt \\
        --num_images 50000 --batch_size 64 --flow_steps 50 --img_size 256 --fid_stats fid_stats/adm_in256_stats.npz

Labels are balanced (image i gets class i mod class_num, as many of each class as N allows), as the official
prepare_labels; image i is drawn from
seed --seed + i alone, so the set does not depend on the number of GPUs. Accepted for compatibility and unused:
--cuda, --device, --dist_url, --world_size, --local_rank, --dist_on_itp (torchrun sets the processes up).
"""
import argparse
import os

from neon import dist
from neon.checkpoint import local_path
from neon.errors import NeonError
from neon.evaluate import evaluate_bundle
from neon.family import get_family
from neon.sampling import draw_labels, plan_seeds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=["xar_base", "xar_large", "xar_huge", "auto"],
                   help="the xar.* constructor the checkpoint must match ('auto': read the size from the file)")
    p.add_argument("--model_ckpt", required=True)
    p.add_argument("--cfg", type=float, required=True, help="classifier-free guidance scale")
    p.add_argument("--vae_path", required=True, help="MAR KL-16 VAE (kl16.ckpt)")
    p.add_argument("--num_images", type=int, default=50000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--flow_steps", type=int, default=64)
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--class_num", type=int, default=1000)
    p.add_argument("--fid_stats", required=True)
    p.add_argument("--no_isc", action="store_true", help="skip the Inception Score")
    p.add_argument("--out_dir", default=None, help="keep the samples in this folder's samples.npz")
    p.add_argument("--seed", type=int, default=1, help="image i is drawn from seed + i")
    p.add_argument("--autocast", default="fp16", choices=["fp16", "bf16", "none"],
                   help="on CUDA (the official script samples under fp16 autocast)")
    p.add_argument("--inception_weights", default=None, help="torch-fidelity weights ('fid-helper': offline)")
    p.add_argument("--json", help="also write the result as JSON")
    for flag in ("--device", "--dist_url", "--world_size", "--local_rank"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in ("--cuda", "--dist_on_itp"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    family = get_family("xar")
    bundle = family.load(local_path(args.model_ckpt), dist.init(), vae_path=args.vae_path,
                         model=None if args.model == "auto" else args.model)
    if args.img_size != bundle.resolution:
        raise NeonError(f"--img_size {args.img_size}, but the model makes {bundle.resolution}x{bundle.resolution}")
    if args.class_num != bundle.num_classes:
        raise NeonError(f"--class_num {args.class_num}, but the model has {bundle.num_classes} classes")
    seeds = plan_seeds(args.num_images, seed_offset=args.seed)
    sampler = dict(cfg=args.cfg, flow_steps=args.flow_steps,
                   autocast=None if args.autocast == "none" else args.autocast)
    evaluate_bundle(family, bundle, args.fid_stats, seeds=seeds, labels=draw_labels(family, bundle, seeds, "per_class"),
                    batch=args.batch_size, sampler_args=sampler, weights=args.inception_weights,
                    inception_score=not args.no_isc, json_out=args.json,
                    save_images=os.path.join(args.out_dir, "samples.npz") if args.out_dir else None,
                    extra={"checkpoint": args.model_ckpt, "model": args.model})


if __name__ == "__main__":
    from neon.cli import run_as_script
    run_as_script(main)
