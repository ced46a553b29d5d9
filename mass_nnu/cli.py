"""The ``mass`` command line. Commands are thin typer wrappers over the stage modules, which import lazily."""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable, Optional

import typer

from mass_nnu import __version__
from mass_nnu.errors import MassError

app = typer.Typer(
    name="mass",
    help="MASS in-context segmentation pretraining for nnU-Net: plan, propose, pretrain, finetune, segment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# (command name, module under mass_nnu.commands, function). Order = pipeline order in `mass --help`.
COMMANDS = [
    ("demo-data", "demo", "demo_data"),
    ("demo", "demo", "demo"),
    ("plan", "plan", "plan"),
    ("propose", "propose", "propose"),
    ("pretrain", "pretrain", "pretrain"),
    ("finetune", "finetune", "finetune"),
    ("segment", "incontext", "segment"),
    ("embed", "incontext", "embed"),
    ("probe", "incontext", "probe"),
    ("benchmark", "benchmark", "benchmark"),
    ("env", "env", "env"),
]


def error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def user_errors(func: Callable) -> Callable:
    """Turn MassError and OS errors into one stderr line and exit code 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (MassError, OSError) as e:
            typer.echo(f"mass: error: {error_line(e)}", err=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            typer.echo("mass: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mass-nnu {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    """MASS for nnU-Net. nnU-Net's folder variables are used when set, else ./mass_workspace/."""
    from mass_nnu.workspace import configure_environment

    if ctx.invoked_subcommand != "demo":  # the demo sets up its own workspace (--workspace)
        configure_environment()


for _name, _module, _func in COMMANDS:
    app.command(_name)(user_errors(getattr(importlib.import_module(f"mass_nnu.commands.{_module}"), _func)))


def main() -> None:
    try:
        app()
    except MassError as e:  # raised outside a command (callbacks)
        typer.echo(f"mass: error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
