"""Evaluation runs: concepts x source prompts x seeds, generated with every method, same seeds.

A run is a folder:

    index.json                                     format, model, methods, one record per image
    metadata.jsonl                                 the same records for `datasets` (imagefolder)
    images/<concept-slug>/<method>/<prompt-hash>-<seed>[-s<strength>].png   (a video model's: .webp)

Methods: `none` is the unsteered image (strength 0), made once per concept, prompt and seed
whatever else is asked: it is the reference of the preservation score and the start of every
strength curve. `prompt` applies the concept's template to the prompt and hooks nothing.
`hypertransport` steers with the maps a hypernetwork checkpoint predicts from the concept's
phrase. Every baseline folder from `ht fit-linear-baselines` (its `summary.json` and one
`<slug>.safetensors` per concept) is one more method, named after the folder. A record stores the concept, its phrase,
the method, the source prompt and the text sent to the model, the seed, the strength (null
for `prompt`), the PNG's path and a digest of the weights used.

Images are written first, then the index is rewritten atomically after every batch, so an
interrupted run loses at most one batch; rerunning on the same folder generates only what the
index lacks. `runs/<model>/eval/latest.json` points at the most recent run of a model.

Beside the index, `metadata.jsonl` lists the same records in the Hugging Face `imagefolder`
layout (`file_name` relative to the run, then prompt, text, concept, category, method,
strength, seed, weights), so `datasets.load_dataset("imagefolder", data_dir=RUN)` reads a run.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htcli import __version__
from htcli.core.files import (
    atomic_path,
    file_digest,
    finite,
    load_rgb_images,
    read_json,
    write_json,
)
from htcli.core.runtime import Progress, run_path
from htcli.data.concepts import Concept, ConceptLibrary
from htcli.errors import HTError
from htcli.methods.predict import Predictor
from htcli.models import denoiser

FORMAT = "ht-eval/1"
INDEX = "index.json"
METADATA = "metadata.jsonl"  # the Hugging Face `imagefolder` layout: one line per image
METADATA_COLUMNS = ("prompt", "text", "concept", "category", "method", "strength", "seed", "weights")
LATEST = "latest.json"
# build-dataset draws seeds from seed * 1e6 + [0, 500_000 + eval samples): keep evaluation images off them.
SEED_OFFSET = 900_000


@dataclass
class Method:
    """One way of producing an image for a concept, and the weights it uses."""

    name: str
    kind: str  # none | prompt | hypertransport | baseline
    source: Path | None = None  # checkpoint file, or the baseline's folder
    predictor: Predictor | None = None  # for hypertransport
    _digests: dict = field(default_factory=dict, repr=False)

    @property
    def steers(self) -> bool:
        return self.kind in ("hypertransport", "baseline")

    def file(self, concept: Concept) -> Path:
        return self.source / f"{concept.slug}.safetensors"

    def weights(self, concept: Concept) -> str | None:
        """Digest of the weights behind this concept's images (None when nothing is hooked)."""
        if not self.steers:
            return None
        if self.kind == "hypertransport":
            return self.predictor.digest
        path = self.file(concept)
        if path not in self._digests:
            if not path.is_file():
                raise HTError(f"{self.name}: no intervention file {path} for {concept.name!r}; fit it with "
                              f"`ht fit-linear-baselines` (method={self.name!r}, concept={concept.name!r})")
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def maps(self, concept: Concept, model: str, modules: dict[str, Any]) -> dict:
        """The concept's maps, checked against the model (its id, layer names and widths)."""
        from htcli.core.hooks import module_width
        from htcli.models.interventions import Intervention, load_intervention

        if self.kind == "hypertransport":
            predicted = self.predictor.maps([concept])[0]
            found = Intervention(predicted, self.predictor.model, "hypertransport", concept.name)
        else:
            found = load_intervention(self.file(concept))
        widths = {name: module_width(modules[name]) for name in found.maps if name in modules}
        found.check(model, widths, where=str(self.source if self.kind == "hypertransport" else self.file(concept)))
        return found.maps


def find_baselines(folders: Sequence[Path]) -> dict[str, Path]:
    """Baseline method name -> folder of intervention files. A folder is one method's (it holds
    the summary.json of `ht fit-linear-baselines`) or a baselines root whose subfolders are
    methods (runs/<model>/baselines): the rule of `baseline_folders`, shared with `ht score`."""
    from htcli.evaluation.residuals import baseline_folders

    found: dict[str, Path] = {}
    for method in baseline_folders(folders):
        if method.name in found or method.name in ("none", "prompt", "hypertransport"):
            raise HTError(f"two baseline folders are named {method.name!r} (or it clashes with a built-in method)")
        found[method.name] = method
    return found


