"""Intervention files: per-layer affine maps in safetensors, validated against the model.

A file holds `NAME.omega` and `NAME.beta` (float32, shape (D,)) for every hooked layer, and
string metadata: format, model spec id, layers and widths (JSON), pooling, method, concept,
encoder, the denoising timestep the maps were fitted at, package version. Strength is chosen
when steering, never stored (files from older versions carry a "strength" key; it is ignored).
Files written before the fitted timestep was stored load with `fitted_timestep` None: unknown.
Loading checks the file against the model it is meant for; any mismatch is one clear error,
never a silent partial application.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from htcli import __version__
from htcli.core.files import check_output_file, read_tensors, save_tensors
from htcli.core.hub_access import HubOptions
from htcli.core.references import resolve_file
from htcli.core.transport import Maps
from htcli.errors import HTError

FORMAT = "ht-intervention/1"
WEIGHT_NAME = "intervention.safetensors"  # `save_pretrained`'s file name when none is given
METHODS = ("linear-act", "lineas", "mean-shift", "hypertransport")


@dataclass
class Intervention:
    """Affine maps per layer name, plus what they were made for."""

    maps: Maps  # layer -> (omega, beta), each (D,)
    model: str
    method: str
    concept: str
    encoder: str = ""
    info: dict = field(default_factory=dict)  # free-form: fit settings, residuals...
    fitted_timestep: int | None = None  # None: not known yet (`save` takes the model's) or an older file
    random_weights: bool | None = None  # made on random weights (`--random-weights`); None: `save` asks the model's spec

    @classmethod
    def from_pretrained(cls, reference: str | Path, weight_name: str | None = None, subfolder: str | None = None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False,
                        force_download: bool = False) -> Intervention:
        """Read an intervention file from a local path or folder, or from a Hub repo through the Hub
        cache (`htcli.core.references`), taking diffusers' `from_pretrained` arguments:
        `Intervention.from_pretrained("user/repo", weight_name="art_deco.safetensors", revision="v1")`."""
        hub = HubOptions(revision, token, cache_dir, local_files_only, force_download)
        return load_intervention(resolve_file(reference, "intervention file", weight_name=weight_name,
                                              subfolder=subfolder, hub=hub))

    load = from_pretrained  # the same, by the name `ht.Intervention.load` had first

    def save_pretrained(self, folder: str | Path, repo_id: str = "USER/REPO", weight_name: str | None = None) -> Path:
        """Write the Hub layout to `folder`: the file (`weight_name`, else WEIGHT_NAME) and README.md, a model card whose usage code loads it from `repo_id`. Returns the folder."""
        from htcli.models.hub_cards import CARD, intervention_card

        folder = Path(folder)
        name = weight_name or WEIGHT_NAME
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / name)
        (folder / CARD).write_text(intervention_card(self, name, repo_id))
        return folder

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    weight_name: str | None = None) -> str:
        """Upload the `save_pretrained` folder to the Hub repo `repo_id` (created if need be); returns its URL."""
        import tempfile

        from htcli.models.hub_cards import check_repo_id, upload

        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="ht-hub-") as temporary:
            folder = self.save_pretrained(Path(temporary) / "upload", repo_id, weight_name)
            return upload(folder, repo_id, "intervention", private=private, token=token)

    @property
    def layers(self) -> list[str]:
        """The layer names the maps steer, in order."""
        return list(self.maps)

    @property
    def nearest(self) -> list[dict]:
        """The training concepts nearest to the prediction's sources, best first ({name, similarity},
        with "source" when several sources were composed); [] when not predicted or not known."""
        return list(self.info.get("nearest_training_concepts", []))

    @property
    def ood(self) -> bool | None:
        """Whether a predicted source is out of the hypernetwork's distribution; None: unknown."""
        return self.info.get("ood")

    @property
    def widths(self) -> dict[str, int]:
        """{layer: width}: the number of neurons each layer's maps steer."""
        return {name: int(omega.shape[-1]) for name, (omega, _) in self.maps.items()}

    def support(self, tol: float = 0.0) -> float:
        """Fraction of neurons the maps change (omega != 1 or beta != 0)."""
        changed = sum(int(((o - 1).abs() > tol).logical_or(b.abs() > tol).sum()) for o, b in self.maps.values())
        return changed / max(sum(self.widths.values()), 1)

    def describe(self) -> dict:
        """What the file is, for `ht inspect`: model, method, concept, size, support, fit info."""
        return {"model": self.model, "method": self.method, "concept": self.concept, "encoder": self.encoder,
                "fitted_timestep": self.fitted_timestep, "random_weights": bool(self.random_weights),
                "layers": len(self.maps), "neurons": sum(self.widths.values()),
                "support": self.support(), "info": self.info}

    def __repr__(self) -> str:
        """One line, no tensors: `Intervention('art deco', model='tiny', method='hypertransport', 4 layers, 1024 neurons)`."""
        return (f"Intervention({self.concept!r}, model={self.model!r}, method={self.method!r}, "
                f"{len(self.maps)} layers, {sum(self.widths.values())} neurons)")

    def save(self, path: str | Path) -> Path:
        """Write the file (atomically; a `.safetensors` name, else HTError) and return its path."""
        path = check_output_file(Path(path), "path")
        tensors = {}
        for name, (omega, beta) in self.maps.items():
            tensors[f"{name}.omega"] = omega.float()
            tensors[f"{name}.beta"] = beta.float()
        metadata = {
            "format": FORMAT,
            "model": self.model,
            "layers": json.dumps([{"name": n, "dim": d} for n, d in self.widths.items()]),
            "pooling": "mean",
            "method": self.method,
            "concept": self.concept,
            "encoder": self.encoder,
            "info": json.dumps(self.info),
            "ht_version": __version__,
        }
        made_on = {"random_weights": json.dumps(made_on_random_weights(self.random_weights, self.model))}
        save_tensors(path, tensors, metadata | made_on | fitted_timestep_metadata(self.fitted_timestep, self.model))
        return path

    def check(self, model: str, widths: Mapping[str, int], where: str = "intervention") -> None:
        """Raise HTError unless every layer of the maps exists in `widths` with its width."""
        from htcli.models.random_weights import check_same_weights
        from htcli.models.spec import get_model

        if self.model != model:
            raise HTError(f"{where} was made for model {self.model!r}, not {model!r}")
        if self.random_weights is not None:
            check_same_weights(get_model(model), self.random_weights, where)
        for name, width in self.widths.items():
            if name not in widths:
                raise HTError(f"{where} steers layer {name!r}, which model {model!r} does not have")
            if widths[name] != width:
                raise HTError(f"{where}: layer {name!r} has width {width} in the file but {widths[name]} in the model")


