"""User-facing errors: the CLI prints them as one line (no traceback) and exits with status 2."""


USER_ERROR = 2  # exit status of a refused command (bad input); a crash exits with 1, a signal with -N
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT, as a shell reports it)


class NeonError(Exception):
    """Bad input the user can fix: a wrong path, mismatched checkpoints, a bad w, missing statistics."""
