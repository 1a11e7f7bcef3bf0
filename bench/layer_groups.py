"""Benchmark: what each layer group does on `tiny`, measured as residual ratios per block.

Run: python -m bench.layer_groups [--concepts 20] [--method hypertransport|lineas] [--steps 1000]
For each of the first `--concepts` held-out concepts, takes its maps (default: the shipped tiny
hypernetwork's prediction, what `ht steer` uses; or per-concept LinEAS fitted on N = 32 paired
samples), cuts them to one layer group with the rule of `ht steer --layers`
(`htcli.generate.compose.select_layers`) and measures, on 64 other prompts and seeds:
- "block b": the residual W2(steered, target) / W2(source, target) of block b's hooked layers
  (its norm1 and norm2 concatenated) when the source samples are steered at strength 1;
- "all": the same over every hooked layer (the activation-space score);
- "away": steering the *target* samples at strength -1 (the reverse transport), the residual
  W2(steered, source) / W2(target, source) over every hooked layer.
Rows are means over the concepts. `tiny` has random weights conditioned on a real MiniLM text
encoder: this says what its blocks do in activation space, not what a real model's do.
Last line: all=<residual> first_half=<residual> second_half=<residual> away_all=<residual>
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet  # noqa: E402

GROUPS = {  # row label -> `--layers` pattern (None: every layer)
    "all layers": None,
    "blocks 0-1": "transformer_blocks.[01].*",
    "blocks 2-3": "transformer_blocks.[23].*",
    "block 0": "transformer_blocks.0.*",
    "block 1": "transformer_blocks.1.*",
    "block 2": "transformer_blocks.2.*",
    "block 3": "transformer_blocks.3.*",
    "norm1 only": "*.norm1",
    "norm2 only": "*.norm2",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concepts", type=int, default=20, help="held-out concepts (the test split's first)")
    parser.add_argument("--method", choices=("hypertransport", "lineas"), default="hypertransport")
    parser.add_argument("--steps", type=int, default=1000, help="LinEAS steps per concept (--method lineas)")
    parser.add_argument("--samples", type=int, default=32, help="LinEAS fitting samples per concept")
    parser.add_argument("--eval-samples", type=int, default=64)
    args = parser.parse_args()
    quiet()
    import torch

    from htcli.core.hooks import resolve_layers
    from htcli.core.transport import at_strength, residual_ratio
    from htcli.data.concepts import load_library
    from htcli.data.forward import Frozen
    from htcli.generate.compose import select_layers
    from htcli.methods.baselines import LineasConfig, fit_method
    from htcli.methods.predict import Predictor, shipped_checkpoint
    from htcli.models import denoiser, get_model, load_pipeline
    from htcli.models.record import record_call

    spec = get_model("tiny")
    pipe = load_pipeline(spec)
    model = denoiser(pipe, spec)
    frozen = Frozen(spec, model, resolve_layers(model, spec.hook_patterns))
    layers = list(frozen.layers)
    blocks = sorted({name.split(".")[1] for name in layers}, key=int)  # transformer_blocks.<b>.normX
    library = load_library()
    prompts = library.source_prompts()
    n, m = args.samples, args.eval_samples
    fit_prompts, eval_prompts = prompts[:n], prompts[n:n + m]
    fit_seeds, eval_seeds = list(range(n)), list(range(500_000, 500_000 + m))  # disjoint, as datasets use

    def inputs(texts, seeds):
        return record_call(pipe, spec, list(texts), seeds)

    def cat(acts, names):  # (N, sum of D) over `names`
        return torch.cat([acts[name] for name in names], dim=-1)

    if args.method == "hypertransport":
        checkpoint = shipped_checkpoint("tiny")
        predictor = Predictor.load(checkpoint, model="tiny")
        method = f"HyperTransport (shipped {checkpoint.name})"

        def maps_of(concept):
            return predictor.maps([concept])[0]
    else:
        source_fit_in = inputs(fit_prompts, fit_seeds)
        source_fit = frozen.pooled(source_fit_in)
        method = f"LinEAS {args.steps} steps on N = {n} samples"

        def maps_of(concept):
            target_fit = frozen.pooled(inputs([concept.apply(p) for p in fit_prompts], fit_seeds))
            maps, seconds, _ = fit_method("lineas", frozen, source_fit_in, source_fit, target_fit,
                                          LineasConfig(steps=args.steps))
            print(f"{concept.name}: LinEAS in {seconds:.0f} s", flush=True)
            return maps

    source_in = inputs(eval_prompts, eval_seeds)
    source = frozen.pooled(source_in)
    columns = [f"block {b}" for b in blocks] + ["all", "away"]
    rows: dict[str, list[list[float]]] = {label: [] for label in GROUPS}
    concepts = library.targets("test")[: args.concepts]
    for concept in concepts:
        maps = maps_of(concept)
        target_in = inputs([concept.apply(p) for p in eval_prompts], eval_seeds)
        target = frozen.pooled(target_in)
        for label, pattern in GROUPS.items():
            kept = select_layers([layers], [None], [pattern] if pattern else [], [concept.name])[0]
            cut = {name: maps[name] for name in kept}
            steered = frozen.pooled(source_in, cut)
            away = frozen.pooled(target_in, {name: at_strength(o, b, -1.0) for name, (o, b) in cut.items()})
            per_block = []
            for b in blocks:
                names = [name for name in layers if name.split(".")[1] == b]
                per_block.append(residual_ratio(cat(steered, names), cat(source, names), cat(target, names)))
            overall = residual_ratio(cat(steered, layers), cat(source, layers), cat(target, layers))
            reverse = residual_ratio(cat(away, layers), cat(target, layers), cat(source, layers))
            rows[label].append([*per_block, overall, reverse])
    means = {label: [statistics.fmean(column) for column in zip(*values)] for label, values in rows.items()}
    print(f"\ntiny, {method}, {len(concepts)} held-out concepts, {m} evaluation samples each; "
          "residual ratio (1 = no change, 0 = perfect), mean over concepts")
    print("| steered layers (`--layers`) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for label, pattern in GROUPS.items():
        where = f"{label} (`{pattern}`)" if pattern else label
        print(f"| {where} | " + " | ".join(f"{v:.3f}" for v in means[label]) + " |")
    print(f"all={means['all layers'][-2]:.3f} first_half={means['blocks 0-1'][-2]:.3f} "
          f"second_half={means['blocks 2-3'][-2]:.3f} away_all={means['all layers'][-1]:.3f}")


if __name__ == "__main__":
    main()
