"""A denoiser's call as its pipeline made it: the arguments, stored and replayed.

`htcli.models.record` records the call a pipeline makes to its denoiser at one denoising step;
this module holds it. A `DenoiserCall` keeps the call's structure (positional and keyword
arguments, nested dicts and lists such as SDXL's `added_cond_kwargs`, non-tensor values such as
`return_dict=False` or `None`) and its tensors under flattened keys ("kwargs.hidden_states",
"kwargs.added_cond_kwargs.time_ids", "args.0"). Tensors with one row per sample are batch-first
(`rows`); the others (FLUX's `img_ids`, SDXL's 0-dim timestep) are shared by every sample
(`shared`) and stored once. So a call is sliced, repeated and concatenated along its samples,
saved as safetensors plus a JSON structure, and replayed:

    call = record_call(pipe, spec, prompts, seeds)     # htcli.models.record
    out = call[:4].replay(denoiser)                    # the first 4 samples, as the pipeline ran them
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from htcli.errors import HTError

# A leaf of the structure: {"tensor": key} for a per-sample tensor, {"shared": key} for a
# tensor shared by every sample, {"value": v} for anything JSON holds.
Structure = Any
_SCALARS = (type(None), bool, int, float, str)


@dataclass
class DenoiserCall:
    """One call of a denoiser on a batch of samples (see the module docstring)."""

    structure: dict[str, Structure]  # {"args": [...], "kwargs": {...}}
    rows: dict[str, Tensor]  # flattened key -> (N, ...) tensor, one row per sample
    shared: dict[str, Tensor]  # flattened key -> tensor used as it is by every sample

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0] if self.rows else 0

    def __getitem__(self, rows: slice | Tensor) -> DenoiserCall:
        """The samples `rows` (a slice or an index tensor) of the call."""
        return DenoiserCall(self.structure, {k: v[rows] for k, v in self.rows.items()}, self.shared)

    def repeat(self, times: int) -> DenoiserCall:
        """The call's samples `times` over, one copy after the other (K concepts x N samples)."""
        return DenoiserCall(self.structure, {k: v.repeat(times, *([1] * (v.ndim - 1))) for k, v in self.rows.items()},
                            self.shared)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> DenoiserCall:
        """The call on `device`, floating-point tensors in `dtype` if given (ids, masks and
        integer timesteps keep theirs)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return DenoiserCall(self.structure, {k: move(v) for k, v in self.rows.items()},
                            {k: move(v) for k, v in self.shared.items()})

    def arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """(args, kwargs) to call the denoiser with."""
        return (_build(self.structure["args"], self.rows, self.shared),
                _build(self.structure["kwargs"], self.rows, self.shared))

    def replay(self, model: nn.Module) -> Any:
        """Call `model` with the call's arguments, moved to its device and its dtype; returns
        what the model returns."""
        args, kwargs = self.to(model.device, model.dtype).arguments()
        return model(*args, **kwargs)

    def tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Every tensor under `prefix` + "rows." or "shared." + its key, for a safetensors file."""
        return ({f"{prefix}rows.{k}": v.contiguous() for k, v in self.rows.items()}
                | {f"{prefix}shared.{k}": v.contiguous() for k, v in self.shared.items()})

    def structure_json(self) -> str:
        return json.dumps(self.structure, sort_keys=True)

    @classmethod
    def from_tensors(cls, structure: str | dict, tensors: Mapping[str, Tensor], prefix: str = "") -> DenoiserCall:
        """The call `tensors` (as `tensors(prefix)` wrote them) and its structure (JSON) hold."""
        structure = json.loads(structure) if isinstance(structure, str) else structure
        rows, shared = {}, {}
        for key, value in tensors.items():
            if key.startswith(f"{prefix}rows."):
                rows[key[len(prefix) + 5:]] = value
            elif key.startswith(f"{prefix}shared."):
                shared[key[len(prefix) + 7:]] = value
        missing = sorted(set(_keys(structure)) - set(rows) - set(shared))
        if missing:
            raise HTError(f"a stored denoiser call lacks its tensors {missing[:3]}; rebuild the file that holds it")
        return cls(structure, rows, shared)

    @classmethod
    def from_arguments(cls, args: Sequence[Any], kwargs: Mapping[str, Any], per_sample: Any) -> DenoiserCall:
        """The call of `args` and `kwargs`; `per_sample(key, tensor)` says which rows of a tensor
        belong to the samples: a slice or index tensor of its first dimension, or None for a tensor
        every sample shares."""
        rows: dict[str, Tensor] = {}
        shared: dict[str, Tensor] = {}

        def flatten(value: Any, key: str) -> Structure:
            if isinstance(value, Tensor):
                chosen = per_sample(key, value)
                if chosen is None:
                    shared[key] = value.detach()
                    return {"shared": key}
                rows[key] = value.detach()[chosen].clone()
                return {"tensor": key}
            if isinstance(value, Mapping):
                return {"dict": {str(k): flatten(v, f"{key}.{k}") for k, v in value.items()}}
            if isinstance(value, (list, tuple)):
                return {"list": [flatten(v, f"{key}.{i}") for i, v in enumerate(value)]}
            if isinstance(value, _SCALARS):
                return {"value": value}
            raise HTError(f"the denoiser is called with {key}, a {type(value).__name__}, which ht cannot store; "
                          "only tensors, numbers, strings, None and dicts or lists of them")

        structure = {"args": flatten(list(args), "args"), "kwargs": flatten(dict(kwargs), "kwargs")}
        return cls(structure, rows, shared)


def cat_calls(calls: Sequence[DenoiserCall]) -> DenoiserCall:
    """The samples of `calls` (each recorded like the first: same structure and shared tensors),
    one after the other."""
    first = calls[0]
    for call in calls[1:]:
        if call.structure != first.structure or call.shared.keys() != first.shared.keys() or any(
                not torch.equal(call.shared[k], first.shared[k]) for k in first.shared):
            raise HTError("the pipeline called its denoiser differently for two batches of prompts (other arguments, "
                          "or other shared tensors); build with one batch: batch_size= at least samples=")
        for key, value in call.rows.items():
            if value.shape[1:] != first.rows[key].shape[1:]:
                raise HTError(f"the pipeline gave its denoiser {key} of shape {tuple(value.shape[1:])} for one batch "
                              f"and {tuple(first.rows[key].shape[1:])} for another (it pads text per batch); build "
                              "with one batch: batch_size= at least samples=")
    return DenoiserCall(first.structure, {k: torch.cat([c.rows[k] for c in calls]) for k in first.rows}, first.shared)


def _build(node: Structure, rows: Mapping[str, Tensor], shared: Mapping[str, Tensor]) -> Any:
    if "tensor" in node:
        return rows[node["tensor"]]
    if "shared" in node:
        return shared[node["shared"]]
    if "dict" in node:
        return {k: _build(v, rows, shared) for k, v in node["dict"].items()}
    if "list" in node:
        return [_build(v, rows, shared) for v in node["list"]]
    return node["value"]


def _keys(node: Structure) -> list[str]:
    """The tensor keys a structure names."""
    if isinstance(node, dict) and ("tensor" in node or "shared" in node):
        return [node.get("tensor") or node["shared"]]
    if "args" in node:
        children = [node["args"], node["kwargs"]]
    else:
        children = node["dict"].values() if "dict" in node else node.get("list", [])
    return [key for child in children for key in _keys(child)]
