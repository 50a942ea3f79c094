"""`neon toy` / `python -m experiments.toy`: the 2-D Gaussian experiment; prints the table, writes results, plots."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from neon.checkpoint import atomic_open
from neon.errors import NeonError

HELP = "the paper's 2-D Gaussian experiment (tiny diffusion + tiny AR model)"   # `neon toy --help`
RESULTS = "toy_results.json"


def add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current folder)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and steps, same logic")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed: model init, training noise, sampling (the real data is fixed, seed 42)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="parallel workers for the sampling and the sweeps (default: the usable CPU cores); "
                             "the results do not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def write_json(obj: dict, path: Path) -> None:
    """Atomic JSON write (the core's atomic_open: a temporary file beside `path`, then a rename)."""
    with atomic_open(str(path), "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_outputs(result: dict, out: Path) -> list[Path]:
    """toy_results.json (everything but the scatter-plot arrays) and the PNG figures -> their paths."""
    from experiments.toy.plots import save_figures  # matplotlib only when writing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    write_json({k: v for k, v in result.items() if k != "samples"}, path)
    return [path, *save_figures(result, out)]


def toy_main(args: argparse.Namespace) -> None:
    from experiments.toy.experiment import format_table, run_toy

    if args.threads < 1:
        raise NeonError(f"--threads must be ≥ 1, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        raise NeonError(f"--out {args.out} exists and is not a folder")
    result = run_toy(quick=args.quick, seed=args.seed, progress=not args.no_progress, threads=args.threads)
    print(format_table(result))
    paths = write_outputs(result, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)} ({result['timings_s']['total']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    """`python -m experiments.toy`: the same command as `neon toy`."""
    from neon.cli import main as neon_main

    neon_main(["toy", *(sys.argv[1:] if argv is None else argv)])
