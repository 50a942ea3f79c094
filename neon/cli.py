"""`neon` / `python -m neon`: one command per stage of the method, each usable alone or under torchrun.

Each subcommand lives with its code: its module provides `add_<command>_arguments(parser)` and
`<command>_main(args)`, and is imported only when that command runs (so `neon merge` never loads a metrics
stack). The core's commands are listed here; an experiment or another package adds its own through the
`neon.commands` entry-point group (its module also provides `HELP`, one line), as `experiments/toy` adds
`neon toy`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from neon.errors import NeonError
from neon.registry import Registry

# command -> (module, help)
COMMANDS = {
    "sample": ("neon.sampling", "draw a synthetic set from a checkpoint (sharded, resumable) -> .npz"),
    "finetune": ("neon.selftrain", "self-train a checkpoint on a synthetic set -> θs snapshots"),
    "merge": ("neon.merge", "θneon = (1+w)·θr − w·θs, streamed tensor by tensor"),
    "sweep": ("neon.sweep", "choose w (× cfg) by FID"),
    "evaluate": ("neon.evaluate", "FID/IS of one checkpoint's samples against reference statistics"),
    "run": ("neon.run", "all stages from a config: sample → finetune → sweep → final evaluation"),
    "fid": ("neon.metrics.cli", "FID / IS / precision-recall of an image set against reference statistics"),
    "stats": ("neon.metrics.cli", "reference statistics (mu, sigma) of an image set"),
}
PLUGINS = Registry("neon.commands", "command")


def _module(command: str):
    if command in COMMANDS:
        return importlib.import_module(COMMANDS[command][0])
    return PLUGINS.get(command)


def commands() -> dict[str, str]:
    """command -> one line of help: the core's, then those that installed packages add."""
    out = {name: help_ for name, (_, help_) in COMMANDS.items()}
    for name in PLUGINS.names():
        out.setdefault(name, getattr(PLUGINS.get(name), "HELP", ""))
    return out


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_ in commands().items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:  # only the chosen command's module is imported to add its arguments
            getattr(_module(name), f"add_{name}_arguments")(p)
    return parser


def run_as_script(main_fn) -> None:
    """Run a `main()` of a family front-end (`python -m edm.calculate_fid ...`): user errors as one line."""
    try:
        main_fn()
    except (NeonError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS and command not in PLUGINS:
        command = None
    args = build_parser(command).parse_args(argv)
    try:
        getattr(_module(args.command), f"{args.command}_main")(args)
    except (NeonError, FileNotFoundError, FileExistsError) as e:
        print(f"neon {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
