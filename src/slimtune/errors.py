"""User-facing errors.

A `SlimtuneError` is a mistake the user can fix. Its message is one line that names the problem
and the fix; the CLI prints it without a traceback and exits with status 2.
"""


class SlimtuneError(Exception):
    """A user mistake (bad path, bad option, missing package). One line: problem, then fix."""
