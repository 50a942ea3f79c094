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
import json
import os
import sys
import time

from neon import startup
from neon.errors import INTERRUPTED, USER_ERROR, NeonError, one_line
from neon.registry import Registry

# command -> (module, help)
COMMANDS = {
    "sample": ("neon.sampling", "draw a synthetic set from a checkpoint (sharded, resumable) -> .npz"),
    "finetune": ("neon.selftrain", "self-train a checkpoint on a synthetic set -> θs snapshots"),
    "merge": ("neon.merge", "θneon = (1+w)·θr − w·θs, streamed tensor by tensor"),
    "sweep": ("neon.sweep_cli", "choose w (× cfg) by FID"),
    "evaluate": ("neon.evaluate", "FID/IS of one checkpoint's samples against reference statistics"),
    "run": ("neon.run", "all stages from a config: sample → finetune → sweep → final evaluation"),
    "fid": ("neon.metrics.cli", "FID / IS / precision-recall of an image set against reference statistics"),
    "stats": ("neon.metrics.cli", "reference statistics (mu, sigma) of an image set"),
    "init": ("neon.init", "write a config for your own model and images, sized to a time budget on this machine"),
    "families": ("neon.describe", "each installed family's sampler, loss and load arguments, with their defaults"),
    "torchrun": ("neon.launch", "torchrun whose report of a refused job ends on the job's one-line error"),
}
PLUGINS = Registry("neon.commands", "command")

USER_ERRORS = (NeonError, FileNotFoundError, FileExistsError)


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


def fail(line: str) -> None:
    """Report a refused command as one line and exit with USER_ERROR.

    Under torchrun the line is printed once, by rank 0, and every rank also writes it into torchrun's error file
    (TORCHELASTIC_ERROR_FILE, the JSON its agent reads after a worker dies), so that torchrun's failure report
    shows the line and `neon torchrun` prints it as the last line of all."""
    from neon.launch import LAUNCHER_PRINTS
    line = one_line(line)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        stamp = str(int(time.time()))
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}},
                  "neon_error": line}
        try:
            with open(error_file, "w") as f:
                json.dump(record, f)
        except OSError:
            error_file = None  # then say it here
    if int(os.environ.get("RANK", "0")) == 0 and not (error_file and os.environ.get(LAUNCHER_PRINTS)):
        print(line, file=sys.stderr, flush=True)
    sys.exit(USER_ERROR)


def run_as_script(main_fn) -> None:
    """Run a `main()` of a family front-end (`python -m edm.calculate_fid ...`): user errors as one line."""
    startup.skip_collection_at_exit()
    try:
        main_fn()
    except USER_ERRORS as e:
        fail(f"error: {e}")


def interrupted() -> None:
    """Ctrl-C: one line instead of the traceback of wherever the job was, and the shell's status for SIGINT.
    Every stage keeps what it finished (sample shards, training snapshots, sweep points), so the same command
    goes on from there."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(tqdm and tqdm.tqdm, "_instances", ())):  # end the progress bar's line first
        bar.close()
    sys.stdout.flush()
    from neon.launch import LAUNCHER_PRINTS
    worker = "RANK" in os.environ   # under `neon torchrun` the launcher says it, else rank 0
    if not worker or (os.environ["RANK"] == "0" and not os.environ.get(LAUNCHER_PRINTS)):
        print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:
        interrupted()


def _main(argv: list[str] | None) -> None:
    if argv is None and not sys.stderr.isatty():   # the program, writing to a log file: a bar line every 30 s,
        os.environ.setdefault("TQDM_MININTERVAL", "30")   # not ten a second (tqdm reads TQDM_*; workers inherit it)
    argv = sys.argv[1:] if argv is None else list(argv)
    startup.skip_collection_at_exit()
    if argv[:1] == ["torchrun"]:  # its arguments are torchrun's: not parsed here
        return _module("torchrun").launch(argv[1:])
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS and command not in PLUGINS:
        command = None
    with startup.paused_gc():  # the command's module imports torch and what else it needs
        args = build_parser(command).parse_args(argv)
        command_main = getattr(_module(args.command), f"{args.command}_main")
    try:
        command_main(args)
    except USER_ERRORS as e:
        fail(f"neon {args.command}: error: {e}")


if __name__ == "__main__":
    main()
