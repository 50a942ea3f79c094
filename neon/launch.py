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
import signal
import sys

from neon.errors import USER_ERROR
from neon.startup import import_attribute

# Set by this launcher for its workers: they leave the printing of their error line to it.
LAUNCHER_PRINTS = "NEON_LAUNCHER_PRINTS_ERRORS"


# `neon torchrun --help`: what this launcher adds, printed before torchrun's own help.
PREFACE = """\
neon torchrun: torchrun, with the arguments below, plus one thing. When the job refuses its input with a
one-line error (a wrong path, a bad config value), that line is the last one printed and the exit status is
2, instead of torchrun's 30-line ChildFailedError report; any other failure is reported by torchrun as usual.
Example: neon torchrun --standalone --nproc-per-node=8 -m neon run configs/edm_cifar10_cond.yaml"""


def parser() -> argparse.ArgumentParser:
    """torchrun's own parser, named `neon torchrun`, whose help begins with PREFACE."""
    p = import_attribute("torch.distributed.run").get_args_parser()
    p.prog = "neon torchrun"
    p.format_help = lambda: f"{PREFACE}\n\n{argparse.ArgumentParser.format_help(p)}"
    return p


def add_torchrun_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="torchrun's arguments and the job, e.g. "
                   "--standalone --nproc_per_node=8 -m neon run configs/edm_cifar10_cond.yaml")


def torchrun_main(args) -> None:
    launch(args.torchrun_args)


def launch(argv: list[str]) -> None:
    torchrun = import_attribute("torch.distributed.run")
    ChildFailedError = import_attribute("torch.distributed.elastic.multiprocessing.errors", "ChildFailedError")
    SignalException = import_attribute("torch.distributed.elastic.multiprocessing.api", "SignalException")
    os.environ[LAUNCHER_PRINTS] = "1"
    try:
        torchrun.run(parser().parse_args(argv))
    except SignalException as e:   # the agent's form of Ctrl-C: reported as the workers' (neon.cli.interrupted)
        if e.sigval != signal.SIGINT:
            raise
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        _, root = e.get_first_failure()
        line = root.error_file_data.get("neon_error") if isinstance(root.error_file_data, dict) else None
        if line is None:
            raise  # not a NeonError: torchrun's own report, traceback and all
        print(line, file=sys.stderr)
        sys.exit(USER_ERROR)
