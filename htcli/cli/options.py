"""Options shared by several commands: one name, one meaning, one help text everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Model spec id (see `ht models`). Default: $HT_MODEL or pixart.")
]
DataOption = Annotated[
    Path | None, typer.Option("--data", "-d", help="Dataset directory from `ht build-dataset`. Default: runs/<model>/data.")
]
HyperOption = Annotated[
    Path | None,
    typer.Option("--hyper", help="Hypernetwork run directory (or its .safetensors) from `ht train-hyper`. "
                 "Default: runs/<model>/hyper."),
]
ConceptDirsOption = Annotated[
    list[Path] | None, typer.Option("--concepts", help="Directory of your own concept YAML files, added to the bundled library; repeatable.")
]
LimitConceptsOption = Annotated[
    int | None, typer.Option("--limit-concepts", help="Only a seeded sample of this many concepts.")
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1... Default: CUDA if available.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
ModelPathOption = Annotated[str | None, typer.Option("--model-path", help="Local pipeline directory instead of the Hub.")]
