"""Benchmark: activation capture with early stop vs a full pipeline call, and bytes on disk.

Run: python -m bench.build_dataset
Both paths produce the same pooled activations for the same prompts and seeds (checked);
the full call encodes, denoises through every block, and decodes with the VAE, as one would
without a capture-aware runner. Last line: capture_vs_full=<ratio> bytes_per_sample_neuron=<x>
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import paired_ratio, quiet  # noqa: E402
from htcli.core.hooks import hooked, resolve_layers  # noqa: E402
from htcli.data.forward import pooled_activations  # noqa: E402
from htcli.models import denoiser, get_model, load_pipeline  # noqa: E402
from htcli.models.record import record_call  # noqa: E402


def main() -> None:
    quiet()
    spec = get_model("tiny")
    pipe = load_pipeline(spec)
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, spec.hook_patterns)
    prompts = [f"a lighthouse on a cliff, in the style of art deco {i}" for i in range(16)]
    seeds = list(range(16))

    def capture():
        inputs = record_call(pipe, spec, prompts, seeds)
        with torch.no_grad():
            return pooled_activations(model, layers, inputs)

    def full():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with hooked(model, layers, capture=True) as run:
            pipe(prompts, generator=generators, output_type="pt", **spec.pipeline_kwargs())
        return run.pooled

    ours, reference = capture(), full()
    for name in layers:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-5, rtol=1e-4)
    t_capture, t_full, ratio = paired_ratio(capture, full, repeats=9)
    print(f"16 samples: capture with early stop {t_capture * 1e3:.1f} ms, full pipeline {t_full * 1e3:.1f} ms")

    from typer.testing import CliRunner

    from htcli.cli import app
    from htcli.data.dataset import ActivationDataset

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data"
        result = CliRunner().invoke(app, ["build-dataset", "-m", "tiny", "-o", str(out), "--limit-concepts", "8"])
        assert result.exit_code == 0, result.output
        data = ActivationDataset(out)
        names = data.names()
        samples = len(data.settings.fit_seeds) + len(data.settings.eval_seeds)
        concept_bytes = sum((out / "concepts" / f"{c['slug']}.safetensors").stat().st_size for c in data.manifest["concepts"])
        per = concept_bytes / (len(names) * samples * sum(data.settings.widths))
        print(f"{len(names)} concepts x {samples} samples x {sum(data.settings.widths)} neurons: {concept_bytes} bytes")
    print(f"capture_vs_full={ratio:.3f} bytes_per_sample_neuron={per:.3f}")


if __name__ == "__main__":
    main()
