"""Benchmark: what gradient checkpointing saves, and what it costs.

Run: python -m bench.checkpointing
Memory: activations kept for backward per 1024-px sample of the real architectures, measured on
the meta device from the shipped configs (`make_plan`; attention counted as fused kernels keep
it), with and without checkpointing. Time: one LinEAS-shaped W2 forward and backward on `tiny`
(32 samples), checkpointed vs plain, measured side by side.
Last line: kept_ratio_pixart=<with/without> kept_ratio_dmd2=<with/without> time_ratio_tiny=<with/without>
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import paired_ratio, quiet  # noqa: E402
from htcli.data.forward import Frozen  # noqa: E402
from htcli.methods.objective import w2_backward  # noqa: E402
from htcli.models import get_model, load_pipeline  # noqa: E402
from htcli.models.plan import human_bytes, make_plan  # noqa: E402
from htcli.models.record import record_call  # noqa: E402


def kept_ratio(model_id: str) -> float:
    spec = get_model(model_id)
    plain, checkpointed = (make_plan(spec, grad_checkpointing=flag).activation_bytes_per_sample for flag in (False, True))
    print(f"{model_id}: kept for backward per sample {human_bytes(plain)} plain, {human_bytes(checkpointed)} "
          f"with checkpointing ({spec.dtype})")
    return checkpointed / plain


def time_ratio() -> float:
    spec = get_model("tiny")
    pipe = load_pipeline(spec)
    inputs = record_call(pipe, spec, [f"a photo of object {i}" for i in range(32)], list(range(32)))
    runs = []
    for flag in (True, False):
        frozen = Frozen.load(spec, spec.hook_patterns, "cpu", "float32", grad_checkpointing=flag)
        maps = {name: (torch.ones(m.normalized_shape[0], requires_grad=True), torch.zeros(m.normalized_shape[0], requires_grad=True))
                for name, m in frozen.layers.items()}
        targets = {name: torch.sort(t, dim=0).values[None] + 0.1 for name, t in frozen.pooled(inputs).items()}
        runs.append(lambda frozen=frozen, maps=maps, targets=targets: w2_backward(frozen, inputs, lambda rows: maps, targets, 1, 0))
    checkpointed, plain, ratio = paired_ratio(*runs, repeats=5)
    print(f"tiny W2 forward+backward, 32 samples: {checkpointed * 1e3:.0f} ms checkpointed, {plain * 1e3:.0f} ms plain")
    return ratio


def main() -> None:
    quiet()
    pixart, dmd2 = kept_ratio("pixart"), kept_ratio("dmd2")
    ratio = time_ratio()
    print(f"kept_ratio_pixart={pixart:.3f} kept_ratio_dmd2={dmd2:.3f} time_ratio_tiny={ratio:.2f}")


if __name__ == "__main__":
    main()
