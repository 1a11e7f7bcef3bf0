"""Benchmark: steered vs plain generation on `tiny`, and concept text -> intervention time.

Run: python -m bench.steer
The hypernetwork has the default architecture (hidden 512, rank-64 heads) for `tiny`'s
layers; its weights do not matter for timing. Last line:
steer_overhead=<steered/plain time> concept_to_map_ms=<median ms>
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import paired_ratio, quiet  # noqa: E402


def main() -> None:
    quiet()
    from htcli.generate.steer import generate
    from htcli.methods.hypernetwork import HyperConfig, build_hypernetwork, unbatch
    from htcli.models import get_model, load_pipeline
    from htcli.models.encoders import get_encoder
    from htcli.models.plan import make_plan

    spec = get_model("tiny")
    pipe = load_pipeline(spec)
    encoder = get_encoder(spec.concept_encoder)
    layers = tuple((layer.name, layer.width) for layer in make_plan(spec).layers)
    network = build_hypernetwork(HyperConfig(embed_dim=encoder.dim, layers=layers)).eval()

    def concept_to_maps():
        with torch.no_grad():
            return network(encoder.encode_text(["in the style of Art Deco"]))

    concept_to_maps()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        maps = concept_to_maps()
        times.append((time.perf_counter() - start) * 1e3)
    maps = unbatch(maps)[0]
    seeds = [0, 1, 2, 3]
    t_steer, t_plain, ratio = paired_ratio(
        lambda: generate(spec, pipe, "a lighthouse on a cliff", maps, [0.6], seeds),
        lambda: generate(spec, pipe, "a lighthouse on a cliff", None, [0.6], seeds),
        repeats=15,
    )
    print(f"tiny, 4 images: steered {t_steer * 1e3:.1f} ms, plain {t_plain * 1e3:.1f} ms (ratio {ratio:.3f})")
    print(f"concept text -> maps: median {statistics.median(times):.2f} ms over 20 (MiniLM encode + hypernetwork)")
    print(f"steer_overhead={ratio:.3f} concept_to_map_ms={statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
