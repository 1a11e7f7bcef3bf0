"""A spec for any diffusers pipeline: derived from a pipeline folder (its model_index.json) or a
Hub repo id that ht has no spec for.

`get_model("/path/to/pipeline")` (or "owner/name") reads the pipeline's own defaults: its
denoiser (the `transformer` or `unet` component), the number of steps, the guidance scale and
the resolution its `__call__` uses when none is given; the layers to steer are found in the
denoiser's module tree (`htcli.models.layers`) and its call is recorded as for any spec. A query
overrides the defaults and stays part of the model's id, so that every dataset, hypernetwork
and image made with it names the same spec:

    get_model("/models/my-auraflow?steps=4&guidance=1.5&resolution=512")

A folder that is not a text-to-image or text-to-video pipeline, or names no denoiser, is an
HTError that says what is missing.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import torch

from htcli.errors import HTError
from htcli.models.spec import ModelSpec, register_pipeline_source

DENOISER_ATTRS = ("transformer", "unet")
# Arguments of a pipeline's call that condition on something other than text: such a pipeline
# (image-to-image, inpainting, control, image-to-video) is not one ht steers.
NOT_TEXT = ("image", "mask_image", "control_image", "video", "init_image")
OVERRIDES = {"steps": int, "guidance": float, "resolution": int}
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_pipeline_source(name: str) -> bool:
    """Whether `name` (before any `?` query) names a folder or looks like a Hub repo id."""
    base = name.partition("?")[0]
    return Path(base).is_dir() or _REPO_ID.fullmatch(base) is not None


def _folder(base: str) -> Path:
    """The local folder of `base`: itself, or the Hub repo's snapshot (downloaded, or cached offline)."""
    if Path(base).is_dir():
        return Path(base).resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base))
    except Exception as error:  # offline, unknown repo, gated...: one line either way
        raise HTError(f"cannot get the pipeline {base} from the Hub: {type(error).__name__}; pass a local pipeline "
                      "folder, or go online") from None


def _pipeline_class(folder: Path) -> tuple[type, dict[str, Any]]:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise HTError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    index = json.loads(index_path.read_text())
    import diffusers

    name = index.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise HTError(f"{folder}: model_index.json names the pipeline {name!r}, which diffusers "
                      f"{diffusers.__version__} does not have")
    parameters = inspect.signature(cls.__call__).parameters
    other = [p for p in NOT_TEXT if p in parameters]
    if "prompt" not in parameters or other:
        what = f"its call takes {other[0]}" if other else "its call takes no prompt"
        raise HTError(f"{folder} holds a {name}, not a text-to-image or text-to-video pipeline ({what})")
    return cls, index


def _denoiser_component(folder: Path, index: dict[str, Any]) -> tuple[str, str]:
    """(diffusers class, pipeline attribute) of the folder's denoiser."""
    for attr in DENOISER_ATTRS:
        entry = index.get(attr)
        if isinstance(entry, list) and entry[0] == "diffusers" and (folder / attr / "config.json").is_file():
            return entry[1], attr
    raise HTError(f"{folder}: model_index.json names no denoiser (a 'transformer' or 'unet' component with its "
                  "config.json)")


