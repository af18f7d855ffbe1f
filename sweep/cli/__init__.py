"""The `sweep` command line: each module registers its commands on the one `app`."""

from __future__ import annotations

import sys

from sweep.cli import ludwig, planning, results, running  # noqa: F401  (registers the commands)
from sweep.cli.app import app, err


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
