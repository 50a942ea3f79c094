"""Named plug-ins found through entry points: the one mechanism behind families, commands and run kinds.

A package adds a family, a `neon` subcommand or a kind of `neon run` config by naming it in its
`pyproject.toml` (`[project.entry-points."neon.families"]`, `"neon.commands"`, `"neon.runs"`), or at run time
with `register`. The core looks plug-ins up by name and never imports the packages that provide them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from neon.errors import NeonError
from neon.startup import import_attribute, paused_gc


class Registry:
    """The plug-ins of one entry-point group; `register`ed objects shadow installed ones of the same name."""

    def __init__(self, group: str, what: str):
        self.group = group      # entry-point group, e.g. 'neon.families'
        self.what = what        # what a name stands for, for the error message ('family', 'command', ...)
        self._registered: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        self._registered[name] = obj

    def names(self) -> list[str]:
        found = {ep.name for ep in importlib.metadata.entry_points(group=self.group)}
        return sorted(found | set(self._registered))

    def get(self, name: str) -> Any:
        """The object registered or installed under `name` (an entry point is imported here, on first use)."""
        if name in self._registered:
            return self._registered[name]
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name == name:
                with paused_gc():  # a plug-in's modules import what they need (diffusers, ...)
                    return ep.load()
        raise NeonError(f"unknown {self.what} {name!r}; available: {', '.join(self.names()) or 'none'}")

    def __contains__(self, name: str) -> bool:
        return name in self._registered or any(ep.name == name for ep in
                                               importlib.metadata.entry_points(group=self.group))


def load_attribute(spec: str) -> Any:
    """'package.module:attribute' -> the attribute (for plug-ins that are not installed as entry points)."""
    module, _, attr = spec.partition(":")
    try:
        return import_attribute(module, attr)
    except (ImportError, AttributeError) as e:
        raise NeonError(f"cannot load {spec!r}: {e}") from None
