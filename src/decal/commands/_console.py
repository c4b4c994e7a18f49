"""The rich console every command prints its tables with.

On a terminal, rich fits tables to the terminal's width. When the output is piped, redirected or
captured, there is no width to fit, yet rich would still take COLUMNS (or 80) and fold cells
into fragments; there tables print at their natural width instead (up to `PIPE_WIDTH` columns),
so logs and pipes hold whole cells whatever COLUMNS says.
"""

from __future__ import annotations

__all__ = ["PIPE_WIDTH", "console"]

PIPE_WIDTH = 240


def console(*, stderr: bool = False):
    """A `rich.console.Console` for command output (see the module docstring)."""
    from rich.console import Console

    out = Console(stderr=stderr)
    return out if out.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)
