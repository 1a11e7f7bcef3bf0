"""Share on the Hugging Face Hub: the folder each artifact becomes there, its card, the upload.

    hypernetwork   config.json, model.safetensors, README.md (a model card)
    intervention   its .safetensors file, README.md (a model card)
    evaluation run images/, metadata.jsonl, index.json, README.md (a dataset card: an image dataset
                   that `datasets.load_dataset("user/repo")` reads, one row per image)

`stage(source, folder)` writes that folder (what `ht hub stage` shows and tests check);
`push(source, repo_id)` stages into a temporary folder and uploads it with one
`huggingface_hub` call. Cards are written from the artifact's own metadata: the front matter
and runnable usage code of `htcli.models.hub_cards`, what it was trained on and its held-out
results, and the command that reproduces it. Loading them back is `ht.HyperTransport.from_pretrained("user/repo")`,
`ht.Intervention.load("user/repo")` and `--hyper user/repo` / `-i user/repo` on the command line.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from htcli import __version__
from htcli.core.files import read_tensors, write_json
from htcli.errors import HTError
from htcli.evaluation.runs import INDEX, METADATA, EvalRun
from htcli.methods.hypernetwork import FORMAT as HYPER_FORMAT
from htcli.methods.hypernetwork import HyperConfig, load_checkpoint
from htcli.methods.predict import CHECKPOINT_NAMES
from htcli.methods.train_config import TrainConfig
from htcli.models.hub_cards import CARD, base_line, card, check_repo_id, front_matter, intervention_card, steered_call
from htcli.models.hub_cards import upload as upload_folder
from htcli.models.interventions import FORMAT as INTERVENTION_FORMAT
from htcli.models.interventions import load_intervention

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# The settings `ht train-hyper` has an option for, named as the option is (--concepts-per-step).
ARCH_OPTIONS = ("arch", "hidden", "depth", "rank", "embedding", "prior")
TRAIN_OPTIONS = ("steps", "concepts_per_step", "samples", "limit_concepts", "val_fraction", "lr", "dtype", "micro_batch",
                 "l1", "group", "eval_every", "average", "seed")


def _kind(source: Path) -> tuple[str, Path]:
    """("hypernetwork" | "intervention" | "dataset", the file or folder to stage) of a local source."""
    if source.is_dir():
        if (source / INDEX).is_file():
            return "dataset", source
        for name in CHECKPOINT_NAMES:
            if (source / name).is_file():
                return "hypernetwork", source / name
        raise HTError(f"{source} is not something ht shares: expected a hypernetwork run folder "
                      f"({' or '.join(CHECKPOINT_NAMES)}), an evaluation run ({INDEX}), or a .safetensors file")
    if not source.is_file():
        raise HTError(f"{source}: no such file or folder")
    fmt = read_tensors(source, "safetensors file")[1].get("format")
    kinds = {HYPER_FORMAT: "hypernetwork", INTERVENTION_FORMAT: "intervention"}
    if fmt not in kinds:
        raise HTError(f"{source} is neither an ht hypernetwork nor an ht intervention file (format {fmt!r})")
    return kinds[fmt], source


def reproduce_commands(model: str, config: HyperConfig, train: dict, dataset: str | None) -> str:
    """The `ht build-dataset` and `ht train-hyper` commands behind a checkpoint: its model and
    dataset folder, and every architecture and training setting that differs from the defaults."""
    folder = shlex.quote(dataset) if dataset else None
    extra = ["--extra-concepts EXTRA.txt"] if train.get("extra_concepts") else []
    parts = ["ht train-hyper", f"--model {model}", *([f"--data {folder}"] if folder else [])]
    arch_defaults = {f.name: f.default for f in fields(HyperConfig) if f.name in ARCH_OPTIONS}
    for name, default in arch_defaults.items():
        value = getattr(config, name)
        if value != default:
            parts.append(f"--{name} {0 if name == 'rank' and value is None else value}")
    options = [f.name for f in fields(TrainConfig) if f.name in TRAIN_OPTIONS]
    defaults = asdict(TrainConfig())
    for name in options:
        if name in train and train[name] != defaults[name] and train[name] is not None:
            parts.append(f"--{name.replace('_', '-')} {train[name]}")
    build = ["ht build-dataset", f"--model {model}", *([f"--out {folder}"] if folder else []), *extra]
    lines = [" ".join(build), " ".join(parts + extra)]
    if extra:
        lines.insert(0, f"# EXTRA.txt: the {len(train['extra_concepts'])} extra training concepts listed in config.json")
    return "\n".join(lines)


def _results_table(info: dict) -> str:
    rows = [(label, info[key]) for key, label in (("train_residual", "training concepts (a sample)"),
                                                 ("val_residual", "validation concepts"),
                                                 ("test_residual", "held-out test concepts"))
            if isinstance(info.get(key), (int, float))]
    if not rows:
        return "No held-out results were recorded with this checkpoint."
    lines = ["| concepts | residual ratio W2(steered, target) / W2(source, target) |", "|---|---|"]
    return "\n".join(lines + [f"| {label} | {value:.3f} |" for label, value in rows])


def hypernetwork_folder(checkpoint: Path, folder: Path, repo_id: str = "USER/REPO") -> Path:
    """Write the Hub layout of the hypernetwork checkpoint file `checkpoint` to `folder`."""
    loaded = load_checkpoint(checkpoint)
    info, train = loaded.info, loaded.info.get("config", {})
    concepts = loaded.training_concepts
    count = len(concepts.names) if concepts is not None else info.get("train_concepts")
    config = {"format": HYPER_FORMAT, "model": loaded.model, "encoder": loaded.encoder,
              "architecture": asdict(loaded.config), "fitted_timestep": loaded.fitted_timestep,
              "training_concepts": count, "ood_threshold": concepts.threshold if concepts is not None else None,
              "modality_gap": loaded.gap is not None, "training": info, "ht_version": __version__}
    reproduce = reproduce_commands(loaded.model, loaded.config, train, info.get("dataset"))
    load = (f"hyper = ht.HyperTransport.from_pretrained({json.dumps(repo_id)})\n"
            'art_deco = hyper.intervention("art deco")  # also: nearest training concepts, out-of-distribution flag')
    body = f"""
