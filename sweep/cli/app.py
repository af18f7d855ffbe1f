"""The `sweep` app object, its consoles, and the one place user errors become exit 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from sweep.errors import UserError

EXIT_USER_ERROR = 2
# Wide when piped (CI logs, files): rich would otherwise wrap tables at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def fail(lines: list[str]) -> None:
    """Report user mistakes one per line and exit 2: nothing has been launched."""
    for line in lines:
        err.print(f"[bold red]error[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


class Commands(TyperGroup):
    """Every command runs through here: a `UserError` from any layer is printed as its lines
    and exits 2, with no traceback; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(e.lines)


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Sweep PEFT adapters as DeepSpeed trials on Ray Tune, tracked in MLflow.",
)
