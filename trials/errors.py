"""The one exception a trial raises for user mistakes (bad data, unreachable model, ...)."""

from __future__ import annotations


class TrialError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits 2, no traceback."""
