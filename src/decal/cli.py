"""The `decal` command line: a thin entry point that registers one module per subcommand.

Each module in `decal.commands` exposes `register(app)`; heavy imports (torch, transformers,
trl) happen inside the command functions so `decal --help` stays fast. Errors that a user can
fix (bad data, bad config, missing files) end as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer

from .errors import DecalError

# typer 0.29 raises the exceptions of its vendored click (`typer._click`); catch both spellings.
_CLICKS = [click.exceptions]
try:
    from typer._click import exceptions as _typer_click_exceptions

    _CLICKS.append(_typer_click_exceptions)
except ImportError:  # older typer uses click itself
    pass
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = tuple(m.ClickException for m in _CLICKS)

__all__ = ["app", "main"]

# Subcommand modules, in the order `decal --help` lists them.
COMMANDS = [
    "tasks",
    "evaluate",
    "train",
    "run",
    "report",
    "demo",
    "analyze",
    "metrics",
    "calibrate",
    "threshold",
]

app = typer.Typer(
    name="decal",
    help="Decision-token calibration: evaluate, fine-tune, calibrate and report on LLM decision makers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    for name in COMMANDS:
        importlib.import_module(f"decal.commands.{name}").register(app)


_register()


def _fail(message: str, code: int) -> int:
    first = " ".join(str(message).strip().splitlines()) or "failed"
    print(f"error: {first}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and exits with) 0 on success, 1 on a failed run, 2 on a usage error."""
    try:
        result = app(args=argv, standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except _EXIT as e:
        code = e.exit_code
    except _ABORT:
        code = _fail("aborted", 130)
    except _USAGE as e:  # usage errors: bad flag, missing argument
        message = e.format_message()
        # `decal` with no arguments has already printed the help; nothing more to say.
        code = _fail(message, 2) if message.strip() else 2
    except KeyboardInterrupt:
        code = _fail("interrupted; rerun the same command to resume", 130)
    except (DecalError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        code = _fail(str(e) or type(e).__name__, 1)
    except OSError as e:
        code = _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e), 1)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
