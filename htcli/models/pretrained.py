"""Real models from the Hugging Face Hub: Nitro-1-PixArt, DMD2 (SDXL) and FLUX.1-schnell.

Nothing downloads at import. Loading resolves the distilled weights file inside its Hub repo
(names have changed over time), reads it with safetensors (a `.bin` only with
`weights_only=True`), and loads it strictly: missing or unexpected keys are an error.
The denoiser is built without allocating its parameters and takes the file's tensors, each
converted to the target dtype and device as it is read: no float32 copy of 2.6B parameters.
FLUX.1-schnell has no separate weights repo: its transformer is read the same way from the
`transformer` folder of its own repo (sharded), and the rest of the pipeline through diffusers'
`from_pretrained`.
These loaders are exercised here only up to the download (FLUX's also from a local pipeline
folder); the shapes and layer names they produce are tested on the meta device from the shipped
configs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from htcli.errors import HTError
from htcli.models.spec import ModelSpec, denoiser_class, denoiser_config, local_model_path, register

OFFLINE_HINT = "no network or Hub cache for its weights; use model='tiny' for the offline model"


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    return (OSError, LocalEntryNotFoundError, HfHubHTTPError, ValueError)


def _download_weights(spec: ModelSpec) -> Path:
    """The first of `spec.weights` that resolves: a local file, or `repo_id[:filename]`.

    A bare repo id means "the one safetensors file in that repo", so a renamed file is found.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    tried = []
    for source in spec.weights:
        if Path(source).is_file():
            return Path(source)
        repo, _, filename = source.partition(":")
        try:
            if filename:
                return Path(hf_hub_download(repo, filename))
            folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors"]))
        except _hub_errors() as error:
            tried.append(f"{source} ({type(error).__name__})")
            continue
        files = sorted(folder.rglob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        tried.append(f"{source} ({len(files)} safetensors files: {', '.join(f.name for f in files)})")
    raise HTError(f"cannot load {spec.id} weights: tried {'; '.join(tried)}; {OFFLINE_HINT}")


def read_state_dict(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a weights file on `device`, floating ones in `dtype`: safetensors, converted
    one tensor at a time (a float32 file never sits whole in memory next to its converted copy),
    or a pickle read with `weights_only=True`."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            return {key: convert(file.get_tensor(key)) for key in file.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: convert(tensor) for key, tensor in state.items()}


class EmptyParameters(TorchFunctionMode):
    """Build modules without allocating their parameters.

    torch.nn layers create each parameter with `torch.empty` and initialise it in place, so
    sending those calls to the meta device allocates and computes nothing. Everything else stays
    real: buffers a constructor computes, such as PixArt's sin-cos position table (not in the
    state dict, as it is non-persistent), and the few small parameters diffusers draws directly.
    Unlike `accelerate.init_empty_weights`, which creates each parameter on the CPU (uninitialised)
    before moving it to meta, nothing parameter-sized is ever allocated, and no dependency is needed.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Make `state`'s tensors the module's own (no copy: they keep their dtype and device).

    Missing or unexpected keys are an error, and so is any tensor left on the meta device by
    `EmptyParameters`, which the state dict did not replace."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise HTError(
            f"{what} does not fit the architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    empty = [name for name, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if empty:
        raise HTError(f"{what} leaves {len(empty)} tensors of the architecture without values (e.g. {empty[:3]})")


def load_module(build: Callable[[], torch.nn.Module], weights: Path | Sequence[Path], dtype: torch.dtype,
                device: str | torch.device) -> torch.nn.Module:
    """`build()` with the tensors of the `weights` file (or of all the shards of a sharded one),
    in `dtype` on `device`: parameters are never allocated before the file's tensors are
    assigned (no float32 copy)."""
    files = [weights] if isinstance(weights, Path) else list(weights)
    with EmptyParameters():
        module = build()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state |= read_state_dict(file, dtype, device)
    load_strict(module, state, files[0].name if len(files) == 1 else f"{files[0].parent.name}/*.safetensors")
    # The buffers the constructor computed are float32 on the CPU. nn.Module's own `to`: diffusers'
    # override warns about modules "to keep in float32" on every cast, even when there are none.
    return torch.nn.Module.to(module, device, dtype)


def _distilled_denoiser(spec: ModelSpec, dtype: torch.dtype, device: str | torch.device,
                        model_path: str | None = None) -> torch.nn.Module:
    """The distilled denoiser in `dtype` on `device`, holding the weights file's tensors. They
    come from `spec.weights` whatever `model_path` says: a local pipeline directory replaces the
    base pipeline only, and generation too takes the denoiser from `spec.weights`."""
    return load_module(lambda: denoiser_class(spec).from_config(denoiser_config(spec)), _download_weights(spec),
                       dtype, device)


def _from_pretrained(pipeline_class: Any, spec: ModelSpec, model_path: str | None, **components: Any) -> Any:
    try:
        return pipeline_class.from_pretrained(model_path or spec.base_repo, **components)
    except _hub_errors() as error:
        raise HTError(
            f"cannot load {spec.id} base pipeline {model_path or spec.base_repo}: "
            f"{type(error).__name__}; {OFFLINE_HINT}"
        ) from None


def _load_pixart(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import PixArtSigmaPipeline

    transformer = _distilled_denoiser(spec, dtype, device)
    pipe = _from_pretrained(PixArtSigmaPipeline, spec, model_path, transformer=transformer, torch_dtype=dtype)
    return pipe.to(device)


def _load_dmd2(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    unet = _distilled_denoiser(spec, dtype, device)
    pipe = _from_pretrained(StableDiffusionXLPipeline, spec, model_path, unet=unet, torch_dtype=dtype)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe.to(device)


# The diffusers pipeline class of each family whose whole pipeline loads from one Hub repo.
PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "sana": "SanaPipeline", "wan": "WanPipeline"}


def _pipeline_denoiser(spec: ModelSpec, dtype: torch.dtype, device: str | torch.device,
                       model_path: str | None = None) -> torch.nn.Module:
    """The denoiser from its folder (`spec.denoiser_attr`: `transformer`) of a local copy of the
    pipeline (`model_path`, else $HT_MODEL_PATH) or of the Hub repo, built from that folder's
    config and loaded strictly from its safetensors shards, like the distilled denoisers: 12B
    parameters never pass through float32 (diffusers' own `from_pretrained` would, without
    accelerate). Where the folder also holds variants (`*.fp16.safetensors`), the plain files."""
    from huggingface_hub import snapshot_download

    source = local_model_path(model_path) or spec.base_repo
    subfolder = spec.denoiser_attr
    try:
        root = source if Path(source).is_dir() else snapshot_download(source, allow_patterns=[f"{subfolder}/*"])
    except _hub_errors() as error:
        raise HTError(
            f"cannot load {spec.id} {subfolder} from {source}: {type(error).__name__}; {OFFLINE_HINT}"
        ) from None
    folder = Path(root) / subfolder
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name.count(".") == 1] or files  # model.fp16.safetensors: a variant
    if not files:
        raise HTError(f"cannot load {spec.id} {subfolder}: no safetensors files in {folder}")
    cls = denoiser_class(spec)
    return load_module(lambda: cls.from_config(cls.load_config(folder)), files, dtype, device)


def _load_hub_pipeline(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    """The spec's whole pipeline from its Hub repo (or `model_path`), the denoiser read by
    `_pipeline_denoiser`, the other components by diffusers in `dtype`."""
    import diffusers

    denoiser = _pipeline_denoiser(spec, dtype, device, model_path)
    pipeline_class = getattr(diffusers, PIPELINES[spec.family])
    pipe = _from_pretrained(pipeline_class, spec, model_path, **{spec.denoiser_attr: denoiser}, torch_dtype=dtype)
    return pipe.to(device)


def _dmd2(spec_id: str, description: str, timesteps: tuple[int, ...], variant: str) -> ModelSpec:
    """A DMD2 UNet on the SDXL base pipeline; `variant` names its weights file (4step, 1step)."""
    weights = f"tianweiy/DMD2:dmd2_sdxl_{variant}_unet_fp16"
    return ModelSpec(
        id=spec_id,
        description=description,
        family="sdxl",
        denoiser_config="sdxl_unet.json",
        timesteps=timesteps,
        resolution=1024,
        dtype="float16",
        loader=_load_dmd2,
        denoiser_loader=_distilled_denoiser,
        base_repo="stabilityai/stable-diffusion-xl-base-1.0",
        weights=(f"{weights}.safetensors", f"{weights}.bin"),
        licence="DMD2 weights: CC BY-NC-SA 4.0 (non-commercial)",
        hub_license="cc-by-nc-sa-4.0",
    )


register(
    ModelSpec(
        id="pixart",
        description="Nitro-1-PixArt (AMD): one-step distilled PixArt-Sigma, 1024 px",
        family="pixart",
        denoiser_config="pixart_sigma_transformer.json",
        timesteps=(400,),
        resolution=1024,
        dtype="float16",
        loader=_load_pixart,
        denoiser_loader=_distilled_denoiser,
        base_repo="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        weights=("amd/Nitro-1-PixArt", "amd/PixArt-Sigma-Nitro"),
        licence="PixArt-Sigma: openrail++; Nitro-1-PixArt: Apache-2.0",
        hub_license="openrail++",
        call_kwargs={"clean_caption": False},
        resolution_kwargs={"use_resolution_binning": False},  # else it generates at the nearest 1024-px size, resized
    )
)
register(_dmd2("dmd2", "DMD2 on SDXL (Yin et al. 2024): 4-step distilled UNet, 1024 px", (999, 749, 499, 249), "4step"))
register(_dmd2("dmd2-1step", "DMD2 on SDXL: the 1-step distilled UNet, 1024 px", (399,), "1step"))
register(
    ModelSpec(
        id="flux-schnell",
        description="FLUX.1-schnell (Black Forest Labs): 4-step distilled rectified-flow transformer, 1024 px",
        family="flux",
        denoiser_config="flux_schnell_transformer.json",
        schedule="sigmas",
        timesteps=(1000, 750, 500, 250),  # sigmas 1, 0.75, 0.5, 0.25: the pipeline's own 4-step schedule
        resolution=1024,
        dtype="bfloat16",  # FLUX's activations overflow float16
        loader=_load_hub_pipeline,
        denoiser_loader=_pipeline_denoiser,
        base_repo="black-forest-labs/FLUX.1-schnell",
        licence="Apache-2.0",
        call_kwargs={"max_sequence_length": 256},  # T5 tokens: schnell's limit
    )
)
