"""User-facing errors: the CLI prints them as one line (no traceback) and exits with status 2."""


class NeonError(Exception):
    """Bad input the user can fix: a wrong path, mismatched checkpoints, a bad w, missing statistics."""
