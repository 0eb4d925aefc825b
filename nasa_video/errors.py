"""The one exception type users see: a one-line message that names the fix."""


class UserError(Exception):
    """Bad input or a missing file/dependency. The CLI prints it as one line, without a traceback."""