def _saved_dtype(folder: Path) -> str:
    """The dtype the denoiser's weights were saved in (float32 when unknown)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), "float32")
    return "float32"


def _default_resolution(folder: Path, parameters: Any, attr: str) -> int:
    """The pipeline's default height: its call's, else its denoiser's sample size in pixels."""
    height = parameters["height"].default if "height" in parameters else None
    if isinstance(height, int):
        return height
    config = json.loads((folder / attr / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text()) if (folder / "vae" / "config.json").is_file() else {}
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return int(config.get("sample_size", 128)) * scale


def _timesteps(folder: Path, steps: int) -> tuple[int, ...]:
    """The scheduler's timesteps for `steps` where it can say without the pipeline (else evenly
    spaced ones): informative only, as the pipeline makes its own schedule (`schedule="steps"`)."""
    try:
        import diffusers

        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        scheduler.set_timesteps(steps)
        return tuple(int(t) for t in scheduler.timesteps)
    except Exception:  # dynamic shifting needs the image size, other schedulers other arguments
        return tuple(int(1000 - i * 1000 / steps) for i in range(steps))


def _concept_encoder() -> str:
    """MiniLM offline (it ships with ht), else the default of every spec."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return "minilm" if offline else ModelSpec.__dataclass_fields__["concept_encoder"].default


def derive_spec(name: str) -> ModelSpec:
    """The spec of the pipeline `name` names (a folder or a Hub repo id, with an optional query of
    `OVERRIDES`), from the pipeline's own defaults."""
    base, _, query = name.partition("?")
    overrides = {}
    for key, value in parse_qsl(query, strict_parsing=bool(query)):
        if key not in OVERRIDES:
            raise HTError(f"model {name!r}: unknown setting {key!r}; known: {', '.join(OVERRIDES)}")
        try:
            overrides[key] = OVERRIDES[key](value)
        except ValueError:
            raise HTError(f"model {name!r}: {key} must be a {OVERRIDES[key].__name__}, got {value!r}") from None
    folder = _folder(base)
    cls, index = _pipeline_class(folder)
    class_name, attr = _denoiser_component(folder, index)
    parameters = inspect.signature(cls.__call__).parameters
    steps = overrides.get("steps", parameters["num_inference_steps"].default)
    guidance = overrides.get("guidance", parameters["guidance_scale"].default if "guidance_scale" in parameters else 0.0)
    canonical = str(folder) if Path(base).is_dir() else base
    # Pipelines that snap sizes to their training buckets (PixArt, SANA) must be told not to, or
    # a resolution other than their own is silently generated at the nearest bucket.
    unbinned = {"use_resolution_binning": False} if "use_resolution_binning" in parameters else {}
    return ModelSpec(
        id=canonical + (f"?{urlencode(sorted(overrides.items()))}" if overrides else ""),
        description=f"{cls.__name__} from {canonical}: its own defaults ({steps} steps, guidance {guidance:g})",
        family=cls.__name__,
        denoiser_config=str(folder / attr / "config.json"),
        timesteps=_timesteps(folder, steps),
        resolution=overrides.get("resolution", _default_resolution(folder, parameters, attr)),
        dtype=_saved_dtype(folder / attr),
        loader=load_folder_pipeline,
        denoiser_loader=load_folder_denoiser,
        guidance_scale=float(guidance),
        concept_encoder=_concept_encoder(),
        base_repo=None if Path(base).is_dir() else base,
        licence="as the pipeline's own model card states",
        denoiser_type=(class_name, attr),
        schedule="steps",
        call_kwargs=unbinned if "resolution" in overrides else {},
        resolution_kwargs=unbinned,
        video="num_frames" in parameters,  # a text-to-video pipeline: its outputs are frames
        source=str(folder),
    )


def derived_spec(name: str) -> ModelSpec | None:
    """`derive_spec(name)` if `name` names a pipeline folder or Hub repo id, else None."""
    return derive_spec(name) if is_pipeline_source(name) else None


register_pipeline_source(derived_spec)


def with_settings(name: str, **settings: int | float | None) -> str:
    """The id of the pipeline `name` names with `settings` (`OVERRIDES`; None: as they are) added
    to its query. Only a pipeline folder or repo takes settings: a shipped spec's are its own."""
    given = {key: value for key, value in settings.items() if value is not None}
    if not given:
        return name
    if not is_pipeline_source(name):
        raise HTError(f"{', '.join(f'{key}=' for key in given)} apply to a pipeline folder or Hub repo id, not to "
                      f"the model {name!r}, whose settings are its spec's")
    base, _, query = name.partition("?")
    return derive_spec(f"{base}?{urlencode(dict(parse_qsl(query)) | given)}").id


def _folder_of(spec: ModelSpec, model_path: str | None) -> Path:
    return Path(model_path or spec.source)


def load_folder_pipeline(spec: ModelSpec, model_path: str | None, device, dtype: torch.dtype) -> Any:
    """The pipeline of the spec's folder, in `dtype` on `device`."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(_folder_of(spec, model_path), torch_dtype=dtype).to(device)


def load_folder_denoiser(spec: ModelSpec, dtype: torch.dtype, device, model_path: str | None = None) -> torch.nn.Module:
    """The folder's denoiser alone, in `dtype` on `device`."""
    import diffusers

    cls = getattr(diffusers, spec.denoiser_type[0])
    return cls.from_pretrained(_folder_of(spec, model_path), subfolder=spec.denoiser_attr, torch_dtype=dtype).to(device)
