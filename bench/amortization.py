"""Benchmark: HyperTransport's one forward pass against per-concept fitting, on held-out concepts.

Run (after building the tiny dataset and training a hypernetwork on it):
    python -m bench.amortization --data runs/tiny/data [--hyper runs/tiny/hyper] [--concepts 0] [--lineas-concepts 40]
        [--json results.json] [--plot residual_vs_similarity.png]
In this one run, on the held-out test concepts (`--concepts 0`: all 167), it fits mean shift
and Linear-AcT, LinEAS (1000 steps, on the first `--lineas-concepts` of them if that is fewer:
it takes ~45 s a concept on 2 cores), evaluates the hypernetwork (concept text -> maps, timed)
and HyperTransport + `--refine` 10 and 50 LinEAS steps from its prediction (on LinEAS's
concepts, which they are compared with), and prints residual
ratios on the evaluation samples, times per concept, the break-even number of concepts, how HT's
residual correlates with each concept's similarity to its nearest training concept, and last:
speed_ratio=<LinEAS fit / HT forward> quality_ratio=<HT / LinEAS residual>
refine50_ratio=<HT+50 / LinEAS residual> refine50_speedup=<LinEAS time / HT+50 time>
(ratios against LinEAS are taken on the concepts LinEAS was fitted on).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("runs/tiny/data"))
    parser.add_argument("--hyper", type=Path, help="checkpoint file or run folder (default: runs/<model>/hyper, else shipped)")
    parser.add_argument("--concepts", type=int, default=0, help="held-out concepts; 0: all")
    parser.add_argument("--lineas-concepts", type=int, default=40, help="LinEAS on the first N of them; 0: all")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="keep the fitted baselines here: a rerun resumes where it stopped")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also plot HT's residual against nearest-training-concept similarity here")
    args = parser.parse_args()
    quiet()
    from htcli.core.files import write_json
    from htcli.data.concepts import load_library
    from htcli.data.dataset import ActivationDataset
    from htcli.data.forward import Frozen
    from htcli.evaluation.plots import plot_residual_vs_similarity
    from htcli.evaluation.residuals import compare, evaluate_hyper
    from htcli.methods.baselines import LineasConfig
    from htcli.methods.fitting import fit_baselines
    from htcli.methods.predict import Predictor, resolve_checkpoint
    from htcli.models import get_model

    data = ActivationDataset(args.data)
    predictor = Predictor.load(resolve_checkpoint(args.hyper, data.settings.model))
    checkpoint = predictor.checkpoint
    spec = get_model(data.settings.model)
    frozen = Frozen.load(spec, data.settings.layers, "cpu")
    names = data.names("test")[: args.concepts or None]
    lineas_names = names[: args.lineas_concepts or None]
    print(f"{len(names)} held-out concepts (LinEAS on {len(lineas_names)} of them)", flush=True)
    keep = {"out": args.out}
    fitted = [fit_baselines(method, frozen, data, names, **keep) for method in ("mean-shift", "linear-act")]
    fitted.append(fit_baselines("lineas", frozen, data, lineas_names, lineas=LineasConfig(steps=args.steps), **keep))
    # Refined maps are compared with LinEAS: on LinEAS's concepts.
    fitted += [fit_baselines("lineas", frozen, data, lineas_names, refine=steps, predictor=predictor, **keep)
               for steps in (10, 50)]
    hyper = evaluate_hyper(predictor, load_library(), frozen, data, names)
    rows = compare(hyper, fitted)
    for row in rows:
        print(f"{row['method']:16s} residual {row['residual_mean']:.3f} +- {row['residual_std'] or 0:.3f}, "
              f"median {row['seconds_median'] * 1e3:.2f} ms/concept", flush=True)

    # Against LinEAS: on the concepts it was fitted on.
    on_lineas = [names.index(name) for name in lineas_names]
    mean = lambda result: statistics.fmean(result.residuals[i] for i in on_lineas)  # noqa: E731
    lineas, refine50 = fitted[2], fitted[4]
    lineas_residual = statistics.fmean(lineas.residuals)
    lineas_seconds, ht_seconds = statistics.median(lineas.seconds), statistics.median(hyper.seconds)
    train_seconds = checkpoint.info.get("train_seconds", float("nan"))
    break_even = train_seconds / (lineas_seconds - ht_seconds)
    print(f"hypernetwork training took {train_seconds:.0f} s on {checkpoint.info.get('train_concepts')} concepts: "
          f"it pays for itself after {break_even:.1f} concepts")
    figures = {
        "speed_ratio": lineas_seconds / ht_seconds,
        "quality_ratio": mean(hyper) / lineas_residual,
        "refine50_ratio": statistics.fmean(refine50.residuals) / lineas_residual,  # on the same concepts
        "refine50_speedup": lineas_seconds / statistics.median(refine50.seconds),
    }
    # Residual against similarity to the nearest training concept: how far the prediction generalises.
    library = load_library()
    similarity = [checkpoint.training_concepts.nearest(predictor.encoder.encode_text([library.resolve(name).phrase]), 1)[0][0][1]
                  for name in names]
    correlation = statistics.correlation(similarity, hyper.residuals) if len(names) > 2 else float("nan")
    print(f"HT residual vs nearest-training similarity: Pearson r = {correlation:.2f} over {len(names)} concepts")
    if args.plot:
        plot_residual_vs_similarity(similarity, hyper.residuals, args.plot,
                                    f"HyperTransport on {len(names)} held-out concepts", checkpoint.training_concepts.threshold,
                                    lineas_residual)
    if args.json:
        per_concept = {result.method: dict(zip(names if len(result.residuals) == len(names) else lineas_names,
                                               result.residuals)) for result in [*fitted, hyper]}
        write_json(args.json, {"concepts": names, "lineas_concepts": lineas_names, "rows": rows, "per_concept": per_concept,
                               "similarity": dict(zip(names, similarity)), "correlation": correlation,
                               "break_even": break_even, **figures})
    print(f"speed_ratio={figures['speed_ratio']:.0f} quality_ratio={figures['quality_ratio']:.3f} "
          f"refine50_ratio={figures['refine50_ratio']:.3f} refine50_speedup={figures['refine50_speedup']:.1f}")


if __name__ == "__main__":
    main()
