"""kdad's own exception and warning: the one exception type it raises for bad input (the CLI
prints it as a one-line error), and the warning for a problem that does not stop the run."""


class KdadError(Exception):
    """A user-facing error: its message names the file or setting and the problem."""


class KdadWarning(UserWarning):
    """A problem (in the data, the settings...) that does not stop the run."""