def select_prompts(library: ConceptLibrary, count: int, seed: int = 0) -> list[str]:
    """`count` source prompts from the end of the seeded shuffle whose start build-dataset fits
    on (same --seed), so evaluation prompts avoid the fitting prompts."""
    prompts = list(library.source_prompts())
    if not 1 <= count <= len(prompts):
        raise HTError(f"prompts= must be between 1 and the library's {len(prompts)} source prompts, got {count}")
    random.Random(seed).shuffle(prompts)
    return prompts[::-1][:count]


def eval_seeds(seed: int, count: int) -> list[int]:
    if count < 1:
        raise HTError(f"seeds= must be positive, got {count}")
    return [seed * 1_000_000 + SEED_OFFSET + k for k in range(count)]


# --- the run folder ----------------------------------------------------------------------


def record_key(record: dict) -> tuple:
    return record["concept"], record["method"], record["prompt"], record["seed"], record["strength"]


class EvalRun:
    """An evaluation run folder and its index."""

    def __init__(self, root: Path, data: dict) -> None:
        self.root, self.data = Path(root), data

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    @property
    def model(self) -> str:
        return self.data["model"]

    @classmethod
    def open(cls, root: Path) -> EvalRun:
        root = Path(root)
        if not (root / INDEX).is_file():
            raise HTError(f"{root} is not an evaluation run (no {INDEX}); make one with `ht evaluate`")
        data = read_json(root / INDEX)
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise HTError(f"{root / INDEX}: not an ht evaluation index (format {found!r}, expected {FORMAT!r})")
        return cls(root, data)

    @classmethod
    def open_or_create(cls, root: Path, model: str) -> EvalRun:
        root = Path(root)
        if (root / INDEX).exists():
            run = cls.open(root)
            if run.model != model:
                raise HTError(f"{root} is an evaluation run of model {run.model!r}, not {model!r}; choose another out=")
            return run
        if root.exists() and any(root.iterdir()):
            raise HTError(f"{root} exists and is not an evaluation run; choose an empty or new out=")
        return cls(root, {"format": FORMAT, "model": model, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                          "ht_version": __version__, "methods": {}, "records": []})

    def save(self) -> None:
        """index.json, then metadata.jsonl from the same records (both atomic)."""
        write_json(self.root / INDEX, self.data)
        lines = [json.dumps(finite({"file_name": r["file"]} | {k: r.get(k) for k in METADATA_COLUMNS}),
                            ensure_ascii=False, allow_nan=False)
                 for r in self.records]
        with atomic_path(self.root / METADATA) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def load_images(root: Path, files: Iterable[str]) -> list:
    """The run's images `files` (paths relative to `root`) as RGB PIL images."""
    try:
        return load_rgb_images([root / name for name in files], "evaluation-run image")
    except HTError as error:
        raise HTError(f"{error}; rerun `ht evaluate` on the run to regenerate it") from None


def default_out(model: str) -> Path:
    """runs/<model>/eval/<timestamp>, never an existing folder."""
    base = run_path(model, "eval") / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 2
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


def mark_latest(model: str, root: Path) -> None:
    write_json(run_path(model, "eval") / LATEST, {"run": str(Path(root).resolve())})


def latest_run(model: str) -> Path:
    """The most recent evaluation run of `model`, from runs/<model>/eval/latest.json."""
    pointer = run_path(model, "eval") / LATEST
    if not pointer.is_file():
        raise HTError(f"no evaluation run of model {model!r} under {pointer.parent}; make one with "
                      f"`ht evaluate` (model={model!r}) or pass run=DIR")
    root = Path(read_json(pointer).get("run", ""))
    if not (root / INDEX).is_file():
        raise HTError(f"the latest evaluation run of {model!r} ({root}) is gone; run `ht evaluate` (model={model!r}) or pass run=")
    return root


# --- generation --------------------------------------------------------------------------


@dataclass
class Batch:
    """Images of one concept, prompt, method and strength that the index still lacks."""

    concept: Concept
    prompt_index: int
    prompt: str
    method: Method
    strength: float | None
    seeds: list[int]


