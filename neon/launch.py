"""`neon torchrun ARGS`: torchrun with ARGS, except that a job refused with a NeonError ends on that one line.

torchrun's agent reports a failed worker after the worker has died, in a 30-line ChildFailedError block; what a
worker printed is above it. torchrun's own channel for a worker's error is the JSON file named by
TORCHELASTIC_ERROR_FILE: `neon.cli.fail` writes the line there (so plain torchrun's report shows it in place of
a link to its documentation), and this launcher, which runs torchrun's agent in its own process, reads the root
cause from the agent's failure and prints the line alone, last, with the exit status of the job's error.
"""
from __future__ import annotations

import argparse
import os
import sys

from neon.errors import USER_ERROR
from neon.startup import import_attribute

# Set by this launcher for its workers: they leave the printing of their error line to it.
LAUNCHER_PRINTS = "NEON_LAUNCHER_PRINTS_ERRORS"


def add_torchrun_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="torchrun's arguments and the job, e.g. "
                   "--standalone --nproc_per_node=8 -m neon run configs/edm_cifar10_cond.yaml")


def torchrun_main(args) -> None:
    launch(args.torchrun_args)


def launch(argv: list[str]) -> None:
    torchrun = import_attribute("torch.distributed.run")
    ChildFailedError = import_attribute("torch.distributed.elastic.multiprocessing.errors", "ChildFailedError")
    os.environ[LAUNCHER_PRINTS] = "1"
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        _, root = e.get_first_failure()
        line = root.error_file_data.get("neon_error") if isinstance(root.error_file_data, dict) else None
        if line is None:
            raise  # not a NeonError: torchrun's own report, traceback and all
        print(line, file=sys.stderr)
        sys.exit(USER_ERROR)
