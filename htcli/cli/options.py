"""Options shared by several commands: one name, one meaning, one help text everywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from htcli.models.spec import RANDOM_WEIGHTS_VARIABLE, model_id

def _model_id(name: str | None) -> str | None:
    """--model as the id its spec is stored under: a pipeline folder's absolute path and sorted settings."""
    return model_id(name)


ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", callback=_model_id,
                             help="Model spec id (see `ht models`), or a diffusers pipeline folder or Hub repo id, "
                                  "optionally with settings: PATH?steps=4&guidance=1.5&resolution=512. "
                                  "Default: $HT_MODEL or pixart.")
]
DataOption = Annotated[
    Path | None, typer.Option("--data", "-d", help="Dataset directory from `ht build-dataset`. Default: runs/<model>/data.")
]
HyperOption = Annotated[
    Path | None,
    typer.Option("--hyper", help="Hypernetwork run directory (or its .safetensors) from `ht train-hyper`, or a Hub "
                 "repo USER/REPO. Default: runs/<model>/hyper."),
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
StepsOption = Annotated[
    int | None, typer.Option("--steps", help="Denoising steps of a pipeline folder's model (adds steps=N to its id). "
                                "Default: the pipeline's.")
]
GuidanceOption = Annotated[
    float | None, typer.Option("--guidance", help="Guidance scale of a pipeline folder's model (adds guidance=G to "
                                  "its id). Default: the pipeline's.")
]
ResolutionOption = Annotated[
    int | None, typer.Option("--resolution", help="Image size in pixels, a multiple of 64. Default: the model's.")
]

RANDOM_WEIGHTS_NOTE = ("random weights (--random-weights): the model's real architecture at full width with seeded "
                       "random weights, no download; its images are noise and its quality numbers mean nothing "
                       "(memory, speed and the code paths are real)")


def _use_random_weights(value: bool) -> bool:
    """Set $HT_RANDOM_WEIGHTS for this process and those it starts (torchrun's, `ht plan
    --measure`'s), where `htcli.models.get_model` reads it; say so on stderr."""
    if value:
        from htcli.cli.output import note

        os.environ[RANDOM_WEIGHTS_VARIABLE] = "1"
        note(RANDOM_WEIGHTS_NOTE)
    return value


RandomWeightsOption = Annotated[
    bool,
    typer.Option("--random-weights", envvar=RANDOM_WEIGHTS_VARIABLE, callback=_use_random_weights,
                 help="The model's real architecture at full width with seeded random weights: no download, real "
                 "memory, speed and code paths, meaningless images. Datasets and hypernetworks made so are refused "
                 "without it, and real ones with it. Env: HT_RANDOM_WEIGHTS=1."),
]

# --- Options shared by the dataset, baselines, training and plan commands (defaults from the
# library's dataclasses, so a number lives in one place). -----------------------------------

from enum import Enum  # noqa: E402

from htcli.data.build import DatasetRequest  # noqa: E402
from htcli.methods.train_config import TrainConfig  # noqa: E402

BUILD_SAMPLES = DatasetRequest.samples  # build-dataset's (and `ht plan`'s) fitting samples per concept
BUILD_EVAL_SAMPLES = DatasetRequest.eval_samples
CONCEPTS_PER_STEP = TrainConfig.concepts_per_step  # train-hyper's K, also what `ht plan` sizes memory for


class DatasetSplit(str, Enum):
    train = "train"
    test = "test"
    all = "all"


SplitOption = Annotated[
    DatasetSplit, typer.Option("--split", help="Concepts when no --concept: train, test (held out) or all.")
]
SamplesOption = Annotated[
    int | None, typer.Option("--samples", help="Fitting samples per concept (N). Default: all the dataset has.")
]
BuildSamplesOption = Annotated[int, typer.Option("--samples", help="Fitting samples per concept (N).")]
EvalSamplesOption = Annotated[
    int, typer.Option("--eval-samples", help="Evaluation samples per concept (other prompts and seeds).")
]
LayersOption = Annotated[
    list[str] | None,
    typer.Option("--layers", "-l", help="Module-name pattern to hook (glob, or regex as 're:...'); repeatable. "
                 "Default: the spec's."),
]


RefineOption = Annotated[
    int | None,
    typer.Option("--refine", help="N LinEAS steps warm-started from the hypernetwork's prediction, on the concept's "
                 "fitting samples: from --data (default runs/<model>/data) where the concept is built, else captured "
                 "on the fly and cached in runs/<model>/refine-cache. Seconds for per-concept quality (method "
                 "lineas-refine<N>)."),
]
ExtraConceptsOption = Annotated[
    Path | None,
    typer.Option("--extra-concepts", help="Text file of your own training concepts, one per line (free text or "
                 "library names); held-out test concepts are refused, however spelt."),
]


class TrainingDtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float32 = "float32"


DtypeOption = Annotated[
    TrainingDtype,
    typer.Option("--dtype", help="What the frozen denoiser computes in while gradients flow through it: auto = bfloat16 "
                 "on CUDA, float32 on CPU (never float16: its gradients underflow). Maps and loss stay float32."),
]
MicroBatchOption = Annotated[
    int | None,
    typer.Option("--micro-batch", help="Samples per backward pass (exact two-pass W2 gradient; memory ~ this). "
                 "0: all at once. Default: what fits in free memory."),
]
GradCheckpointingOption = Annotated[
    bool, typer.Option("--grad-checkpointing", help="Recompute the denoiser's blocks in backward: ~5% of the activation memory, ~1.5x the time.")
]
