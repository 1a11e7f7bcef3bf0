"""`--refine N`: LinEAS warm-started from HyperTransport's prediction, one concept at a time.

HyperTransport predicts a concept's maps in one forward pass; LinEAS fits them per concept
from the identity in about a thousand steps. Starting LinEAS at the prediction spends N steps
(seconds) to close part of the gap, on the concept's fitting samples from a dataset; the
result is an ordinary set of maps.

    maps, info = refine_maps(predictor, frozen, load_library().resolve("art deco"), dataset, steps=50)

Refining needs the concept's target activations, so the concept must be built into the
dataset (`ht build-dataset --concept ...` on it): free text that is not is refused, before
anything loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from htcli.core.transport import Maps
from htcli.data.concepts import Concept, load_library
from htcli.data.dataset import ActivationDataset, open_dataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.methods.baselines import LineasConfig, fit_method
from htcli.methods.objective import residuals
from htcli.methods.predict import Predictor, resolve_checkpoint
from htcli.models import default_model_name, get_model
from htcli.models.interventions import Intervention, check_intervention_out


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
    inputs = {k: v[:n] for k, v in dataset.source_inputs("fit").items()}  # (N, ...) per input
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


def export_intervention(concept: str, out: Path, hyper: Path | None = None, model: str | None = None,
                        refine: int | None = None, data: Path | None = None) -> Intervention:
    """Write the maps the hypernetwork predicts for `concept` (a library name or free text) as a
    standard intervention file at `out`, and return it. `out` must be a new `.safetensors` path
    or an intervention file (replaced); anything else there is refused before anything loads.
    `refine` N: then N LinEAS steps from the prediction on the concept's samples in the dataset
    `data` (default runs/<model>/data; see `htcli.methods.refine`), saved as `lineas-refine<N>`."""
    out = check_intervention_out(Path(out))
    resolved = load_library().resolve(concept)
    if refine is None and data is not None:
        raise HTError("--data is only used with --refine (LinEAS from the prediction, on the dataset's samples)")
    dataset = open_dataset(data, model) if refine is not None else None
    if dataset is not None:
        check_refine(refine, dataset, [resolved.name])
        model = model or dataset.settings.model
    predictor = Predictor.load(resolve_checkpoint(hyper, model or default_model_name()), model)
    if dataset is None:
        maps, method, refined = predictor.maps([resolved])[0], "hypertransport", {}
    else:
        frozen = Frozen.load(get_model(predictor.model), dataset.settings.layers)
        maps, refined = refine_maps(predictor, frozen, resolved, dataset, refine)
        method = refined_method(refine)
    intervention = Intervention(maps, predictor.model, method, resolved.name, predictor.checkpoint.encoder,
                                info={"phrase": resolved.phrase, **predictor.neighbour_info(0), **refined})
    intervention.save(out)
    return intervention
