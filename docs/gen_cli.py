"""Write docs/cli.md from the live `--help` of every `ht` command and subcommand (a test checks it).

Run: python docs/gen_cli.py
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import typer

from htcli.cli import app

OUT = Path(__file__).with_name("cli.md")


def _walk(command, path: list[str], parent=None) -> Iterator[tuple[list[str], str]]:
    """(path, help text) of `command` and everything under it. Typer ships its own copy of
    click, so a group is recognised by its `commands`, not by `isinstance(click.Group)`."""
    # make_context applies the app's context settings (`-h`) and links the parent, so usage
    # lines read `ht concepts list`; resilient parsing skips required-argument checks.
    with command.make_context(path[-1], [], parent=parent, resilient_parsing=True, terminal_width=100) as ctx:
        yield path, command.get_help(ctx)
        for name in sorted(getattr(command, "commands", {})):
            yield from _walk(command.commands[name], [*path, name], ctx)


def render() -> str:
    parts = ["# CLI reference\n", "Generated from `--help` by `python docs/gen_cli.py`; a test keeps it current.\n"]
    for path, text in _walk(typer.main.get_command(app), ["ht"]):
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
