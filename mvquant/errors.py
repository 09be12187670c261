"""The one exception type users see: a message that names the problem and the fix."""


class MvquantError(Exception):
    """Bad input or an unmet precondition. The CLI prints it on one line and exits with 2."""
