"""`--refine N`: LinEAS warm-started from HyperTransport's prediction, one concept at a time.

HyperTransport predicts a concept's maps in one forward pass; LinEAS fits them per concept
from the identity in about a thousand steps. Starting LinEAS at the prediction spends N steps
(seconds) to close part of the gap, on the concept's fitting samples; the result is an
ordinary set of maps.

    maps, info = refine_maps(predictor, frozen, load_library().resolve("art deco"), dataset, steps=50)

Refining needs the concept's target activations on the fitting samples. A concept built into the
dataset has them; for any other text `Refiner` captures them on the fly, on the dataset's fitting
samples (or the default ones without a dataset) and keeps them per concept
(`htcli.data.capture`), so `ht steer --refine` and `ht serve` refine any concept text.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from htcli.core.runtime import run_path
from htcli.core.transport import Maps
from htcli.data.capture import CapturedTargets, default_settings
from htcli.data.concepts import Concept, ConceptLibrary, load_library
from htcli.data.dataset import ActivationDataset, open_dataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.methods.baselines import LineasConfig, fit_method
from htcli.methods.objective import residuals
from htcli.methods.predict import Predictor, resolve_checkpoint
from htcli.models import ModelSpec, default_model_name, get_model
from htcli.models.call import DenoiserCall
from htcli.models.interventions import Intervention, check_intervention_out
from htcli.models.record import CallRecorder
from htcli.models.spec import local_model_path


def refined_method(steps: int) -> str:
    """The method name of refined maps, in intervention files and baseline folders."""
    return f"lineas-refine{steps}"


def check_refine_steps(steps: int) -> None:
    if steps < 1:
        raise HTError(f"--refine takes a number of LinEAS steps, at least 1, got {steps}")


def check_refine(steps: int, dataset: ActivationDataset, names: Sequence[str]) -> None:
    """Refuse what cannot be refined, before anything loads: N < 1, or a concept the dataset
    has no target activations for."""
    check_refine_steps(steps)
    built = set(dataset.names())
    for name in names:
        if name not in built:
            raise HTError(f"--refine fits on the concept's dataset samples, and {name!r} is not built in "
                          f"{dataset.root}; add it with `ht build-dataset --concept {name!r}` on that dataset first")


def check_refine_layers(hyper_layers: Sequence[str], dataset: ActivationDataset) -> None:
    """Refining the hypernetwork's maps of every layer it predicts needs the dataset's samples
    of exactly those layers: a dataset hooked at other layers is refused, before anything loads."""
    missing = [name for name in hyper_layers if name not in dataset.layers]
    extra = [name for name in dataset.settings.layers if name not in hyper_layers]
    if missing or extra:
        differ = [f"lacks {len(missing)} of its {len(hyper_layers)} layers (e.g. {missing[0]})"] if missing else []
        differ += [f"has {len(extra)} layers it does not predict (e.g. {extra[0]})"] if extra else []
        raise HTError(f"--refine fits the hypernetwork's layers on the dataset's samples, and {dataset.root} "
                      f"{' and '.join(differ)}; refine on a dataset built with the hypernetwork's layers "
                      "(the one it was trained on)")


def refine_maps(
    predictor: Predictor,
    frozen: Frozen,
    concept: Concept,
    dataset: ActivationDataset,
    steps: int,
    *,
    lineas: LineasConfig | None = None,
    samples: int | None = None,
    evaluate: bool = True,
) -> tuple[Maps, dict]:
    """HyperTransport's maps for `concept`, then `steps` LinEAS steps from them on the concept's
    fitting samples (`samples` of them; None: all). `lineas` gives the other LinEAS settings
    (learning rate, optimizer, sparsity); its step count is replaced by `steps`.

    info: refine (the steps), seconds (prediction and fit), the checkpoint digest, LinEAS's
    settings and first and last loss (the first is the prediction's), and with `evaluate` the
    residual ratio on the evaluation samples before and after (two forward passes, no graph).
    """
    check_refine(steps, dataset, [concept.name])
    n = dataset.fitting_samples(samples)
    predicted = predictor.maps([concept])[0]
    predict_seconds = predictor.last_ms / 1e3
    inputs = dataset.source_inputs("fit")[:n]
    target = {k: v[0, :n] for k, v in dataset.targets([concept.name], "fit").items()}  # (N, D) per layer
    config = replace(lineas or LineasConfig(), steps=steps)
    maps, fit_seconds, fitted = fit_method("lineas", frozen, inputs, {}, target, config, init=predicted)
    info = {"refine": steps, "samples": n, "seconds": predict_seconds + fit_seconds,
            "checkpoint_sha256": predictor.digest, **fitted}
    if evaluate:
        eval_inputs, source_eval = dataset.source_inputs("eval"), dataset.source_activations("eval")
        target_eval = {k: v[0] for k, v in dataset.targets([concept.name], "eval").items()}  # (M, D) per layer
        info["residual_before"] = residuals(frozen, eval_inputs, source_eval, target_eval, predicted)[0]
        info["residual_after"] = residuals(frozen, eval_inputs, source_eval, target_eval, maps)[0]
    return maps, info


def refine_dataset(data: Path | None, model: str) -> ActivationDataset | None:
    """The dataset `--refine` reads first: `data`, else runs/<model>/data when it exists, else None
    (every concept is then captured on the default fitting samples). Opened before anything
    loads, so a bad `--data` is the first error."""
    if data is None and not (run_path(model, "data") / "manifest.json").is_file():
        return None
    return open_dataset(data, model)


class Refiner:
    """What `--refine` needs beside the hypernetwork, made on first use and kept between requests:
    the frozen denoiser LinEAS fits through, and targets captured for concepts no dataset has.

    `pipe` gives the pipeline whose prompt encoding the captures use; `lock` serialises that use
    with anything else running the pipeline (`ht serve`'s generation thread takes it too)."""

    def __init__(self, spec: ModelSpec, pipe: Callable[[], Any], library: Callable[[], ConceptLibrary],
                 device: str | None = None, model_path: str | None = None) -> None:
        self.spec, self._pipe, self._library, self.device, self.model_path = spec, pipe, library, device, model_path
        self.lock = threading.RLock()
        self.max_cached: int | None = None  # concepts whose captured targets stay on disk (None: all)
        self._frozen: Frozen | None = None
        self._recorder: CallRecorder | None = None
        self._captured: dict[str, CapturedTargets] = {}

    def frozen(self, layers: Sequence[str]) -> Frozen:
        """The denoiser alone, in the training dtype, hooked at `layers` (its own copy: the
        pipeline's may compute in float16, whose gradients underflow)."""
        if self._frozen is None or list(self._frozen.layers) != list(layers):
            self._frozen = Frozen.load(self.spec, layers, self.device, model_path=self.model_path)
        return self._frozen

    def _encode(self, prompts: Sequence[str], seeds: Sequence[int]) -> DenoiserCall:
        """The pipeline's call of its denoiser for `prompts` under `seeds`, recorded."""
        with self.lock:
            pipe = self._pipe()
            if self._recorder is None or self._recorder.pipe is not pipe:
                self._recorder = CallRecorder(pipe, self.spec)
            return self._recorder.record(prompts, seeds)

    def captured(self, dataset: ActivationDataset | None, predictor: Predictor) -> CapturedTargets:
        """Captured targets on `dataset`'s fitting samples (its prompts, seeds and layers), or on the
        default ones at the hypernetwork's layers without a dataset."""
        if dataset is not None:
            settings, source = dataset.settings, dataset.source_inputs("fit")
        else:
            checkpoint = predictor.checkpoint
            settings = default_settings(self.spec.id, checkpoint.config.layers, checkpoint.encoder, self._library(),
                                        self.spec.dataset_dtype, self.spec.random_weights, self.spec.resolution_asked)
            source = None
        key = settings.digest()
        local = local_model_path(self.model_path)
        if local:  # other weights than the spec's: their own targets
            key += "-" + hashlib.sha256(str(Path(local).resolve()).encode()).hexdigest()[:8]
        if key not in self._captured:
            self._captured[key] = CapturedTargets(settings, self._encode,
                                                  lambda inputs: self.frozen(settings.layers).pooled(inputs),
                                                  root=run_path(self.spec.id, "refine-cache") / key, source=source,
                                                  max_concepts=self.max_cached)
        return self._captured[key]

    def fit_sources(self, concepts: Sequence[Concept], dataset: ActivationDataset | None,
                    predictor: Predictor) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Per concept name, what refining fits it on: `dataset` where the concept is built there,
        else its targets captured now (or read from the cache); and the layers they cover. A dataset
        hooked at other layers than the hypernetwork's is refused first (`check_refine_layers`)."""
        if dataset is not None:
            check_refine_layers([name for name, _ in predictor.checkpoint.config.layers], dataset)
        built = set(dataset.names()) if dataset is not None else set()
        sources: dict[str, Any] = {c.name: dataset for c in concepts if c.name in built}
        missing = [c for c in concepts if c.name not in built]
        if missing:
            captured = self.captured(dataset, predictor)
            captured.ensure(missing)
            sources |= {c.name: captured for c in missing}
        layers = (dataset if dataset is not None else self.captured(dataset, predictor)).settings.layers
        return sources, layers


def export_intervention(concept: str, out: Path, hyper: Path | None = None, model: str | None = None,
                        refine: int | None = None, data: Path | None = None,
                        model_path: str | None = None) -> Intervention:
    """Write the maps the hypernetwork predicts for `concept` (a library name or free text) as a
    standard intervention file at `out`, and return it. `out` must be a new `.safetensors` path
    or an intervention file (replaced); anything else there is refused before anything loads.
    `refine` N: then N LinEAS steps from the prediction, saved as `lineas-refine<N>`, on the
    concept's fitting samples: a dataset's (`refine_dataset`) with the residual before and after
    on its evaluation samples when the concept is built there, else captured on the fly; through
    the denoiser of `model_path` (a local pipeline directory, as generation loads it)."""
    out = check_intervention_out(Path(out))
    library = load_library()
    resolved = library.resolve(concept)
    if refine is None and data is not None:
        raise HTError("--data is only used with --refine (LinEAS from the prediction, on the dataset's samples)")
    dataset = None
    if refine is not None:
        check_refine_steps(refine)
        if data is not None:  # a bad --data is refused before anything loads
            dataset = open_dataset(data, model)
            model = model or dataset.settings.model
    predictor = Predictor.load(resolve_checkpoint(hyper, model or default_model_name()), model)
    if refine is not None and dataset is None:
        dataset = refine_dataset(None, predictor.model)
    if refine is None:
        maps, method, refined = predictor.maps([resolved])[0], "hypertransport", {}
    else:
        from htcli.models import load_pipeline

        spec = dataset.spec() if dataset is not None else get_model(predictor.model)
        refiner = Refiner(spec, lambda: load_pipeline(spec, model_path=model_path), lambda: library,
                          model_path=model_path)  # the pipeline is loaded only to capture targets
        sources, layers = refiner.fit_sources([resolved], dataset, predictor)
        source = sources[resolved.name]
        evaluate = isinstance(source, ActivationDataset)  # a dataset has evaluation samples to report on
        maps, refined = refine_maps(predictor, refiner.frozen(layers), resolved, source, refine, evaluate=evaluate)
        method = refined_method(refine)
    intervention = Intervention(maps, predictor.model, method, resolved.name, predictor.checkpoint.encoder,
                                info={"phrase": resolved.phrase, **predictor.neighbour_info(0), **refined})
    intervention.save(out)
    return intervention
