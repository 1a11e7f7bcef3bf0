"""The Python front door: a trained hypernetwork that turns concepts into interventions.

    import htcli as ht
    hyper = ht.HyperTransport.from_pretrained("runs/pixart/hyper")   # or "user/repo" on the Hub
    art_deco = hyper.intervention("art deco")                        # an ht.Intervention
    art_deco.nearest, art_deco.ood                                   # nearest training concepts, OOD flag
    with ht.apply(pipe, art_deco, strength=0.6):
        image = pipe("cyberpunk city").images[0]

`intervention` runs what `ht steer` runs before it generates (`htcli.generate.source_maps.compose_sources`):
the same concept resolution, prediction, composition and notes, so a pipeline under `ht.apply`
makes the images `ht steer` makes for the same request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from htcli.core.hub_access import HubOptions
from htcli.generate.compose import Weighted, resolve_sources
from htcli.generate.source_maps import Steerer, compose_sources, nearest_records, ood_flag
from htcli.methods.predict import Predictor, resolve_checkpoint
from htcli.models import default_model_name, get_model
from htcli.models.interventions import Intervention

Concepts = str | Sequence[Weighted] | Mapping[str, float]


class HyperTransport:
    """A hypernetwork checkpoint with its concept encoder: concept text or reference images in,
    an `Intervention` out, in one forward pass."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self._steerer = Steerer(get_model(predictor.model), predictor=predictor)

    def __repr__(self) -> str:
        """One line: `HyperTransport(model='tiny', 8 layers, 1375 training concepts, path='...')`."""
        return (f"HyperTransport(model={self.model!r}, {len(self.layers)} layers, "
                f"{len(self.training_concepts)} training concepts, path={str(self.predictor.path)!r})")

    @classmethod
    def from_pretrained(cls, reference: str | Path | None = None, *, model: str | None = None,
                        weight_name: str | None = None, subfolder: str | None = None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, force_download: bool = False,
                        device: str | torch.device = "cpu") -> HyperTransport:
        """Load a hypernetwork from a run folder (`runs/<model>/hyper`), a saved folder
        (`save_pretrained`), a checkpoint file or a Hub repo ("user/repo", "user/repo@v1"); with no
        reference, `model`'s own run (runs/<model>/hyper), else the one shipped for it (`tiny`).
        `model`, when given, must be the one the hypernetwork was trained for. `revision`, `token`,
        `cache_dir`, `local_files_only` and `force_download` read a Hub repo as diffusers'
        `from_pretrained` does, through huggingface_hub and its cache."""
        if reference is None:
            model = model or default_model_name()
        hub = HubOptions(revision, token, cache_dir, local_files_only, force_download)
        path = resolve_checkpoint(reference, model, weight_name, subfolder, hub, parameter="reference")
        return cls(Predictor.load(path, model=model, device=device))

    @property
    def model(self) -> str:
        """The id of the model spec the hypernetwork steers (`ht models`)."""
        return self.predictor.model

    @property
    def layers(self) -> list[tuple[str, int]]:
        """(name, width) of every layer it predicts maps for."""
        return list(self.predictor.checkpoint.config.layers)

    @property
    def training_concepts(self) -> list[str]:
        """The concepts it was trained on ([] for checkpoints that do not store them)."""
        concepts = self.predictor.training_concepts
        return list(concepts.names) if concepts is not None else []

    def intervention(self, concepts: Concepts = (), *, image: Any = None, images: Sequence[Any] = (),
                     layers: Sequence[str] = (), gap_correction: bool = True) -> Intervention:
        """The maps for `concepts` and/or reference images, composed into one `Intervention`.

        concepts: "art deco", a list of "name", "name:weight" or (name, weight), or {name: weight}:
            library names and aliases take their category's template, other text is used as given.
        image, images: reference images (PIL images or paths), averaged into one source.
        layers: glob (or `re:`) patterns; only the layers they match are kept.

        The result's `nearest` and `ood` say how far each source is from the training concepts;
        `info["notes"]` holds what `ht steer` would print (sources out of distribution...)."""
        if isinstance(concepts, str):
            concepts = [concepts]
        elif isinstance(concepts, Mapping):
            concepts = list(concepts.items())
        references = ([image] if image is not None else []) + list(images)
        steerer = self._steerer
        sources = resolve_sources(steerer.spec, list(concepts), references, library=steerer.library)
        notes: list[str] = []
        composed = compose_sources(steerer, sources, layers=layers, gap_correction=gap_correction, notes=notes)
        maps = {name: (omega.cpu(), beta.cpu()) for name, (omega, beta) in composed.combined().items()}
        info = {"sources": sources.describe(), "nearest_training_concepts": nearest_records(composed.neighbours),
                "ood": ood_flag(composed.neighbours), "ood_threshold": composed.neighbours[0]["ood_threshold"] if composed.neighbours else None,
                "checkpoint_sha256": composed.digest, "intervention_ms": composed.ms, "notes": notes}
        return Intervention(maps, self.model, "hypertransport", "; ".join(sources.labels),
                            self.predictor.checkpoint.encoder, info, self.predictor.checkpoint.fitted_timestep)

    def save_pretrained(self, folder: str | Path, repo_id: str = "USER/REPO") -> Path:
        """Write the Hub layout (config.json, model.safetensors, README.md with a model card whose
        usage code loads it from `repo_id`) to `folder`: what `push_to_hub` uploads, and what
        `from_pretrained` loads back."""
        from htcli.publish import hypernetwork_folder

        return hypernetwork_folder(self.predictor.path, Path(folder), repo_id)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the `save_pretrained` folder to the Hub repo `repo_id` (created if need be); returns its URL."""
        from htcli.publish import push

        return push(self.predictor.path, repo_id, private=private, token=token)
