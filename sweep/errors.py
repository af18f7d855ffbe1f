"""Every error a user can fix, under one base: its lines are the message (one problem per
line, naming the field or flag and the fix). The command line catches `UserError` once and
exits 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; nothing has been launched (or left running) because of it."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class SpecError(UserError):
    """The spec (or a file it names) is invalid."""


class LaunchError(UserError):
    """The sweep cannot start or reach its cluster, tracking server or job server."""


class StateError(UserError):
    """A sweep folder is missing, already taken, or not a sweep folder."""


class SweepLookupError(UserError):
    """The sweep, its store or its runs cannot be found."""


class TrialFailed(Exception):
    """A trial's failure, as one line (the traceback is the child run's error.txt).

    Not a user error: one failed trial does not stop the sweep. Tune keeps only the text of
    a trial's exception, so the driver finds this line in that text by `FAILURE_PREFIXES`."""


# How a TrialFailed's line starts in a formatted traceback (module-qualified, as Python and
# Ray print it) or in a bare `str` of the exception chain.
FAILURE_PREFIXES = (f"{TrialFailed.__module__}.{TrialFailed.__qualname__}:", f"{TrialFailed.__qualname__}:")
