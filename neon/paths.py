"""Paths given on the command line: checked before anything is written, and nothing left behind by a killed job.

- Inputs must be regular files (`input_file`), and are opened and read only as such (`open_input`,
  `read_input`): a device never ends (/dev/zero) and opening a FIFO waits for a writer, so either is refused in
  one line before a byte is read. An output must not be a folder where a file goes, nor lie below a file
  (`output_file`, `output_folder`). Missing folders above an output are created when it is written.
- A folder made for a job that then fails while it is still empty is removed again (`made_folder`).
- Every file is written through a temporary file beside it, `.<name>.neon-tmp-<host>-<pid>`: a later write into
  the same folder recognises the leftovers of dead processes of this host by their name and removes them
  (`temp_path`, `remove_stale_temps`).
- A job writing one output for a long time (`neon sample`) holds `<out>.lock` (`output_lock`).
- An output never is, holds, or lies inside one of the job's inputs (`check_apart`), and a name planted in an
  output folder as a symbolic link is never written through (`no_symlink`, `open_nofollow`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterator

from neon.errors import NeonError

TEMP_TAG = ".neon-tmp-"
_HOST = socket.gethostname().split(".")[0][:32] or "localhost"
_SWEPT: set[str] = set()  # folders this process has already cleared of stale temporary files


def file_kind(mode: int) -> str:
    """What a file of `st_mode` `mode` is, for a refusal ('a FIFO', 'a device', ...)."""
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a folder" if stat.S_ISDIR(mode) else "not a regular file")


def _a(what: str) -> str:
    return ("an " if what[:1] in "aeiouAEIOU." else "a ") + what


def input_file(path: str, what: str = "file") -> str:
    """`path` if it is an existing regular file (or a link to one); else a one-line NeonError saying what is
    there instead."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NeonError(f"{path}: {what} not found") from None
    except OSError as e:   # a link loop, a file in the way of a folder, no permission
        raise NeonError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise NeonError(f"{path}: is a folder, expected {_a(what)}")
    if not stat.S_ISREG(mode):
        raise NeonError(f"{path}: is {file_kind(mode)}, not a regular file (expected {_a(what)})")
    return path


def open_input(path: str, what: str = "file"):
    """`path` open for binary reading, if it is a regular file. It is opened without waiting (O_NONBLOCK: a FIFO
    swapped in after the check would otherwise block the open) and checked again on the open file."""
    path = input_file(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NeonError(f"{path}: is {file_kind(mode)}, not a regular file (expected {_a(what)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str, what: str = "file", limit: int | None = None) -> bytes:
    """The bytes of the regular file `path`: as many as it held when opened (a file growing meanwhile cannot
    make the read endless), and, with `limit`, refused when more than that."""
    with open_input(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise NeonError(f"{path}: {size} bytes, more than {_a(what)} holds (at most {limit})")
        return f.read(size)


def _check_parent(path: str) -> None:
    """Refuse a `path` whose folder cannot be made: the nearest existing folder above it is a file."""
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NeonError(f"{path}: {above} is not a folder")


def output_file(path: str, what: str = "file") -> str:
    """`path` if a file can be written there (existing or not: callers decide about overwriting)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NeonError(f"{path}: is a folder, expected an output {what}")
    _check_parent(path)
    return path


def output_folder(path: str) -> str:
    """`path` if it is a folder or one can be made there."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NeonError(f"{path}: exists and is not a folder")
    _check_parent(path)
    return path


def _within(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_apart(out: str, inputs) -> None:
    """Refuse an output that is one of `inputs`, a folder holding one, or a path inside an input folder: writing
    (or replacing) it would destroy what the job reads. Compared after resolving symbolic links and '..'."""
    o = os.path.realpath(out)
    for inp in inputs:
        i = os.path.realpath(inp)
        if o == i:
            raise NeonError(f"{out}: is the input {inp}; choose another output")
        if _within(i, o):
            raise NeonError(f"{out}: holds the input {inp}; choose an output that does not contain the inputs")
        if _within(o, i):
            raise NeonError(f"{out}: lies inside the input folder {inp}; choose an output outside it")


def no_symlink(path: str) -> str:
    """`path` unless it is a symbolic link: a name planted in an output folder must not redirect a write."""
    if os.path.islink(path):
        raise NeonError(f"{path}: is a symbolic link; refusing to write through it")
    return path


def open_nofollow(path: str, flags: int, mode: int = 0o666) -> int:
    """os.open(path, flags) that refuses, in one line, to follow a symbolic link at `path` itself."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NeonError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise


@contextlib.contextmanager
def made_folder(path: str) -> Iterator[str]:
    """Make folder `path` (and missing parents) for a job; if the job fails while they are empty, remove the
    folders this call made, so a refused command leaves nothing behind."""
    output_folder(path)
    made = []
    p = os.path.abspath(path)
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:  # deepest first; a folder that holds anything is kept (and so are those above it)
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise


# ---------------------------------------------------------------------------------------------------------
# Temporary files.

def temp_path(path: str) -> str:
    """The temporary file of this process for `path`: beside it, hidden, named after it, this host and PID."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{TEMP_TAG}{_HOST}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(name: str) -> bool:
    """True for a temporary file of a dead process of this host (other hosts' PIDs cannot be checked here)."""
    if not name.startswith(".") or TEMP_TAG not in name:
        return False
    host, _, pid = name.rsplit(TEMP_TAG, 1)[1].rpartition("-")
    return host == _HOST and pid.isdigit() and not pid_alive(int(pid))


def remove_stale_temps(folder: str) -> None:
    """Delete the temporary files that killed processes left in `folder` (once per folder and process: a job
    writing thousands of files into one folder lists it once)."""
    folder = os.path.abspath(folder)
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if _stale(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------------------
# Locks.

def _holder(fd: int) -> tuple[str, str] | None:
    """(PID, host) a lock file records, or None if it records nothing readable."""
    os.lseek(fd, 0, os.SEEK_SET)
    fields = os.read(fd, 200).decode(errors="replace").split()
    return (fields[0], fields[1]) if len(fields) == 2 and fields[0].isdigit() else None


def _refuse(path: str, lock: str, holder: tuple[str, str] | None):
    pid, host = holder or ("?", _HOST)
    where = "" if host == _HOST else f" on {host}"
    raise NeonError(f"{path}: in use by PID {pid}{where} (another job is writing it; {lock} is its lock)")


@contextlib.contextmanager
def output_lock(path: str) -> Iterator[str]:
    """Hold `<path>.lock` while this job writes `path`; refuse with the holder's PID if another job holds it.

    The lock is an flock on the file, which the kernel drops when its process dies however it dies: a lock file
    left by a killed job (its PID dead) is taken over by the next one. The file records "PID host" so the refusal
    can say who holds it; on a file system without flock (some network mounts) that record is the lock, and a
    live PID of this host, or any PID of another host (which cannot be checked from here), holds it."""
    lock = os.fspath(path) + ".lock"
    while True:
        fd = open_nofollow(lock, os.O_RDWR | os.O_CREAT)   # a planted link would have its target truncated
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            _refuse(path, lock, holder)
        except OSError:  # no flock here
            holder = _holder(fd)
            if holder and (holder[1] != _HOST or pid_alive(int(holder[0]))) and holder != (str(os.getpid()), _HOST):
                os.close(fd)
                _refuse(path, lock, holder)
            break
        # The holder before us may have removed the file between our open and our flock: lock the file that
        # is at `lock` now, not an unlinked one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {_HOST}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        os.close(fd)
