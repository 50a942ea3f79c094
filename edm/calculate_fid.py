"""FID of an EDM network with the flags of the official Neon `edm/calculate_fid.py`, under torchrun:

    torchrun --standalone --nproc_per_node=8 -m edm.calculate_fid \\
        --network_pkl checkpoints/Neon_EDM_conditional_CIFAR10.pkl --ref fid_stats/cifar10-32x32.npz \\
        --seeds 0-49999 --max_batch_size 256 --num_steps 18

Images are drawn per seed as EDM's generate.py does (class labels from the seed's generator unless --class);
features come from NVIDIA's Inception detector, as the paper's EDM rows (--detector to change).
"""
import argparse

from neon.evaluate import evaluate_checkpoint
from neon.sampling import parse_seeds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network_pkl", required=True, help="network pickle (path or URL)")
    p.add_argument("--ref", required=True, help="reference statistics .npz {mu, sigma} (path or URL)")
    p.add_argument("--seeds", default="0-9999", help='e.g. "0-49999" or "1,2,5-10"')
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="fixed class index (default: random)")
    p.add_argument("--num_steps", type=int, default=18)
    p.add_argument("--sigma_min", type=float, default=0.002)
    p.add_argument("--sigma_max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--s_churn", type=float, default=0.0)
    p.add_argument("--s_min", type=float, default=0.0)
    p.add_argument("--s_max", type=float, default=float("inf"))
    p.add_argument("--s_noise", type=float, default=1.0)
    p.add_argument("--detector", default="nvidia", choices=["nvidia", "inception-v3-compat"])
    p.add_argument("--inception_weights", default="checkpoints/inception-2015-12-05.pkl",
                   help="detector weights ('fid-helper': offline pool3 weights)")
    p.add_argument("--json", help="also write the result as JSON")
    p.add_argument("--trust-architecture", action="store_true",
                   help="load a pickle whose embedded source is not an official release's (warned)")
    args = p.parse_args(argv)
    sampler = dict(num_steps=args.num_steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                   S_churn=args.s_churn, S_min=args.s_min, S_max=args.s_max, S_noise=args.s_noise)
    evaluate_checkpoint("edm", args.network_pkl, args.ref, seeds=parse_seeds(args.seeds), batch=args.max_batch_size,
                        sampler_args=sampler, detector=args.detector, weights=args.inception_weights,
                        inception_score=False, json_out=args.json, class_idx=args.class_idx,
                        load_args={"trust_architecture": True} if args.trust_architecture else None)


if __name__ == "__main__":
    from neon.cli import run_as_script
    run_as_script(main)
