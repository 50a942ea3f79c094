"""`neon families [NAME ...]`: what each installed family declares — the files its loader reads, and its sampler,
loss and load arguments with their defaults (the names `--arg`, `--loss-arg`, `--load-arg` and a config accept).
"""
from __future__ import annotations

import argparse

from neon.family import Arg, Family, get_family, public

HELP = "each installed family's sampler, loss and load arguments, with their defaults"

# (attribute, heading): where a declared argument goes, on the command line and in a config.
SECTIONS = (
    ("SAMPLER_ARGS", "sampler arguments (--arg KEY=VALUE; a config's sampler)"),
    ("LOSS_ARGS", "loss arguments (--loss-arg KEY=VALUE; a config's finetune.loss_args)"),
    ("LOAD_ARGS", "load arguments (--load-arg KEY=VALUE; a config's load_args)"),
)


def type_name(t) -> str:
    """int -> 'int'; str | None -> 'str | None'; list[int] -> 'list[int]'."""
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def describe_arg(a: Arg) -> str:
    return f"    {a.name}: {type_name(a.type)} = {a.default!r}  — {a.help}"


def describe(name: str, family: Family) -> list[str]:
    """The lines `neon families` prints for one family."""
    lines = [name]
    if getattr(family, "CONTAINERS", ()):
        lines.append(f"  reads: {', '.join(family.CONTAINERS)}")
    for attribute, heading in SECTIONS:
        args = getattr(family, attribute, ())
        lines.append(f"  {heading}:" if args else f"  {heading}: none")
        lines.extend(describe_arg(a) for a in args)
    return lines


def add_families_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="families to describe (default: every installed one)")


def families_main(args) -> None:
    names = args.names or public()
    text = [describe(name, get_family(name)) for name in names]   # unknown names refused before printing
    print("\n\n".join("\n".join(lines) for lines in text))
