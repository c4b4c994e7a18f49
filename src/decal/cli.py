"""The `decal` command line: a thin entry point that registers one module per subcommand.

Each module in `decal.commands` exposes `register(app)`; heavy imports (torch, transformers,
trl) happen inside the command functions so `decal --help` stays fast. Errors that a user can
fix (bad data, bad config, missing files) end as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

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
    "conformal",
    "serve",
    "monitor",
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


_PACKAGE = Path(__file__).resolve().parent


def _one_line_warnings(show_default):
    # decal's own warnings (an undefined AUROC, a skipped row) are for the user: one line,
    # like `error:`, without the source line. Other libraries' keep Python's format.
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if category is UserWarning and Path(filename).resolve().is_relative_to(_PACKAGE):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            show_default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and exits with) 0 on success, 1 on a failed run, 2 on a usage error."""
    with warnings.catch_warnings():
        # each distinct message once per command, not once per run folder or bootstrap call
        warnings.filterwarnings("once", category=UserWarning, module=r"decal(\.|$)")
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        code = _run(argv)
    if argv is None:
        sys.exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    try:
        result = app(args=argv, standalone_mode=False)
        return result if isinstance(result, int) else 0
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        return _fail("aborted", 130)
    except _USAGE as e:  # usage errors: bad flag, missing argument
        message = e.format_message()
        # `decal` with no arguments has already printed the help; nothing more to say.
        return _fail(message, 2) if message.strip() else 2
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume", 130)
    except (DecalError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        return _fail(str(e) or type(e).__name__, 1)
    except OSError as e:
        return _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e), 1)


if __name__ == "__main__":
    main()
