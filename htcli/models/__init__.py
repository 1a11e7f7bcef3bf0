"""Model specs: how to load each diffusion model, which modules to hook, and how to sample.

A spec is data (`ModelSpec`) plus a loader. The denoiser architectures ship as JSON configs in
`configs/`, so every model, real or tiny, can be built on the meta device without weights:

    spec = get_model("pixart")
    denoiser = build_meta_denoiser(spec)   # 28 blocks of width 1152, no memory, no download
    pipe = load_pipeline(spec)             # the real thing (downloads from the Hub, or cache)

The spec type and registry live in `spec.py`; importing this package registers the real
models (`pretrained.py`), the offline tiny ones (`tiny.py`), the real models' random-weights
variants (`random_weights.py`, for `--random-weights`) and the specs derived from pipeline
folders (`folder.py`).
"""

from htcli.models import folder as _folder  # noqa: E402,F401  (derives specs from pipeline folders)
from htcli.models import pretrained as _pretrained  # noqa: E402,F401  (registers pixart, dmd2, flux-schnell)
from htcli.models import pretrained_recent as _recent  # noqa: E402,F401  (registers sd35-medium, sana, flux-dev, wan-t2v)
from htcli.models import random_weights as _random  # noqa: E402,F401  (registers the random-weights variants)
from htcli.models import tiny as _tiny  # noqa: E402,F401  (registers tiny, tiny-sdxl, tiny-flux)
from htcli.models.spec import (
    CONFIG_DIR,
    DENOISERS,
    DTYPES,
    ModelSpec,
    build_meta_denoiser,
    default_model_name,
    denoiser,
    denoiser_class,
    denoiser_config,
    get_model,
    list_models,
    load_denoiser,
    load_pipeline,
    register,
)

__all__ = ["CONFIG_DIR", "DENOISERS", "DTYPES", "ModelSpec", "build_meta_denoiser", "default_model_name", "denoiser",
           "denoiser_class", "denoiser_config", "get_model", "list_models", "load_denoiser", "load_pipeline", "register"]
