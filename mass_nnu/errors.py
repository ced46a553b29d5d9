"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class MassError(Exception):
    """Bad input or a failed precondition that the user can fix. The message names the file and the problem."""
