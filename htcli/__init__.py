"""HyperTransport toolkit: steer text-to-image diffusion models by editing activations.

    import htcli as ht
    hyper = ht.HyperTransport.from_pretrained("runs/pixart/hyper")   # or "user/repo" on the Hub
    art_deco = hyper.intervention("art deco")                        # ht.Intervention (+ nearest concepts, OOD flag)
    with ht.apply(pipe, art_deco, strength=0.6):                     # any diffusers pipeline whose denoiser fits
        image = pipe("cyberpunk city").images[0]
    ht.load(pipe, art_deco, name="deco")                             # or kept on the pipeline, like LoRA adapters:
    ht.set_weights(pipe, {"deco": 0.6})                              # ht.active(pipe), ht.unload(pipe)
    ht.Intervention.load("user/repo", weight_name="art_deco.safetensors")

The names below load on first use, so `import htcli` stays cheap. Everything else is importable
from its module (docs/python.md), but these are the way in (`help(ht.apply)` and so on for each):

    HyperTransport      a trained hypernetwork: concept text or reference images -> an Intervention
    Intervention        per-layer affine maps, the model they were made for, and metadata; load, save
    apply               steer a diffusers pipeline until the handle is removed (or its `with` ends)
    load, set_weights   interventions kept on a pipeline under names, weighted, like LoRA adapters;
    active, unload      what is loaded, and taking one or all of them off
    apply_per_prompt    each prompt of one batched pipeline call steered by its own intervention
    load_pipeline       the diffusers pipeline of a model ht knows ("tiny" runs offline)
    get_model           a model's spec (ModelSpec): layers to steer, steps, resolution
    list_models         every model spec ht knows (`ht models`)
    HTError             what every user mistake raises: a ValueError naming the parameter at fault
"""

from importlib import import_module

__version__ = "0.1.0"  # the package version: pyproject.toml reads it from here

_EXPORTS = {
    "HyperTransport": "htcli.api",
    "Intervention": "htcli.models.interventions",
    "apply": "htcli.generate.apply",
    "apply_per_prompt": "htcli.generate.adapters",
    "load": "htcli.generate.adapters",
    "set_weights": "htcli.generate.adapters",
    "active": "htcli.generate.adapters",
    "unload": "htcli.generate.adapters",
    "load_pipeline": "htcli.models",
    "list_models": "htcli.models",
    "get_model": "htcli.models",
    "HTError": "htcli.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'htcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
