"""Write docs/cli.md from the live `--help` of every `ht` command and subcommand (a test checks it).

Run: python docs/gen_cli.py            (rewrite docs/cli.md)
     python docs/gen_cli.py --check    (exit 1, writing nothing, when docs/cli.md is stale)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
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


def is_current(path: Path | None = None) -> bool:
    """Whether `path` (default docs/cli.md) holds exactly what `render()` gives now."""
    path = path or OUT
    return path.is_file() and path.read_text(encoding="utf-8") == render()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from the live --help of every ht command.")
    parser.add_argument("--check", action="store_true", help="Only check: exit 1 if docs/cli.md is stale; write nothing.")
    args = parser.parse_args(argv)
    if args.check:
        if is_current():
            print(f"{OUT} is current")
            return 0
        print(f"{OUT} is stale; run: python docs/gen_cli.py", file=sys.stderr)
        return 1
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
