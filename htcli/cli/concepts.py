"""`ht concepts ...`: browse, check and split the concept library."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table

from htcli.cli.app import app
from htcli.cli.messages import current_cli_words
from htcli.cli.options import ConceptDirsOption, JsonOption
from htcli.cli.output import console, print_table
from htcli.core.files import dumps_json
from htcli.data.concept_files import DEFAULT_TEMPLATE
from htcli.data.concepts import (
    DEFAULT_SEED,
    TEST_SIZE,
    load_library,
    validate_library,
    write_split,
)
from htcli.evaluation.stats import plural

concepts_app = typer.Typer(
    help="Browse, check and split the concept library.\n\nExample: ht concepts list --split test",
    no_args_is_help=True,
)
app.add_typer(concepts_app, name="concepts")


class Split(str, Enum):
    train = "train"
    test = "test"


@concepts_app.command("list")
def list_command(
    category: Annotated[str | None, typer.Option("--category", help="Only this category.")] = None,
    split: Annotated[
        Split | None, typer.Option("--split", help="Only train or only held-out test concepts.")
    ] = None,
    concepts: ConceptDirsOption = None,
    as_json: JsonOption = False,
) -> None:
    """List concepts as a table, or as JSON for scripts.

    With no filter, all concepts are listed, the generic source concept too.

    Example: ht concepts list --category "Art Techniques" --split test
    """
    library = load_library(concepts or ())
    chosen = library.select(split.value if split else None, category)
    if as_json:
        typer.echo(dumps_json([library.record(c) for c in chosen]))
        return
    table = Table(title=plural(len(chosen), "concept"))
    for column in ("name", "category", "split", "description"):
        table.add_column(column, no_wrap=column != "description")
    for concept in chosen:
        table.add_row(
            concept.name, concept.category, library.split_of(concept.name) or "-", concept.description or ""
        )
    print_table(table)


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
        typer.echo(dumps_json({**library.record(concept), "example": concept.apply(prompt)}))
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
def validate_command(concepts: ConceptDirsOption = None) -> None:
    """Check the bundled library and directories of your own concepts.

    Checks the schema, duplicate names, template placeholders, the paper's counts and the split.

    Example: ht concepts validate --concepts ./my-concepts
    """
    problems = validate_library(concepts or ())
    for problem in problems:
        typer.secho(f"Error: {current_cli_words(problem)}", err=True, fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    summary = load_library(concepts or ()).summary()
    counts = (f"{plural(summary['concepts'], 'concept')} ({summary['targets']:,} targets + 1 source) in "
              f"{plural(len(summary['categories']), 'category', 'categories')}, "
              f"{plural(summary['prompts'], 'source prompt')}")
    split = ("no split" if summary["split_seed"] is None else
             f"split seed {summary['split_seed']}: {summary['test']:,} test, {summary['train']:,} train")
    console.print(f"OK: {counts}; {split}", highlight=False)
    table = Table()
    for column in ("category", "concepts", "test"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category, row in summary["categories"].items():
        table.add_row(category, str(row["concepts"]), str(row["test"]))
    print_table(table)


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
    console.print(f"Wrote {path}: {plural(total, 'test concept')} (seed {seed}): {counts}", highlight=False)
