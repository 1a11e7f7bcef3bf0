"""`ht concepts ...`: browse, check and split the concept library."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from htcli.cli import app
from htcli.cli.options import ConceptDirsOption, JsonOption
from htcli.data.concepts import (
    DEFAULT_SEED,
    DEFAULT_TEMPLATE,
    TEST_SIZE,
    Concept,
    ConceptLibrary,
    load_library,
    validate_library,
    write_split,
)

console = Console()
concepts_app = typer.Typer(
    help="Browse, check and split the concept library.\n\nExample: ht concepts list --split test",
    no_args_is_help=True,
)
app.add_typer(concepts_app, name="concepts")


class Split(str, Enum):
    train = "train"
    test = "test"




def _row(concept: Concept, library: ConceptLibrary) -> dict:
    return {
        "name": concept.name,
        "category": concept.category,
        "split": library.split_of(concept.name) if concept.in_library else None,
        "aliases": list(concept.aliases),
        "description": concept.description,
        "templates": list(concept.templates),
        "slug": concept.slug,
        "file": str(concept.source_file) if concept.source_file else None,
    }


@concepts_app.command("list")
def list_command(
    category: Annotated[Optional[str], typer.Option("--category", "-c", help="Only this category.")] = None,
    split: Annotated[
        Optional[Split], typer.Option("--split", help="Only train or only held-out test concepts.")
    ] = None,
    concepts: ConceptDirsOption = None,
    as_json: JsonOption = False,
) -> None:
    """List concepts as a table, or as JSON for scripts.

    With no filter, all concepts are listed, the generic source concept too.

    Example: ht concepts list --category "Art Techniques" --split test
    """
    library = load_library(concepts or ())
    if category is None and split is None:
        chosen = list(library.concepts)
    else:
        chosen = library.targets(split.value if split else None, category)
    if as_json:
        typer.echo(json.dumps([_row(c, library) for c in chosen], indent=2, ensure_ascii=False))
        return
    table = Table(title=f"{len(chosen)} concepts")
    for column in ("name", "category", "split", "description"):
        table.add_column(column, no_wrap=column != "description")
    for concept in chosen:
        table.add_row(
            concept.name, concept.category, library.split_of(concept.name) or "-", concept.description or ""
        )
    console.print(table)


@concepts_app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="A library concept (name or alias), or any free text.")],
    concepts: ConceptDirsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one concept, or how free text outside the library is used.

    Example: ht concepts show watercolor
    """
    library = load_library(concepts or ())
    concept = library.resolve(name)
    prompt = library.prompts[0] if library.prompts else "a cat sitting on a chair"
    if as_json:
        row = {**_row(concept, library), "example": concept.apply(prompt)}
        typer.echo(json.dumps(row, indent=2, ensure_ascii=False))
        return
    console.print(f"[bold]{concept.name}[/bold]", highlight=False)
    if not concept.in_library:
        close = library.close_matches(name)
        hint = f" (close library concepts: {', '.join(close)})" if close else ""
        console.print(
            f"outside the library: used as a free-text concept with the default template{hint}",
            highlight=False,
        )
        console.print(f"template:    {DEFAULT_TEMPLATE}", highlight=False, markup=False)
    else:
        fields = {
            "category": concept.category,
            "split": library.split_of(concept.name) or "- (generic source concept)",
            "aliases": ", ".join(concept.aliases) or "-",
            "description": concept.description or "-",
            "file": str(concept.source_file),
            "slug": concept.slug,
        }
        for key, value in fields.items():
            console.print(f"{key + ':':<12} {value}", highlight=False, markup=False)
        for i, template in enumerate(concept.templates):
            console.print(f"{'template:' if i == 0 else '':<12} {template}", highlight=False, markup=False)
    console.print(f"example:     {concept.apply(prompt)}", highlight=False, markup=False)


@concepts_app.command("validate")
def validate_command(
    directory: Annotated[
        Optional[Path],
        typer.Argument(help="Your own concept directory, checked on top of the bundled library."),
    ] = None,
) -> None:
    """Check the library and a directory of your own concepts.

    Checks the schema, duplicate names, template placeholders, the paper's counts and the split.

    Example: ht concepts validate ./my-concepts
    """
    extra = [directory] if directory is not None else []
    problems = validate_library(extra)
    for problem in problems:
        typer.secho(f"Error: {problem}", err=True, fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    library = load_library(extra)
    targets = library.targets()
    test = len(library.targets("test")) if library.split_seed is not None else 0
    n_categories = len(library.categories())
    summary = f"{len(library)} concepts ({len(targets)} targets + 1 source) in {n_categories} categories"
    split = f"split seed {library.split_seed}: {test} test, {len(targets) - test} train"
    console.print(f"OK: {summary}, {len(library.prompts)} source prompts; {split}", highlight=False)
    table = Table()
    for column in ("category", "concepts", "test"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category in library.categories():
        members = library.targets(category=category)
        held_out = sum(library.split_of(c.name) == "test" for c in members)
        table.add_row(category, str(len(members)), str(held_out))
    console.print(table)


@concepts_app.command("split")
def split_command(
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the split.")] = DEFAULT_SEED,
    test_size: Annotated[
        int, typer.Option("--test-size", help="Number of held-out test concepts.")
    ] = TEST_SIZE,
) -> None:
    """Regenerate the held-out test split (split.yaml).

    The same seed and test size always give the same file.

    Example: ht concepts split --seed 0 --test-size 167
    """
    path, test = write_split(seed, test_size)
    counts = ", ".join(f"{category} {len(names)}" for category, names in test.items())
    total = sum(map(len, test.values()))
    console.print(f"Wrote {path}: {total} test concepts (seed {seed}): {counts}", highlight=False)
