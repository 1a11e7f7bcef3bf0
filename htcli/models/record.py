"""Record the call a pipeline makes to its denoiser, then stop the pipeline.

Whatever a pipeline gives its denoiser (latents packed or not, a timestep scaled or not, text
states, masks, pooled embeddings, position ids, guidance, `added_cond_kwargs`), `ht` needs only
to repeat it: the pipeline runs on a batch of prompts and seeds, exactly as `ht steer` runs it,
until its denoiser is called at the chosen denoising step; a forward pre-hook on the denoiser
takes that call's arguments (`htcli.models.call.DenoiserCall`) and stops the pipeline there.

Which tensors hold one row per sample is found by two probes, the pipeline on one prompt and
on two, once per recorder: a tensor whose first dimension doubles is per sample (two rows per
sample: classifier-free guidance batched the unconditional and the conditional halves, and only
the conditional half, the second, is kept); any other tensor is shared by every sample.

    recorder = CallRecorder(pipe, spec)
    call = recorder.record(["a red barn", "a lighthouse"], seeds=[0, 1])   # on the CPU
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from htcli.errors import HTError
from htcli.models.call import DenoiserCall
from htcli.models.spec import ModelSpec, denoiser

PROBE = ("a photograph", "a drawing")  # any text: the probes only count rows


class _Recorded(Exception):
    """Raised by the pre-hook to stop the pipeline once the call is taken."""


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, as `ht steer` seeds its images."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


class CallRecorder:
    """Records `spec`'s pipeline `pipe` calling its denoiser at denoising step `step` (0: the first)."""

    def __init__(self, pipe: Any, spec: ModelSpec, step: int = 0) -> None:
        if not 0 <= step < len(spec.timesteps):
            raise HTError(f"step must be from 0 to {len(spec.timesteps) - 1} (the spec's steps), got {step}")
        self.pipe, self.spec, self.step = pipe, spec, step
        self.model: nn.Module = denoiser(pipe, spec)
        self._layout: dict[str, int | None] | None = None  # key -> rows per sample (None: shared)

    def _arguments(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[tuple, dict]:
        """The arguments of the denoiser's call at `step` when the pipeline runs on `prompts`."""
        taken: list[tuple[tuple, dict]] = []
        calls = [0]
        scheduler = getattr(self.pipe, "scheduler", None)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # The scheduler's step index counts denoising steps (None before the first); a
            # scheduler without one: every call is a step.
            index = getattr(scheduler, "step_index", calls[0]) if scheduler is not None else calls[0]
            calls[0] += 1
            if (index or 0) >= self.step:
                taken.append((args, kwargs))
                raise _Recorded

        handle = self.model.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        try:
            self.pipe(prompt=list(prompts), generator=_generators(seeds), **self.spec.pipeline_kwargs())
        except _Recorded:
            pass
        finally:
            handle.remove()
        if not taken:
            raise HTError(f"the {type(self.pipe).__name__} pipeline never called its denoiser "
                          f"({self.spec.denoiser_attr}) at step {self.step}")
        return taken[0]

    def layout(self) -> dict[str, int | None]:
        """Rows per sample of each tensor of the call (1, or 2 under batched guidance), None for
        a tensor every sample shares: from the probes on one prompt and on two."""
        if self._layout is None:
            one, two = (DenoiserCall.from_arguments(*self._arguments(PROBE[:n], range(n)), lambda key, t: None).shared
                        for n in (1, 2))
            self._layout = {}
            for key, tensor in two.items():
                single = one[key].shape[0] if one[key].ndim else 0
                doubles = tensor.ndim > 0 and tensor.shape[0] == 2 * single and single in (1, 2)
                self._layout[key] = single if doubles else None
        return self._layout

    @torch.no_grad()
    def record(self, prompts: Sequence[str], seeds: Sequence[int],
               device: str | torch.device | None = None) -> DenoiserCall:
        """The denoiser's call at the recorder's step for `prompts` under `seeds` (one each), on
        `device` (None: where the pipeline made it)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        layout, count = self.layout(), len(prompts)

        def per_sample(key: str, tensor: Tensor) -> slice | None:
            if key not in layout:
                raise HTError(f"the pipeline called its denoiser with {key} for {count} prompts but not for one")
            rows = layout[key]
            if rows is None:
                return None
            if tensor.shape[0] != rows * count:
                raise HTError(f"the pipeline gave its denoiser {key} with {tensor.shape[0]} rows for {count} prompts")
            return slice((rows - 1) * count, rows * count)  # the conditional half under guidance

        call = DenoiserCall.from_arguments(*self._arguments(prompts, seeds), per_sample)
        return call if device is None else call.to(device)


def record_call(pipe: Any, spec: ModelSpec, prompts: Sequence[str], seeds: Sequence[int], step: int = 0,
                device: str | torch.device | None = None) -> DenoiserCall:
    """One recording (`CallRecorder`) of the denoiser's call for `prompts` and `seeds`."""
    return CallRecorder(pipe, spec, step).record(prompts, seeds, device)
