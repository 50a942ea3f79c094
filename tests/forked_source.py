"""Test helper: a copy of a persistence pickle whose embedded `module_src` is replaced by other code of the same
byte length, as a fork of the official networks would carry (every other byte of the file unchanged)."""
import pickletools
from pathlib import Path

_HEADER = {"SHORT_BINUNICODE": 2, "BINUNICODE": 5, "BINUNICODE8": 9}


def fork_source(src: Path, out: Path, code: str = "c_out = -c_out  # a fork") -> int:
    """Write `src` to `out` with each module_src string replaced by `code` padded with a comment; returns how
    many strings were replaced."""
    data = bytearray(Path(src).read_bytes())
    ops = list(pickletools.genops(bytes(data)))
    replaced = 0
    for i, (op, arg, _) in enumerate(ops):
        if op.name not in _HEADER or arg != "module_src":
            continue
        op2, arg2, pos2 = next(o for o in ops[i + 1:] if o[0].name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT"))
        if op2.name not in _HEADER:
            continue  # a memo reference to a source already replaced
        size = len(arg2.encode("utf-8"))
        text = (code + "\n#").ljust(size - 1, "-") + "\n"
        assert len(text.encode()) == size, "source too short to replace"
        start = pos2 + _HEADER[op2.name]
        data[start:start + size] = text.encode()
        replaced += 1
    Path(out).write_bytes(bytes(data))
    return replaced