def fitted_timestep_metadata(known: int | None, model: str) -> dict[str, str]:
    """File metadata saying at which denoising timestep maps were fitted: `known`, else the first
    timestep of the spec `model` (where every activation dataset is captured, see
    `htcli.data.forward`); nothing for a model id this install does not know."""
    from htcli.models.spec import get_model

    if known is None:
        try:
            known = get_model(model).timesteps[0]
        except HTError:
            return {}
    return {"fitted_timestep": str(known)}


def made_on_random_weights(known: bool | None, model: str) -> bool:
    """Whether maps were made on random weights: `known`, else what the spec `model` has now
    (the model the maps were just made with); False for a model id this install does not know."""
    from htcli.models.spec import get_model

    if known is not None:
        return known
    try:
        return get_model(model).random_weights
    except HTError:
        return False


def read_fitted_timestep(meta: Mapping[str, str], path: Path) -> int | None:
    """The fitted timestep from file metadata; None (unknown) for files written before it was stored."""
    if "fitted_timestep" not in meta:
        return None
    try:
        return int(meta["fitted_timestep"])
    except ValueError:
        raise HTError(f"{path}: damaged metadata (fitted_timestep {meta['fitted_timestep']!r})") from None


def check_intervention_out(path: Path, option: str = "out") -> Path:
    """Where an intervention file may be written: a `.safetensors` path that is new or already an
    ht intervention file (which it replaces); anything else there is refused, never overwritten."""
    path = check_output_file(path, option)
    if path.exists():
        try:
            _, meta = read_tensors(path, "intervention file")
        except HTError:
            meta = {}
        if meta.get("format") != FORMAT:
            raise HTError(f"{option}={str(path)!r} exists and is not an ht intervention file; refusing to overwrite it")
    return path


def load_intervention(path: Path, model: str | None = None, widths: Mapping[str, int] | None = None) -> Intervention:
    """Read and validate an intervention file; with `model`/`widths`, check it fits that model."""
    path = Path(path)
    tensors, meta = read_tensors(path, "intervention file")
    if meta.get("format") != FORMAT:
        raise HTError(f"{path} is not an ht intervention file (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        layers = json.loads(meta["layers"])
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError) as error:
        raise HTError(f"{path}: damaged metadata ({error})") from None
    maps = {}
    for layer in layers:
        name, dim = layer["name"], int(layer["dim"])
        try:
            omega, beta = tensors[f"{name}.omega"], tensors[f"{name}.beta"]
        except KeyError:
            raise HTError(f"{path}: layer {name!r} is listed but its tensors are missing") from None
        for label, t in (("omega", omega), ("beta", beta)):
            if t.shape != (dim,):
                raise HTError(f"{path}: {name}.{label} has shape {tuple(t.shape)}, expected ({dim},)")
            if not torch.isfinite(t).all():
                raise HTError(f"{path}: {name}.{label} contains NaN or inf")
        maps[name] = (omega.float(), beta.float())
    intervention = Intervention(
        maps=maps,
        model=meta.get("model", ""),
        method=meta.get("method", ""),
        concept=meta.get("concept", ""),
        encoder=meta.get("encoder", ""),
        info=info,
        fitted_timestep=read_fitted_timestep(meta, path),
        random_weights=meta.get("random_weights", "false") == "true",
    )
    if model is not None:
        intervention.check(model, widths or intervention.widths, where=str(path))
    return intervention


def layer_stats(intervention: Intervention) -> list[dict]:
    """Per-layer summary statistics, for `ht inspect`."""
    rows = []
    for name, (omega, beta) in intervention.maps.items():
        changed = ((omega - 1).abs() > 0).logical_or(beta.abs() > 0)
        rows.append(
            {
                "layer": name,
                "dim": int(omega.numel()),
                "omega_mean": float(omega.mean()),
                "omega_std": float(omega.std()) if omega.numel() > 1 else 0.0,
                "omega_min": float(omega.min()),
                "omega_max": float(omega.max()),
                "beta_mean": float(beta.mean()),
                "beta_std": float(beta.std()) if beta.numel() > 1 else 0.0,
                "beta_abs_max": float(beta.abs().max()),
                "support": float(changed.float().mean()),
            }
        )
    return rows
