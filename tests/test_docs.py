"""The docs stay true to the code: the CLI reference is regenerated and compared."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    render = runpy.run_path(str(ROOT / "docs" / "gen_cli.py"))["render"]
    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python docs/gen_cli.py"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest" in readme
    assert "--model tiny" in readme
