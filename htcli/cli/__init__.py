"""The `ht` command line: a thin layer over the `htcli` library.

`app.py` holds the Typer app; each module here adds its commands to it when imported.
"""

from htcli.cli import baselines as _baselines  # noqa: F401  (fit-linear-baselines, inspect)
from htcli.cli import concepts as _concepts  # noqa: F401
from htcli.cli import dataset as _dataset  # noqa: F401
from htcli.cli import demo as _demo  # noqa: F401
from htcli.cli import hub as _hub  # noqa: F401  (hub push, hub stage)
from htcli.cli import hyper as _hyper  # noqa: F401  (train-hyper, hyper export)
from htcli.cli import models as _models  # noqa: F401  (models, plan)
from htcli.cli import score as _score  # noqa: F401  (evaluate, score)
from htcli.cli import serve as _serve  # noqa: F401
from htcli.cli import steer as _steer  # noqa: F401
from htcli.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
