"""Model specs: how to load each diffusion model and how to sample it; the registry of specs
(filled by `htcli.models.pretrained` and `htcli.models.tiny`).

A spec is data (`ModelSpec`) plus a loader: no model's inputs are written anywhere (the
pipeline's own call of its denoiser is recorded, `htcli.models.record`), and the layers to steer
are found in the denoiser's module tree unless a spec names them (`htcli.models.layers`). The denoiser architectures ship as JSON configs in
`configs/`, so every model, real or tiny, can be built on the meta device without weights:

    spec = get_model("pixart")
    denoiser = build_meta_denoiser(spec)   # 28 blocks of width 1152, no memory, no download
    pipe = load_pipeline(spec)             # the real thing (downloads from the Hub, or cache)

With $HT_RANDOM_WEIGHTS set (`--random-weights`), `get_model` gives a real spec's random-weights
variant instead: its architecture at full width with seeded random weights, no download
(`htcli.models.random_weights`).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from htcli.errors import HTError

CONFIG_DIR = Path(__file__).parent / "configs"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# family -> (its denoiser's diffusers class, the pipeline attribute that holds it): the default
# of a spec's `denoiser_type`
DENOISERS = {
    "pixart": ("PixArtTransformer2DModel", "transformer"),
    "sdxl": ("UNet2DConditionModel", "unet"),
    "flux": ("FluxTransformer2DModel", "transformer"),
    "sd3": ("SD3Transformer2DModel", "transformer"),
    "sana": ("SanaTransformer2DModel", "transformer"),
    "wan": ("WanTransformer3DModel", "transformer"),
}


SCHEDULES = ("timesteps", "sigmas", "steps")


class _Found(tuple):
    """Hook patterns found in a module tree, not given: `dataclasses.replace` passes them on as found."""


class _HookPatterns:
    """The descriptor behind `ModelSpec.hook_patterns`: the patterns a spec was given, else those
    found in its denoiser's module tree (built on the meta device on first read, then kept for
    the process per architecture: `htcli.models.layers.found_patterns`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, spec: ModelSpec | None, owner: type | None = None) -> tuple[str, ...]:
        if spec is None:
            return ()  # the dataclass field's default
        given = spec.__dict__.get(self.slot, ())
        if given:
            return given
        from htcli.models.layers import architecture_key, found_patterns

        key = architecture_key(spec.denoiser_type[0], denoiser_config(spec))
        return _Found(found_patterns(build_meta_denoiser(spec), key))

    def __set__(self, spec: ModelSpec, value: tuple[str, ...]) -> None:
        spec.__dict__[self.slot] = () if isinstance(value, _Found) else tuple(value)


