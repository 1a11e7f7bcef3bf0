"""The `ht` Typer app, which every command module registers its commands on.

Library errors (`HTError`, in the options' words: `htcli.cli.messages`), and file-system errors (`OSError`) the library did not foresee,
become a one-line `Error: ...` on stderr and exit code 1, never a traceback. `ht --help` lists
the commands in the pipeline's order, then the tools (`SECTIONS`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperGroup

from htcli import __version__
from htcli.cli.messages import current_cli_words, set_running
from htcli.errors import HTError

# Conventional help placeholders, by parameter type; Typer's own are `<str>`, `<list[Path]>`.
_PLACEHOLDERS = {str: "TEXT", Path: "PATH", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}


class _Argument(TyperArgument):
    """An argument shown as click does: `PROMPT` (required) or `[FILE]`, never `{prompt} <str>`."""

    def display_type_rich(self, ctx) -> None:
        return None  # the upper-case name is the placeholder

    def get_usage_pieces(self, ctx) -> list[str]:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return [name if self.required else f"[{name}]"]


def _placeholder(param) -> str:
    """PATH, INTEGER, [train|test]...: for a list option, the placeholder of one value."""
    described = param.type_descriptor
    if described.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in described.choices) + "]"
    annotation = described.annotation
    if described.is_list:
        (annotation,) = typer.core.get_args(annotation)
    return _PLACEHOLDERS.get(annotation, "VALUE")


def _conventional_help(command) -> None:
    """Give every parameter of `command` and its subcommands a conventional placeholder."""
    for param in command.params:
        if isinstance(param, TyperArgument):
            param.__class__ = _Argument  # only display methods differ; parsing is untouched
            param.metavar = param.metavar or param.name.upper()
        elif param.metavar is None:
            param.metavar = _placeholder(param)
    for sub in getattr(command, "commands", {}).values():
        _conventional_help(sub)


# `ht --help` in the order a run takes, then the tools; a command missing here is listed last.
SECTIONS = {
    "Pipeline": ("build-dataset", "fit-linear-baselines", "train-hyper", "steer", "evaluate", "score", "serve", "demo"),
    "Tools": ("models", "plan", "concepts", "hyper", "inspect", "hub"),
}


class _Root(TyperGroup):
    """The `ht` group: conventional placeholders everywhere, commands listed by `SECTIONS`,
    library errors as one line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _conventional_help(self)  # Typer builds subcommands first, so the whole tree is here

    def list_commands(self, ctx) -> list[str]:
        ordered = [name for names in SECTIONS.values() for name in names if name in self.commands]
        return ordered + [name for name in self.commands if name not in ordered]

    def format_commands(self, ctx, formatter) -> None:
        listed = {name for names in SECTIONS.values() for name in names}
        sections = {**SECTIONS, "Other": tuple(name for name in self.commands if name not in listed)}
        longest = max(len(name) for name in self.commands)  # one column for every section
        width = formatter.width - 6 - longest
        for title, names in sections.items():
            rows = [(name.ljust(longest), self.commands[name].get_short_help_str(width)) for name in names
                    if name in self.commands and not self.commands[name].hidden]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        set_running(command, self)  # notes and errors name this command's options
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HTError as error:
            typer.secho(f"Error: {current_cli_words(str(error))}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except OSError as error:  # a file system refusal the library did not foresee: still one line
            where = f": {error.filename}" if error.filename else ""
            typer.secho(f"Error: {error.strerror or error}{where}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="ht",
    cls=_Root,
    help="HyperTransport: steer text-to-image diffusion models by editing their activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)


_library_format = warnings.formatwarning


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A Hub cache fallback warns in one line on the terminal, as `ht`'s own warnings do (the
    library's `warnings.warn` shows the file and line of the call)."""
    from htcli.core.hub_access import HubCacheWarning

    if issubclass(category, HubCacheWarning):
        return f"warning: {message}\n"
    return _library_format(message, category, filename, lineno, line)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ht {__version__}")
        raise typer.Exit()


@app.callback()
def _quiet_libraries(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Keep diffusers' and transformers' info chatter and weight-loading bars off the terminal.

    Through the variables they read when first imported (a user's own setting wins): importing
    them here would cost every command three seconds, `ht models` and a usage error included.
    """
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.formatwarning = _warning_line
