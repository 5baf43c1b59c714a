"""User-facing errors.

A `SlimtuneError` is a mistake the user can fix. Its message is one line that names the problem
and the fix; the CLI prints it without a traceback and exits with status 2.
"""


class SlimtuneError(Exception):
    """A user mistake (bad path, bad option, missing package). One line: problem, then fix."""


def check_sparsity(value: float, flag: str = "--sparsity") -> float:
    """The one range check for a sparsity fraction, shared by settings, schedules and selection."""
    if not 0.0 <= value < 1.0:
        raise SlimtuneError(f"{flag} {value} is outside [0, 1); pass a fraction such as 0.2")
    return value
