"""Write docs/cli.md from the live `--help` of every `ht` command (checked by a test).

Run: python docs/gen_cli.py
"""

from __future__ import annotations

from pathlib import Path

import click
import typer

from htcli.cli import app

OUT = Path(__file__).with_name("cli.md")


def _walk(command: click.Command, path: list[str]):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _walk(command.commands[name], [*path, name])


def render() -> str:
    root = typer.main.get_command(app)
    parts = ["# CLI reference\n", "Generated from `--help` by `python docs/gen_cli.py`; a test keeps it current.\n"]
    for path, command in _walk(root, ["ht"]):
        with click.Context(command, info_name=" ".join(path), terminal_width=100) as ctx:
            text = command.get_help(ctx)
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
