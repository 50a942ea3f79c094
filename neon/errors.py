"""User-facing errors: the CLI prints them as one line (no traceback) and exits with status 2."""


USER_ERROR = 2  # exit status of a refused command (bad input); a crash exits with 1, a signal with -N
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT, as a shell reports it)


class NeonError(Exception):
    """Bad input the user can fix: a wrong path, mismatched checkpoints, a bad w, missing statistics."""


# How long one refusal may be, and how much of a value it quotes: a hostile input must not turn the error
# line itself into megabytes (a YAML of aliases quoted in full) or into terminal control sequences.
MAX_LINE = 400
_SHOWN = None


def shown(value) -> str:
    """A bounded repr of a value quoted in an error: strings, lists and mappings cut with '...', nesting to
    three levels, so the quote stays short however large (or self-referencing) the value is."""
    global _SHOWN
    if _SHOWN is None:
        import reprlib
        _SHOWN = reprlib.Repr()   # (keyword arguments need Python 3.12)
        limits = dict(maxlevel=3, maxstring=80, maxlist=6, maxtuple=6, maxdict=6, maxset=6, maxother=80, maxlong=40)
        for name, limit in limits.items():
            setattr(_SHOWN, name, limit)
    return _SHOWN.repr(value)


def one_line(text: str) -> str:
    """`text` as one printable line of at most MAX_LINE characters: newlines, escape sequences and other control
    characters shown escaped (a key holding '\\n' cannot forge a second line, nor ANSI codes reach the terminal)."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:4 * MAX_LINE])
    return out if len(out) <= MAX_LINE else out[:MAX_LINE - 3] + "..."
