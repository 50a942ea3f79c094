"""FID/IS of a VAR model with the flags of the official Neon `VAR/VAR_imagenet_{256,512}/calculate_fid.py`
(and those its README passes), under torchrun:

    torchrun --standalone --nproc_per_node=8 -m var.calculate_fid \\
        --var_ckpt checkpoints/Neon_VARd16_imagenet256.pth --vae_ckpt checkpoints/vae_ch160v4096z32.pth \\
        --num_images 50000 --batch_size 64 --img_size 256 --fid_stats fid_stats/adm_in256_stats.npz

Labels are balanced over the classes (image i gets class i mod C; N/C each when C divides N, as the official
script's build_balanced_labels); image i is drawn from seed --seed + i alone. The guidance default follows the
official script of each resolution
(2.9 for d16 @256, 4.0 for d36 @512); the paper's rows used 2.8 and 3.2 (configs/var_*.yaml).
"""
import argparse
import os

from neon import dist
from neon.checkpoint import local_path
from neon.errors import NeonError
from neon.evaluate import evaluate_bundle
from neon.family import get_family
from neon.sampling import draw_labels, plan_seeds

OFFICIAL_CFG = {16: 2.9, 36: 4.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", "--num_images", dest="num_images", type=int, required=True, help="total images")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model_depth", type=int, default=None, help="16 or 36 (default: read from the checkpoint)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the official script's)")
    p.add_argument("--top_k", type=int, default=900)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--more_smooth", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i")
    p.add_argument("--fid_stats", required=True, help="reference statistics .npz")
    p.add_argument("--var_ckpt", required=True)
    p.add_argument("--vae_ckpt", default=None, help="default: vae_ch160v4096z32.pth beside --var_ckpt")
    p.add_argument("--img_size", type=int, default=None, help="checked against the model's resolution")
    p.add_argument("--temp_dir", default=None, help="keep the samples in this folder's samples.npz")
    p.add_argument("--cuda", action="store_true", help="(accepted; the device is chosen automatically)")
    p.add_argument("--autocast", default="fp16", choices=["fp16", "bf16", "none"],
                   help="on CUDA (the official script samples under fp16 autocast)")
    p.add_argument("--inception_weights", default=None, help="torch-fidelity weights ('fid-helper': offline)")
    p.add_argument("--no_isc", action="store_true")
    p.add_argument("--json", help="also write the result as JSON")
    args = p.parse_args(argv)
    family = get_family("var")
    bundle = family.load(local_path(args.var_ckpt), dist.init(), vae_path=args.vae_ckpt)
    depth = len(bundle.net.blocks)
    if args.model_depth is not None and args.model_depth != depth:
        raise NeonError(f"--model_depth {args.model_depth}, but {args.var_ckpt} holds a d{depth} model")
    if args.img_size is not None and args.img_size != bundle.resolution:
        raise NeonError(f"--img_size {args.img_size}, but {args.var_ckpt} makes "
                        f"{bundle.resolution}x{bundle.resolution} images")
    cfg = args.cfg if args.cfg is not None else OFFICIAL_CFG.get(depth, 1.5)
    sampler = dict(cfg=cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                   autocast=None if args.autocast == "none" else args.autocast)
    seeds = plan_seeds(args.num_images, seed_offset=args.seed)
    labels = draw_labels(family, bundle, seeds, "per_class")
    evaluate_bundle(family, bundle, args.fid_stats, seeds=seeds, labels=labels, batch=args.batch_size,
                    sampler_args=sampler,
                    weights=args.inception_weights, inception_score=not args.no_isc, json_out=args.json,
                    save_images=os.path.join(args.temp_dir, "samples.npz") if args.temp_dir else None,
                    extra={"checkpoint": args.var_ckpt})


if __name__ == "__main__":
    from neon.cli import run_as_script
    run_as_script(main)
