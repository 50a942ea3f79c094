"""`neon sample` throughput on 1 and 2 processes (gloo, one thread each), whole-process wall time.

    python bench/bench_scaling.py                       # every family at its bench config, 3 interleaved rounds
    python bench/bench_scaling.py --families imm --batch-vs 1    # also the same command at --batch 1

Each round runs the one-process and the two-process command back to back (alternating which goes first) and the
medians are compared; the sampling phase alone ("wrote ... in N s", from the first shard to the joined file) is
reported beside the whole process (interpreter start, torch import, torchrun). A speed-up near 2 needs two idle
cores: on a shared machine it measures the share of them the two processes got.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# family -> `neon sample` arguments at its bench config: tiny networks, enough images that the sampling of one
# process takes about 45 s on an idle core (torchrun's agent and two interpreters importing torch cost about 2.5 s
# more than one process's start, which a shorter run would weigh as heavily as the sampling)
CONFIGS = {
    "edm": ["--num-images", "4096", "--batch", "32", "--arg", "num_steps=18"],
    "var": ["--num-images", "27648", "--batch", "32", "--arg", "cfg=1.5", "--arg", "top_k=900", "--arg", "top_p=0.95"],
    "xar": ["--num-images", "1024", "--batch", "16", "--arg", "cfg=2.7", "--arg", "flow_steps=20"],
    "imm": ["--num-images", "32768", "--batch", "32", "--arg", "steps=8", "--arg", "cfg=1.5"],
}
# The IMM figure of the batch: the 1024-image command, against the same command at --batch 1.
BATCH_VS = {"imm": ["--num-images", "1024", "--batch", "32", "--arg", "steps=8", "--arg", "cfg=1.5"]}


def run(family: str, args: list[str], procs: int, folder: str) -> tuple[float, float, float]:
    """-> (whole-process seconds, sampling seconds, CPU seconds) of one `neon sample` run. CPU: user + system
    time of the process and every process it waited for (torchrun's workers), as /usr/bin/time reports it."""
    out = os.path.join(folder, f"{family}-{procs}-{time.monotonic_ns()}.npz")
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, "-m", "neon", "sample", "--family", family, "--tiny", *args, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    os.remove(out)
    sampling = float(re.search(r"images in ([0-9.]+) s", res.stdout).group(1))
    return wall, sampling, cpu


def compare(family: str, a: tuple[list[str], int], b: tuple[list[str], int], rounds: int, folder: str):
    """Interleaved rounds of two commands -> medians (wall_a, sampling_a, cpu_a, wall_b, sampling_b, cpu_b)."""
    times = {0: [], 1: []}
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            args, procs = (a, b)[i]
            times[i].append(run(family, args, procs, folder))
    med = [statistics.median(t[j] for t in times[i]) for i in (0, 1) for j in (0, 1, 2)]
    return tuple(med)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-vs", type=int, default=None, metavar="B",
                   help="instead compare one process at the bench --batch with one at --batch B")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            cfg = BATCH_VS.get(family, CONFIGS[family]) if args.batch_vs else CONFIGS[family]
            if args.batch_vs:
                other = [*cfg[:cfg.index("--batch") + 1], str(args.batch_vs), *cfg[cfg.index("--batch") + 2:]]
                w1, s1, c1, w2, s2, c2 = compare(family, (cfg, 1), (other, 1), args.rounds, folder)
                print(f"{family}: {' '.join(cfg)}: {w1:.1f} s (sampling {s1:.1f} s, CPU {c1:.1f} s); at --batch "
                      f"{args.batch_vs}: {w2:.1f} s (sampling {s2:.1f} s, CPU {c2:.1f} s); speed-up of the batch: "
                      f"{w2 / w1:.2f}x whole process, {s2 / s1:.2f}x sampling", flush=True)
            else:
                w1, s1, c1, w2, s2, c2 = compare(family, (cfg, 1), (cfg, 2), args.rounds, folder)
                print(f"{family}: {' '.join(cfg)}: 1 process {w1:.1f} s (sampling {s1:.1f} s, CPU {c1:.1f} s), "
                      f"2 processes {w2:.1f} s (sampling {s2:.1f} s, CPU {c2:.1f} s); speed-up {w1 / w2:.2f}x "
                      f"whole process, {s1 / s2:.2f}x sampling", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