@dataclass(frozen=True)
class ModelSpec:
    """Everything `ht` needs to know about one diffusion model."""

    id: str
    description: str
    family: str  # a label ("pixart", "sdxl", "flux", a pipeline's class...); DENOISERS gives known ones' denoiser_type
    denoiser_config: str  # file in configs/ (or an absolute path): the denoiser's architecture
    timesteps: tuple[int, ...]
    resolution: int
    dtype: str
    loader: Callable[..., Any]  # (spec, model_path, device, dtype) -> diffusers pipeline
    denoiser_loader: Callable[..., nn.Module]  # (spec, dtype, device, model_path) -> the denoiser alone, there
    guidance_scale: float = 0.0  # the distilled models sample without classifier-free guidance
    concept_encoder: str = "open_clip:ViT-L-14/openai"  # see htcli.models.encoders
    offline: bool = False  # runs with no download at all
    base_repo: str | None = None
    weights: tuple[str, ...] = ()  # Hub repos / files of the distilled weights, tried in order
    licence: str = ""
    hub_license: str = "apache-2.0"  # the Hub's licence id of the weights, for model cards
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # extra pipeline-call arguments
    config_overrides: dict[str, Any] = field(default_factory=dict)  # values replacing the denoiser config file's
    random_weights: bool = False  # the real architecture with seeded random weights (`--random-weights`)
    denoiser_type: tuple[str, str] = ()  # (diffusers class, pipeline attribute); () = DENOISERS[family]
    schedule: str = "timesteps"  # how the pipeline takes `timesteps`: "timesteps", "sigmas" (t / 1000), "steps" (a count)
    resolution_kwargs: dict[str, Any] = field(default_factory=dict)  # call arguments away from `resolution`
    source: str | None = None  # the pipeline folder a spec was derived from (`htcli.models.folder`)
    # Default layers to steer, as module-name patterns; () = found in the module tree (`htcli.models.layers`).
    hook_patterns: tuple[str, ...] = _HookPatterns()
    video: bool = False  # the pipeline makes videos (`.frames`: frames per sample), not images

    def __post_init__(self) -> None:
        if not self.denoiser_type:
            if self.family not in DENOISERS:
                raise ValueError(f"model spec {self.id!r}: no denoiser_type, and family {self.family!r} is none of "
                                 f"{', '.join(DENOISERS)}")
            object.__setattr__(self, "denoiser_type", DENOISERS[self.family])
        if self.schedule not in SCHEDULES:
            raise ValueError(f"model spec {self.id!r}: schedule {self.schedule!r} is none of {', '.join(SCHEDULES)}")

    @property
    def hook_patterns_found(self) -> bool:
        """Whether `hook_patterns` are found in the denoiser's module tree (the spec names none)."""
        return not self.__dict__.get("_hook_patterns")

    @property
    def denoiser_attr(self) -> str:
        return self.denoiser_type[1]

    @property
    def base_model(self) -> str | None:
        """The Hub repo of the weights ht steers (the distilled denoiser's, else the base
        pipeline's), as model cards name their `base_model`; None for the offline models."""
        if self.offline:
            return None
        repos = [source.partition(":")[0] for source in self.weights] + [self.base_repo]
        return next((repo for repo in repos if repo and repo.count("/") == 1), None)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def record(self) -> dict[str, Any]:
        """The spec as plain, JSON-ready data (`ht models --json`): every field but the loaders."""
        skip = {"loader", "denoiser_loader"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @property
    def dataset_dtype(self) -> str:
        """What `build-dataset` stores activations in: bfloat16 for bfloat16 models (their
        activations can exceed float16's range), else float16; 2 bytes either way."""
        return "bfloat16" if self.dtype == "bfloat16" else "float16"

    @property
    def resolution_asked(self) -> int | None:
        """The resolution `at_resolution` moved the spec to; None at the model's own (what
        dataset settings record)."""
        return None if self.resolution == _REGISTRY[self.id].resolution else self.resolution

    def at_resolution(self, resolution: int | None) -> ModelSpec:
        """The spec generating and capturing at `resolution` px (None: its own), e.g. a 1024-px
        model at 256 px for a quick run on a CPU (the images of a model distilled at 1024 px
        suffer; maps are per channel, so they apply at any resolution). A multiple of 64."""
        if resolution is None or resolution == self.resolution:
            return self
        if resolution < 64 or resolution % 64:
            raise HTError(f"resolution= must be a positive multiple of 64 (pixels), got {resolution}")
        return replace(self, resolution=resolution, call_kwargs=self.call_kwargs | self.resolution_kwargs)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for one sampling call of the spec's pipeline."""
        # Flow-matching pipelines (FLUX) take their schedule as noise levels: sigma = timestep / 1000.
        schedule = {"timesteps": {"timesteps": list(self.timesteps)},
                    "sigmas": {"sigmas": [t / 1000 for t in self.timesteps]}, "steps": {}}[self.schedule]
        return {
            "num_inference_steps": len(self.timesteps),
            **schedule,
            "guidance_scale": self.guidance_scale,
            "height": self.resolution,
            "width": self.resolution,
            **self.call_kwargs,
        }


def shipped_config(name: str) -> dict[str, Any]:
    """A shipped architecture config (htcli/models/configs/`name`), its keys starting with _
    (diffusers' bookkeeping) removed."""
    raw = json.loads((CONFIG_DIR / name).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def denoiser_config(spec: ModelSpec) -> dict[str, Any]:
    """The shipped architecture config of the spec's denoiser, with the spec's `config_overrides`."""
    return shipped_config(spec.denoiser_config) | spec.config_overrides


def denoiser_class(spec: ModelSpec) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, spec.denoiser_type[0])


def build_meta_denoiser(spec: ModelSpec) -> nn.Module:
    """The spec's denoiser on the meta device: real module names and shapes, no memory."""
    with torch.device("meta"):
        return denoiser_class(spec).from_config(denoiser_config(spec))


def denoiser(pipe: Any, spec: ModelSpec) -> nn.Module:
    return getattr(pipe, spec.denoiser_attr)


def load_pipeline(
    spec: ModelSpec | str,
    model_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """Load the diffusers pipeline of `spec` (or of the spec with that id) on `device` (weights
    from a local path or the Hub).

    `model_path` (or env `HT_MODEL_PATH`) replaces the base Hub repo with a local pipeline
    directory. Raises HTError with one line when the weights cannot be had (e.g. offline).
    """
    from htcli.models.torch_pair import check_torch_pair

    spec = get_model(spec) if isinstance(spec, str) else spec
    check_torch_pair()  # else a mismatched torchvision fails deep in the pipeline's imports
    model_path = local_model_path(model_path)
    pipe = spec.loader(spec, model_path=model_path, device=device, dtype=dtype or spec.torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def local_model_path(model_path: str | None = None) -> str | None:
    """The local pipeline directory that replaces the spec's Hub weights: `model_path`, else
    $HT_MODEL_PATH, else None (the Hub's)."""
    return model_path or os.environ.get("HT_MODEL_PATH") or None


def load_denoiser(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  model_path: str | None = None) -> nn.Module:
    """Only the denoiser, frozen and in eval mode: all that fitting and training need once
    the inputs are cached (no text encoder, no VAE). Its weights go straight to `device`.
    `model_path` (or env `HT_MODEL_PATH`): the local pipeline directory `load_pipeline` takes,
    so that fitting goes through the weights generation uses."""
    model_path = local_model_path(model_path)
    model = spec.denoiser_loader(spec, dtype or spec.torch_dtype, torch.device(device), model_path)
    return model.eval().requires_grad_(False)


# Filled by the loader modules (`hub`, `tiny`, `random_weights`), which `htcli.models` imports.
_REGISTRY: dict[str, ModelSpec] = {}
_RANDOM_VARIANT: list[Callable[[ModelSpec], ModelSpec]] = []  # spec -> its random-weights variant
_PIPELINE_SOURCE: list[Callable[[str], ModelSpec | None]] = []  # name -> the spec derived from it, or None

RANDOM_WEIGHTS_VARIABLE = "HT_RANDOM_WEIGHTS"
_TRUE = ("1", "true", "t", "yes", "y", "on")  # what click reads as true


def random_weights_requested() -> bool:
    """Whether $HT_RANDOM_WEIGHTS (set by `--random-weights`) asks for random weights."""
    return os.environ.get(RANDOM_WEIGHTS_VARIABLE, "").strip().lower() in _TRUE


def register_random_variant(make: Callable[[ModelSpec], ModelSpec]) -> None:
    """Set how a real spec becomes its random-weights variant (`htcli.models.random_weights`)."""
    _RANDOM_VARIANT[:] = [make]


def register(spec: ModelSpec) -> ModelSpec:
    if spec.id in _REGISTRY:
        raise ValueError(f"model spec {spec.id!r} registered twice")
    _REGISTRY[spec.id] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """Every shipped model spec (`ht models`): the real models, then the offline tiny ones (not
    the specs derived from pipeline folders this process has loaded)."""
    return [spec for spec in _REGISTRY.values() if spec.source is None]


def _unknown(name: str, source: str = "") -> HTError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return HTError(f"unknown model {name!r}{source}; known models: {', '.join(_REGISTRY)}.{hint}")


def get_model(name: str | None = None, random_weights: bool | None = None) -> ModelSpec:
    """The spec called `name` (None: `default_model_name()`); an unknown name is an error
    listing the known ones. With `random_weights` (None: $HT_RANDOM_WEIGHTS), a real model's
    random-weights variant (the offline models' weights are random already: they stay as they are)."""
    name = default_model_name() if name is None else name
    if name not in _REGISTRY:
        derived = _derived(name)
        if derived is None:
            raise _unknown(name)
        name = derived.id  # registered once under its canonical id (`resolution_asked` reads it)
        _REGISTRY.setdefault(name, derived)
    spec = _REGISTRY[name]
    if (random_weights_requested() if random_weights is None else random_weights) and not spec.offline:
        if spec.source is not None:
            raise HTError(f"{spec.id} is a pipeline folder, not a shipped spec: random weights come only with the "
                          "shipped models; leave out random_weights=True (or HT_RANDOM_WEIGHTS)")
        return random_variant(spec)
    return spec


def random_variant(spec: ModelSpec) -> ModelSpec:
    """`spec` with seeded random weights at full width (`htcli.models.random_weights`)."""
    return _RANDOM_VARIANT[0](spec)


def model_id(name: str | None) -> str | None:
    """The id of the spec `name` names: a pipeline folder's or repo's derived spec's (its
    absolute path, its settings sorted); any other name as it is (None too)."""
    derived = None if name is None or name in _REGISTRY else _derived(name)
    return name if derived is None else derived.id


def register_pipeline_source(derive: Callable[[str], ModelSpec | None]) -> None:
    """Set how a name that is no registered spec derives one (`htcli.models.folder`)."""
    _PIPELINE_SOURCE[:] = [derive]


def _derived(name: str) -> ModelSpec | None:
    """The spec derived from the pipeline folder or Hub repo `name` names, None if it names none."""
    return _PIPELINE_SOURCE[0](name) if _PIPELINE_SOURCE else None


def default_model_name() -> str:
    """$HT_MODEL, else pixart. An unknown $HT_MODEL is an error that names the variable (the
    user gave no --model, so an error about "the model" alone would puzzle)."""
    name = os.environ.get("HT_MODEL", "pixart")
    if name in _REGISTRY:
        return name
    derived = _derived(name)
    if derived is None:
        raise _unknown(name, " (from $HT_MODEL; pass model= or change the variable)")
    return derived.id
