"""Benchmark: our batched W2 loss vs POT, and the overhead of steering hooks on `tiny`.

Run: python -m bench.transport
Prints ratios measured side by side in this run (absolute times vary between machines).
Last line: w2_vs_pot=<ours/POT time> hook_overhead=<steered/plain time>
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import ot  # noqa: E402
import torch  # noqa: E402

from bench.common import paired_ratio, quiet  # noqa: E402
from htcli.core.hooks import Steering, hooked, module_width, resolve_layers  # noqa: E402
from htcli.core.transport import w2_per_neuron  # noqa: E402
from htcli.models import denoiser, get_model, load_pipeline  # noqa: E402

D = 32_256  # PixArt's block width 1152 x 28 blocks


def bench_w2() -> float:
    ratios = []
    for n in (32, 128):
        g = torch.Generator().manual_seed(n)
        x, y = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g) + 1
        xn, yn = x.numpy(), y.numpy()
        np.testing.assert_allclose(w2_per_neuron(x, y).numpy(), ot.wasserstein_1d(xn, yn, p=2), rtol=1e-4)
        ours, pot, ratio = paired_ratio(lambda: w2_per_neuron(x, y), lambda: ot.wasserstein_1d(xn, yn, p=2))
        print(f"W2 N={n} D={D}: ours {ours * 1e3:.2f} ms, POT {pot * 1e3:.2f} ms, ratio {ratio:.3f}")
        ratios.append(ratio)
    return float(np.exp(np.mean(np.log(ratios))))  # geometric mean over N


def bench_hooks() -> float:
    spec = get_model("tiny")
    pipe = load_pipeline(spec)
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, spec.hook_patterns)
    maps = {n: (torch.full((module_width(m),), 1.1), torch.full((module_width(m),), 0.1)) for n, m in layers.items()}
    prompts = ["a lighthouse on a cliff"] * 4

    def plain():
        pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="pt", **spec.pipeline_kwargs())

    def steered():
        with hooked(model, layers, steering=Steering(maps, strength=0.6)):
            plain()

    ours, base, ratio = paired_ratio(steered, plain, repeats=15)
    print(f"tiny generation (batch 4): steered {ours * 1e3:.1f} ms, plain {base * 1e3:.1f} ms, ratio {ratio:.3f}")
    return ratio


def main() -> None:
    quiet()
    torch.manual_seed(0)
    w2 = bench_w2()
    hooks = bench_hooks()
    print(f"w2_vs_pot={w2:.3f} hook_overhead={hooks:.3f}")


if __name__ == "__main__":
    main()