# HyperTransport hypernetwork for `{loaded.model}`

A hypernetwork that, in one forward pass, turns a concept ("art deco") or a reference image
into per-neuron affine maps that steer {base_line(loaded.model)}. Made with
[`ht`](https://pypi.org/project/htcli/) (HyperTransport: amortized activation steering by
optimal transport). Concept encoder: `{loaded.encoder}`; {len(loaded.config.layers)} steered layers,
{loaded.config.neurons:,} neurons; trained on {count} concepts.

## Use

```python
{steered_call(loaded.model, load, "art_deco")}
```

or `ht steer "a lighthouse on a cliff" --model {loaded.model} --hyper {shlex.quote(repo_id)} --concept "art deco"`.

## Held-out results

{_results_table(info)}

## Reproduce

```bash
{reproduce}
```

The dataset's sampling options are not stored with the checkpoint; its digest,
`{info.get('dataset_digest', 'unknown')}`, says whether a rebuilt one is the same.
"""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, folder / WEIGHTS)
    write_json(folder / CONFIG, config)
    (folder / CARD).write_text(card(front_matter(loaded.model), body))
    return folder


def intervention_folder(path: Path, folder: Path, repo_id: str = "USER/REPO") -> Path:
    """Write the Hub layout of an intervention file (the file, and its card) to `folder`."""
    loaded = load_intervention(path)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, folder / path.name)
    (folder / CARD).write_text(intervention_card(loaded, path.name, repo_id))
    return folder


def dataset_folder(run: Path, folder: Path, repo_id: str = "USER/REPO") -> Path:
    """Write an evaluation run as a Hub image dataset: its images, `metadata.jsonl` (one row per
    image: file, prompt, concept, method, strength, seed...), `index.json` and a dataset card."""
    opened = EvalRun.open(run)
    records, model = opened.records, opened.model
    if not records or not (run / METADATA).is_file():
        raise HTError(f"{run} has no images yet: run `ht evaluate` to fill it")
    methods = sorted({r["method"] for r in records})
    concepts = sorted({r["concept"] for r in records})
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": ["images/**/*.png", METADATA]}]}]
    front = front_matter(model, dataset=True, task_categories=["text-to-image"], configs=configs)
    body = f"""
# ht evaluation run: `{model}`

{len(records)} images of {base_line(model)}, from an `ht evaluate` run: {len(concepts)} concepts x
source prompts x seeds, generated with every method ({', '.join(methods)}) from the same seeds, so
that every number of a result table can be checked image by image.

```python
from datasets import load_dataset
from huggingface_hub import snapshot_download

run = snapshot_download({json.dumps(repo_id)}, repo_type="dataset")   # the repo, through the Hub cache
images = load_dataset(run, split="train")   # image, prompt, text, concept, method, strength, seed...
```

Score it again with `ht score --run DIR` on that folder (or `hf download {shlex.quote(repo_id)} --repo-type dataset --local-dir DIR`).
"""
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:  # the images the index lists, nothing else the folder may hold
        target = folder / record["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / record["file"], target)
    for name in (INDEX, METADATA):
        shutil.copyfile(run / name, folder / name)
    (folder / CARD).write_text(card(front, body, dataset=True))
    return folder


STAGERS = {"hypernetwork": hypernetwork_folder, "intervention": intervention_folder, "dataset": dataset_folder}


def stage(source: str | Path, folder: str | Path, repo_id: str = "USER/REPO") -> tuple[str, Path]:
    """Write what `push` would upload for `source` (a hypernetwork run folder or checkpoint, an
    intervention file, an evaluation run folder) to `folder`, which must be new or empty: (kind, folder)."""
    check_repo_id(repo_id)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise HTError(f"{folder} exists and is not an empty folder; give a new one")
    kind, path = _kind(Path(source))
    return kind, STAGERS[kind](path, folder, repo_id)


def push(source: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Stage `source` and upload it to the Hub repo `repo_id` (a model repo, or a dataset repo for an
    evaluation run), creating the repo if need be; returns the repo's URL."""
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="ht-hub-") as temporary:
        kind, folder = stage(source, Path(temporary) / "upload", repo_id)
        return upload_folder(folder, repo_id, kind, private=private, token=token)
