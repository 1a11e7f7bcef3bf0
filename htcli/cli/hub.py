"""`ht hub push` and `ht hub stage`: share hypernetworks, interventions and evaluation runs on the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from htcli.cli.app import app
from htcli.cli.output import console

hub_app = typer.Typer(help="Share hypernetworks, interventions and evaluation runs on the Hugging Face Hub.",
                      no_args_is_help=True)
app.add_typer(hub_app, name="hub")

SourceArgument = Annotated[Path, typer.Argument(
    help="A hypernetwork run folder (or its .safetensors), an intervention file, or an evaluation run folder.")]
RepoArgument = Annotated[str, typer.Argument(help="Hub repo id, USER/NAME (created if it does not exist).")]


@hub_app.command("push")
def push_command(
    source: SourceArgument,
    repo_id: RepoArgument,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
) -> None:
    """Upload a hypernetwork (config.json, model.safetensors, model card), an intervention (the file
    and a card) or an evaluation run (an image dataset with its card) to the Hub.

    Uses your Hugging Face login (`hf auth login`, or HF_TOKEN). `ht hub stage` writes the same
    folder locally without uploading.

    Example: ht hub push runs/pixart/hyper me/pixart-hypertransport
    """
    from htcli.publish import push

    url = push(source, repo_id, private=private)
    console.print(f"uploaded {source} to {url}", markup=False, highlight=False)


@hub_app.command("stage")
def stage_command(
    source: SourceArgument,
    out: Annotated[Path, typer.Argument(help="New (or empty) folder to write the upload into.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="The repo id the card's examples name.")] = "USER/REPO",
) -> None:
    """Write what `ht hub push` would upload, with its card, to a local folder, and list it.

    Example: ht hub stage runs/tiny/hyper hub-upload --repo-id me/tiny-hypertransport
    """
    from htcli.publish import stage

    kind, folder = stage(source, out, repo_id)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    console.print(f"{kind}: {len(files)} files in {folder}", markup=False, highlight=False)
    for path in files[:20]:
        console.print(f"  {path.relative_to(folder)}  ({path.stat().st_size:,} bytes)", markup=False, highlight=False)
    if len(files) > 20:
        console.print(f"  ... and {len(files) - 20} more", markup=False)
