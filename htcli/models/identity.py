"""Which model a denoiser is, told from its own architecture: what `ht.apply` checks an
intervention's model against, for pipelines built outside ht.

A denoiser is a spec's when it is of the spec's denoiser class and its diffusers config holds
every architecture value of the spec's shipped config (`htcli.models.spec.denoiser_config`).
Several specs may share an architecture (a distilled model and its base): all of them are
named. A denoiser no spec describes is unknown, and nothing is refused on its account.
"""

from __future__ import annotations

from functools import cache

from torch import nn

from htcli.core.settings import plain
from htcli.models.spec import DENOISERS, denoiser_config, list_models


@cache
def _architectures() -> tuple[tuple[str, str, tuple], ...]:
    """(spec id, denoiser class name, architecture items) of every registered spec."""
    return tuple((spec.id, DENOISERS[spec.family][0],
                  tuple((key, plain(value)) for key, value in denoiser_config(spec).items() if not key.startswith("_")))
                 for spec in list_models())


def model_ids(denoiser: nn.Module) -> list[str]:
    """The ids of the specs whose architecture `denoiser` has; [] when no spec's is (or the module
    has no diffusers config)."""
    config = getattr(denoiser, "config", None)
    if config is None:
        return []
    found = []
    for spec_id, class_name, items in _architectures():
        if type(denoiser).__name__ == class_name and all(plain(config.get(key)) == value for key, value in items):
            found.append(spec_id)
    return found