def _strengths(method: Method, strengths: Sequence[float]) -> list[float | None]:
    if method.kind == "none":
        return [0.0]
    if method.kind == "prompt":
        return [None]
    return [s for s in dict.fromkeys(float(s) for s in strengths) if s != 0]  # 0 is `none`'s image


def _file(concept: Concept, method: str, prompt: str, seed: int, strength: float | None, suffix: str = ".png") -> str:
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    tag = "" if strength is None else f"-s{strength:g}"
    return f"images/{concept.slug}/{method}/{digest}-{seed}{tag}{suffix}"


def plan_batches(run: EvalRun, concepts: Sequence[Concept], prompts: Sequence[str], seeds: Sequence[int],
                 strengths: Sequence[float], methods: Sequence[Method]) -> list[Batch]:
    """What is missing from the run; refuses to mix images of different weights in one run."""
    done = {record_key(r) for r in run.records}
    used: dict[tuple[str, str], set] = {}
    for r in run.records:
        used.setdefault((r["concept"], r["method"]), set()).add(r.get("weights"))
    batches = []
    for concept in concepts:
        for method in methods:
            weights = method.weights(concept)
            if used.get((concept.name, method.name), {weights}) != {weights}:
                raise HTError(f"{run.root} holds {method.name!r} images of {concept.name!r} made with other weights "
                              f"than {weights}; evaluate into a new out=")
            for index, prompt in enumerate(prompts):
                for strength in _strengths(method, strengths):
                    todo = [s for s in seeds if (concept.name, method.name, prompt, s, strength) not in done]
                    if todo:
                        batches.append(Batch(concept, index, prompt, method, strength, todo))
    return batches


def run_evaluation(spec, run: EvalRun, concepts: Sequence[Concept], prompts: Sequence[str], seeds: Sequence[int],
                   strengths: Sequence[float], methods: Sequence[Method], load_pipe: Callable[[], Any],
                   progress: Progress | None = None) -> dict:
    """Generate every missing image of the run; returns counts. `load_pipe` is called only if
    there is something to generate."""
    from htcli.generate.steer import generate
    from htcli.generate.video import media_suffix, save_media

    if not any(m.kind == "none" for m in methods):
        methods = [Method("none", "none"), *methods]  # preservation's reference, always made
    slugs = [c.slug for c in concepts]
    if len(set(slugs)) != len(slugs):
        raise HTError("two concepts map to the same file name; evaluate them in separate runs")
    batches = plan_batches(run, concepts, prompts, seeds, strengths, methods)
    for method in methods:
        run.data["methods"][method.name] = {"kind": method.kind, "source": str(method.source) if method.source else None}
    run.save()  # a run with nothing generated yet is still a run (and `latest`)
    mark_latest(run.model, run.root)
    total, done = sum(len(b.seeds) for b in batches), 0
    if progress:
        progress(0, total, "loading the pipeline" if batches else "nothing to generate")
    pipe = load_pipe() if batches else None
    modules = dict(denoiser(pipe, spec).named_modules()) if pipe is not None else {}
    maps_cache: dict[tuple[str, str], dict] = {}
    for batch in batches:
        concept, method = batch.concept, batch.method
        maps = None
        if method.steers:
            key = (concept.name, method.name)
            if key not in maps_cache:
                maps_cache = {key: method.maps(concept, spec.id, modules)}  # one concept's maps at a time: batches come grouped
            maps = maps_cache[key]
        text = concept.apply(batch.prompt, batch.prompt_index) if method.kind == "prompt" else batch.prompt
        images = generate(spec, pipe, text, maps, [batch.strength], batch.seeds)
        for generated in images:
            record = {
                "concept": concept.name, "category": concept.category, "phrase": concept.phrase, "method": method.name,
                "prompt": batch.prompt, "text": text, "seed": generated.seed, "strength": batch.strength,
                "file": _file(concept, method.name, batch.prompt, generated.seed, batch.strength,
                              media_suffix(generated.image)),
                "weights": method.weights(concept),
            }
            path = run.root / record["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            save_media(generated.image, path)
            run.records.append(record)
        run.save()  # after the images it lists: the index never names a missing file
        done += len(batch.seeds)
        if progress:
            progress(done, total, f"{concept.name} / {method.name}")
    return {"run": str(run.root), "generated": total, "images": len(run.records), "concepts": len(concepts),
            "methods": [m.name for m in methods]}
