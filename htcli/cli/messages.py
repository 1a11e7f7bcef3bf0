"""Library messages in the command line's words: `layers=` becomes `--layers`.

The library names Python parameters in its errors and notes (`strength=`, `overwrite=True`), as
a Python user calls it; the CLI shows the same text with its own options. Each `name=` is looked
up among the running command's options (by their Python parameter name), then among every
command's; `LIBRARY_NAMES` holds the few library parameters whose option is called otherwise.
A `name=` that no option has is left as written.
"""

from __future__ import annotations

import re
from typing import Any

# Library parameter -> the CLI parameter that sets it, where the two names differ.
LIBRARY_NAMES = {
    "strengths": "strength",
    "concepts": "concept",
    "reference_images": "reference_image",
    "interventions": "intervention",
    "steps": "steps_",
    "reference": "hyper",
    "extra_dirs": "concept_dirs",  # load_library's folders of concept files: --concepts
}

# `name=` not inside a longer name (`ht.apply(x=...)`, `--strength=-1` stay), then True/False,
# or a quoted word a shell takes unquoted ('tiny', '1:'), or anything else
_PARAMETER = re.compile(r"(?<![\w.-])([a-z][a-z0-9_]*)=(?:(True|False)\b|'([\w.:-]+)'(?!\w))?")


def _options(command: Any) -> dict[str, Any]:
    """The options of `command` and of every command below it, by Python parameter name (the
    command's own first)."""
    found: dict[str, Any] = {}
    queue = [command]
    while queue:
        current = queue.pop(0)
        for param in current.params:
            if param.param_type_name == "option":
                found.setdefault(param.name, param)
        queue += list(getattr(current, "commands", {}).values())
    return found


def _rendered(option: Any, match: re.Match, next_char: str) -> str:
    """The option as typed: `--overwrite` for `overwrite=True`, `--model tiny` for `model='tiny'`,
    `--layers '*.norm1'` for `layers='*.norm1'`."""
    flag = max(option.opts, key=len)
    switch, word = match.group(2), match.group(3)
    if switch is not None:
        return flag if option.is_flag else f"{flag} {switch}"
    if word is not None:
        return f"{flag} {word}"
    return flag + (" " if next_char not in ("", " ", ",", ";", ")", ":") else "")


def cli_words(message: str, command: Any, everywhere: Any = None) -> str:
    """`message` with each Python parameter `name=` replaced by the option of `command` (else of
    any command under `everywhere`) that sets it."""
    own = _options(command)
    anywhere = {**_options(everywhere), **own} if everywhere is not None else own

    def option(match: re.Match) -> str:
        name = match.group(1)
        for table in (own, anywhere):
            found = table.get(name) or table.get(LIBRARY_NAMES.get(name, ""))
            if found is not None:
                return _rendered(found, match, message[match.end():match.end() + 1])
        return match.group(0)

    return _PARAMETER.sub(option, message)


_running: list[tuple[Any, Any]] = []  # (command, root) of the command this process runs


def set_running(command: Any, root: Any) -> None:
    """Say which command `ht` runs (`htcli.cli.app`), for `current_cli_words`."""
    _running[:] = [(command, root)]


def current_cli_words(message: str) -> str:
    """`message` in the words of the command now running (as is outside one)."""
    return cli_words(message, *_running[0]) if _running else message
