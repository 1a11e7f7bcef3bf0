"""Options shared by several commands: one name, one meaning, one help text everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOption = Annotated[
    Optional[str], typer.Option("--model", "-m", help="Model spec id (see `ht models`). Default: $HT_MODEL or pixart.")
]
DataOption = Annotated[
    Optional[Path], typer.Option("--data", "-d", help="Dataset directory from `ht build-dataset`. Default: runs/<model>/data.")
]
HyperOption = Annotated[
    Optional[Path],
    typer.Option("--hyper", help="Hypernetwork run directory (or its .safetensors) from `ht train-hyper`. "
                 "Default: runs/<model>/hyper."),
]
ConceptDirsOption = Annotated[
    Optional[list[Path]], typer.Option("--concepts", help="Directory of your own concept YAML files, added to the bundled library; repeatable.")
]
LimitConceptsOption = Annotated[
    Optional[int], typer.Option("--limit-concepts", help="Only a seeded sample of this many concepts.")
]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1... Default: CUDA if available.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
ModelPathOption = Annotated[Optional[str], typer.Option("--model-path", help="Local pipeline directory instead of the Hub.")]
