"""The one exception type kdad raises for bad input: the CLI prints it as a one-line error."""


class KdadError(Exception):
    """A user-facing error: its message names the file or setting and the problem."""
