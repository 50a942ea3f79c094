"""What a process pays to start and to end: importing the heavy libraries, and the interpreter's exit.

Importing torch leaves about 180,000 objects for Python's cyclic garbage collector to track, diffusers (which
imports torch._dynamo, sympy and scipy.stats) 250,000 more. The collector walks every one at each full collection,
which it runs whenever the heap has grown by a quarter, and once more while the interpreter shuts down. None of
those objects is garbage, yet the walks cost, per `neon sample --family imm --tiny` process, about 0.8 s of CPU
while importing and 1 s at exit, of some 7 s (measured with gc.callbacks; bench/README.md), and every torchrun
worker pays them again. So imports run with the collector paused (`paused_gc`, `import_attribute`), and at exit
the collector is told to ignore what exists (`gc.freeze`) instead of walking it (`skip_collection_at_exit`).
Reference counting frees memory as before in both cases: only the search for reference cycles is skipped.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
from typing import Any

_exit_hook_registered = False


@contextlib.contextmanager
def paused_gc():
    """No cyclic garbage collection inside the block; the collector's previous state afterwards. For blocks that
    import modules: what an import creates lives as long as the process, so no collection there finds garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def import_attribute(module: str, name: str | None = None) -> Any:
    """`module`, or its attribute `name`, imported with the collector paused: for a heavy library that a function
    imports where it uses it. The attribute is read inside the pause too, since diffusers imports a class's
    module (and its dependencies) on first access."""
    with paused_gc():
        imported = importlib.import_module(module)
        return imported if name is None else getattr(imported, name)


def skip_collection_at_exit() -> None:
    """At interpreter exit, move every object out of the collector's sight instead of letting the shutdown
    collections walk them. Call at the start of a command-line entry point (later calls do nothing): atexit
    runs its handlers last-registered first, so this one runs after those of the libraries imported later."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(gc.freeze)
        _exit_hook_registered = True
