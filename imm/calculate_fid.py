"""FID/IS of an IMM model with the flags the official Neon README passes to `imm/calculate_fid.py`, under torchrun:

    torchrun --standalone --nproc_per_node=8 -m imm.calculate_fid \\
        --model_ckpt checkpoints/Neon_imm_imagenet256.pkl --vae_path checkpoints/sd-vae-ft-ema \\
        --num_images 50000 --batch_size 64 --img_size 256 --fid_stats fid_stats/adm_in256_stats.npz

(The official script is a hydra program that accepts none of these flags.) The default preset is the paper's:
8 pushforward steps with guidance 1.5 (--steps, --cfg). Labels are balanced over the classes (i mod C); image i is drawn
from seed --seed + i alone.
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
    p.add_argument("--model_ckpt", required=True, help="IMM pickle (imagenet256_ts_a2.pkl or a Neon file)")
    p.add_argument("--vae_path", default="checkpoints/sd-vae-ft-ema", help="stabilityai/sd-vae-ft-ema folder")
    p.add_argument("--num_images", type=int, default=50000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, choices=[1, 2, 4, 8])
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--temb_type", default=None, help="'identity' for imagenet256_s_a1.pkl")
    p.add_argument("--fid_stats", required=True)
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i")
    p.add_argument("--out_dir", default=None, help="keep the samples in this folder's samples.npz")
    p.add_argument("--inception_weights", default=None, help="torch-fidelity weights ('fid-helper': offline)")
    p.add_argument("--no_isc", action="store_true")
    p.add_argument("--json", help="also write the result as JSON")
    p.add_argument("--trust-architecture", action="store_true",
                   help="load a pickle whose embedded source is not an official release's (warned)")
    args = p.parse_args(argv)
    family = get_family("imm")
    bundle = family.load(local_path(args.model_ckpt), dist.init(), vae_path=args.vae_path, temb_type=args.temb_type,
                         trust_architecture=args.trust_architecture)
    if args.img_size != bundle.resolution:
        raise NeonError(f"--img_size {args.img_size}, but the model makes {bundle.resolution}x{bundle.resolution}")
    seeds = plan_seeds(args.num_images, seed_offset=args.seed)
    evaluate_bundle(family, bundle, args.fid_stats, seeds=seeds, labels=draw_labels(family, bundle, seeds, "per_class"),
                    batch=args.batch_size, sampler_args=dict(steps=args.steps, cfg=args.cfg),
                    weights=args.inception_weights, inception_score=not args.no_isc, json_out=args.json,
                    save_images=os.path.join(args.out_dir, "samples.npz") if args.out_dir else None,
                    extra={"checkpoint": args.model_ckpt})


if __name__ == "__main__":
    from neon.cli import run_as_script
    run_as_script(main)
