"""The `ht` command line: a thin layer over the `htcli` library.

Each submodule registers its commands on `app`. Library errors (`HTError`) become a one-line
`Error: ...` on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from htcli.errors import HTError


class _OneLineErrors(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HTError as error:
            typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="ht",
    cls=_OneLineErrors,
    help="HyperTransport: steer text-to-image diffusion models by editing their activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

@app.callback()
def _quiet_libraries() -> None:
    """Keep diffusers' and transformers' info chatter and weight-loading bars off the terminal."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# Registration by import: each module adds its commands to `app`.
from htcli.cli import baselines as _baselines  # noqa: E402,F401  (fit-linear-baselines, inspect)
from htcli.cli import concepts as _concepts  # noqa: E402,F401
from htcli.cli import dataset as _dataset  # noqa: E402,F401
from htcli.cli import demo as _demo  # noqa: E402,F401
from htcli.cli import hyper as _hyper  # noqa: E402,F401  (train-hyper, hyper export/evaluate)
from htcli.cli import models as _models  # noqa: E402,F401  (models, plan)
from htcli.cli import score as _score  # noqa: E402,F401
from htcli.cli import steer as _steer  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()
