"""The docs stay true to the code: the CLI reference, README's commands and every command's help."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from htcli import __version__
from htcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console|text)?\n(.*?)^```", re.S | re.M)


def _command_paths(command=None, path=()):
    """Every command and group under `ht`, as argument paths: (), ("concepts",), ("concepts", "list")..."""
    command = command or typer.main.get_command(app)
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


ALL_PATHS = list(_command_paths())


def _ht_invocations(markdown: str) -> list[list[str]]:
    """The tokens after `ht` of every `ht ...` command in the shell code blocks of `markdown`."""
    found = []
    for block in SHELL_BLOCK.findall(markdown):
        text = re.sub(r"^\$ ", "", block.replace("\\\n", " "), flags=re.M)
        for line in text.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens, segment = list(lexer), []
            for token in [*tokens, ";"]:  # split at &&, ||, |, ;
                if set(token) <= set("&|;()"):
                    if segment[:1] == ["ht"]:
                        found.append(segment[1:])
                    segment = []
                else:
                    segment.append(token)
    return found


def _option_names(command, name: str) -> set[str]:
    context = command.make_context(name, [], resilient_parsing=True)
    return {opt for param in command.get_params(context) for opt in (*param.opts, *param.secondary_opts)}


def _problem(args: list[str]) -> str | None:
    """Why `ht ARGS` would be rejected by the real CLI: unknown command or option, bad value.

    Option names are checked against each command's parameters (click handles --help eagerly,
    so running `... --help` would accept any misspelled option before it); then click parses
    and converts every value without running the command."""
    command, path, rest = typer.main.get_command(app), ["ht"], list(args)
    while rest and getattr(command, "commands", None):
        token = rest.pop(0)
        if token in command.commands:
            command, path = command.commands[token], [*path, token]
        elif token.startswith("-"):
            if token.split("=")[0] not in _option_names(command, path[-1]):
                return f"{' '.join(path)} has no option {token}"
        else:
            return f"{' '.join(path)} has no command {token!r}"
    if getattr(command, "commands", None):
        return f"{' '.join(path)} is a group: no subcommand given"
    options = _option_names(command, path[-1])
    for token in rest:
        is_number = re.fullmatch(r"-[0-9.,]+", token)  # a value such as --strength -0.5
        if token.startswith("-") and not is_number and token.split("=")[0] not in options:
            return f"{' '.join(path)} has no option {token}"
    if {"-h", "--help"} & set(rest):
        return None
    try:
        command.make_context(" ".join(path), rest)
    except Exception as error:  # click's UsageError and BadParameter, typer's own conversions
        return f"ht {' '.join(args)}: {error}"
    return None


def _gen_cli():
    """docs/gen_cli.py as a module: the test checks with its own render and comparison."""
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    gen_cli = _gen_cli()
    text = gen_cli.render()
    for path in ALL_PATHS:  # every command and subcommand is documented, not only the top level
        assert f"## `{' '.join(('ht', *path))}`" in text
    assert gen_cli.is_current(), "run: python docs/gen_cli.py"


def test_gen_cli_help_and_check_write_nothing(tmp_path, monkeypatch, capsys):
    gen_cli = _gen_cli()
    stale = tmp_path / "cli.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(gen_cli, "OUT", stale)
    with pytest.raises(SystemExit) as exit_:
        gen_cli.main(["--help"])
    assert exit_.value.code == 0 and "--check" in capsys.readouterr().out
    assert gen_cli.main(["--check"]) == 1 and "stale" in capsys.readouterr().err
    assert stale.read_text() == "# old\n"
    assert gen_cli.main([]) == 0 and gen_cli.main(["--check"]) == 0
    assert stale.read_text() == gen_cli.render()


def test_readme_commands_exist_with_their_options():
    invocations = _ht_invocations((ROOT / "README.md").read_text())
    assert len(invocations) >= 5, "README's shell blocks should show the main `ht` commands"
    problems = [problem for args in invocations if (problem := _problem(args))]
    assert not problems, "README commands that the CLI rejects:\n" + "\n".join(problems)


def test_readme_checker_catches_renamed_options_and_commands():
    text = '```bash\nht steer "a cat" --concept "art deco" --strenght 1  # typo\nht concepts lst\n```\n'
    problems = [_problem(args) for args in _ht_invocations(text)]
    assert problems[0] == "ht steer has no option --strenght"
    assert problems[1] == "ht concepts has no command 'lst'"
    good = _ht_invocations('```\nmake && ht concepts list --split test | head\nht steer "a cat" -c x --strength 1\n```')
    assert good == [["concepts", "list", "--split", "test"], ["steer", "a cat", "-c", "x", "--strength", "1"]]
    assert [_problem(args) for args in good] == [None, None]
    assert "--split" in _problem(["concepts", "list", "--split", "tset"])  # a bad value, too


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(("ht", *p)))
def test_every_command_has_h_and_conventional_placeholders(path):
    long, short = runner.invoke(app, [*path, "--help"]), runner.invoke(app, [*path, "-h"])
    assert long.exit_code == short.exit_code == 0, short.output
    assert short.output == long.output
    assert long.output.startswith(f"Usage: {' '.join(('ht', *path))} ")
    assert "-h, --help" in long.output
    for typer_style in ("<list[", "<str>", "<int>", "<float>", "<path>", "<bool>", "{"):
        assert typer_style not in long.output


def test_help_placeholders_name_the_type():
    steer = runner.invoke(app, ["steer", "-h"]).output
    assert "Usage: ht steer [OPTIONS] PROMPT" in steer
    assert re.search(r"^  PROMPT  ", steer, re.M)  # the argument, without a type after it
    assert "--concept TEXT" in steer and "--out PATH" in steer and "--seed INTEGER" in steer
    assert "--split [train|test]" in runner.invoke(app, ["concepts", "list", "-h"]).output
    validate = runner.invoke(app, ["concepts", "validate", "-h"]).output
    assert "Usage: ht concepts validate [OPTIONS]\n" in validate and "--concepts PATH" in validate


def test_fixed_values_are_choices_listed_in_help():
    help_of = {name: runner.invoke(app, [name, "-h"], terminal_width=200).output for name in ("steer", "score")}
    assert "--method [hypertransport|prompt]" in help_of["steer"]
    assert "--judge [clip|vlm|transport]" in help_of["score"] and "--backend [transformers|openai]" in help_of["score"]
    typo = runner.invoke(app, ["score", "--judge", "clp"])
    assert typo.exit_code == 2 and "'clp' is not one of 'clip', 'vlm', 'transport'" in typo.output


# A short alias means one long option in every command; flags are single (--each, not --each/--no-each).
SHORT_OPTIONS = {"-c": "--concept", "-m": "--model", "-d": "--data", "-o": "--out", "-l": "--layers", "-h": "--help",
                 "-r": "--reference-image", "-i": "--intervention"}
SINGLE_FLAG_COMMANDS = {"steer", "evaluate", "score", "concepts", "models", "plan", "demo"}


@pytest.mark.parametrize("path", [p for p in ALL_PATHS if p], ids=lambda p: " ".join(("ht", *p)))
def test_one_meaning_per_short_option_and_no_flag_pairs(path):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    for param in (p for p in command.params if p.param_type_name == "option"):
        longs = [o for o in param.opts if o.startswith("--")]
        for short in (o for o in param.opts if not o.startswith("--")):
            assert SHORT_OPTIONS.get(short) in longs, f"{short} means {longs} here"
        if path[0] in SINGLE_FLAG_COMMANDS:
            assert not param.secondary_opts, f"{param.opts[0]}/{param.secondary_opts[0]}: use a single flag"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"ht {__version__}\n"


def test_version_is_written_once():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "htcli.__version__"}


PYTHON_BLOCK = re.compile(r"(<!-- (?:not run|needs ht\.(\w+))[^>]*-->\n)?^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", ["docs/python.md", "README.md"])
def test_python_examples_run(page, tmp_path, monkeypatch):
    """The pages' Python blocks run in order as one script, as a reader would paste them (blocks
    marked `<!-- not run: why -->` need what a CPU machine offline lacks, and are only compiled;
    blocks marked `<!-- needs ht.NAME -->` run when the package has `ht.NAME`)."""
    import htcli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    blocks = PYTHON_BLOCK.findall((ROOT / page).read_text())
    assert any(not marker for marker, _, _ in blocks)
    namespace: dict = {}
    for marker, needs, code in blocks:
        compiled = compile(code, page, "exec")
        if not marker or (needs and hasattr(htcli, needs)):
            exec(compiled, namespace)
