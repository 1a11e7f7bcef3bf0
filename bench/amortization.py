"""Benchmark: HyperTransport's one forward pass against per-concept fitting, on held-out concepts.

Run (after building the tiny dataset and training a hypernetwork on it):
    python -m bench.amortization --data runs/tiny/data [--hyper runs/tiny/hyper] [--concepts 0] [--lineas-concepts 20]
        [--json results.json] [--plot residual_vs_similarity.png]
In this one run, on the held-out test concepts (`--concepts 0`: all 167), it fits mean shift
and Linear-AcT, LinEAS (1000 steps, on `--lineas-concepts` of them, evenly spaced through the
list, which is ordered by category: it takes minutes a concept on 2 cores), evaluates the hypernetwork (concept text -> maps, timed)
and HyperTransport + `--refine` 10 and 50 LinEAS steps from its prediction (on LinEAS's
concepts, which they are compared with), and times capturing each concept's target
activations from its text (the dataset's N fitting samples, early stop), which every method but
HyperTransport needs before it fits. It prints residual ratios, times per concept from the
concept's text (capture + fit) and fit alone, the break-even number of concepts, how HT's
residual correlates with each concept's similarity to its nearest training concept, and last:
speed_ratio=<LinEAS / HT, from the text> quality_ratio=<HT / LinEAS residual>
refine50_ratio=<HT+50 / LinEAS residual> refine50_speedup=<LinEAS / HT+50 time, from the text>
ht_vs_mean_shift=<HT / mean-shift residual, on every concept>
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
    parser.add_argument("--lineas-concepts", type=int, default=20, help="LinEAS on N of them, evenly spaced; 0: all")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="keep the fitted baselines here: a rerun resumes where it stopped")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also plot HT's residual against nearest-training-concept similarity here")
    args = parser.parse_args()
    quiet()
    from htcli.core.files import write_json
    from htcli.data.build import dataset_builder
    from htcli.data.concepts import load_library
    from htcli.data.dataset import ActivationDataset
    from htcli.data.forward import Frozen
    from htcli.evaluation.plots import plot_residual_vs_similarity
    from htcli.evaluation.residuals import capture_seconds, compare, evaluate_hyper
    from htcli.methods.baselines import LineasConfig
    from htcli.methods.fitting import fit_baselines
    from htcli.methods.predict import Predictor, resolve_checkpoint

    data = ActivationDataset(args.data)
    predictor = Predictor.load(resolve_checkpoint(args.hyper, data.settings.model))
    checkpoint = predictor.checkpoint
    spec = data.spec()  # at the resolution, and on the weights, the dataset was built with
    frozen = Frozen.load(spec, data.settings.layers, "cpu")
    names = data.names("test")[: args.concepts or None]
    # LinEAS on an evenly spaced sample: the held-out list is ordered by category.
    lineas_names = names[:: max(1, len(names) // args.lineas_concepts)][: args.lineas_concepts] if args.lineas_concepts else names
    library = load_library()
    print(f"{len(names)} held-out concepts (LinEAS on {len(lineas_names)} of them)", flush=True)
    keep = {"out": args.out}
    fitted = [fit_baselines(method, frozen, data, names, **keep) for method in ("mean-shift", "linear-act")]
    fitted.append(fit_baselines("lineas", frozen, data, lineas_names, lineas=LineasConfig(steps=args.steps), **keep))
    # Refined maps are compared with LinEAS: on LinEAS's concepts.
    fitted += [fit_baselines("lineas", frozen, data, lineas_names, refine=steps, predictor=predictor, **keep)
               for steps in (10, 50)]
    hyper = evaluate_hyper(predictor, library, frozen, data, names)
    # What every method but HyperTransport pays first: the concept's targets, captured from its text.
    capture = capture_seconds(dataset_builder(data.settings), [library.resolve(name) for name in names])
    rows = compare(hyper, fitted, capture=capture)
    for row in rows[1:]:
        print(f"{row['method']:16s} residual {row['residual_mean']:.3f} +- {row['residual_std'] or 0:.3f}, "
              f"median {row['seconds_total'] * 1e3:.2f} ms/concept from the text, "
              f"{row['seconds_median'] * 1e3:.2f} ms fit alone", flush=True)
    print(f"capturing a concept's {data.fitting_samples()} target samples: median {statistics.median(capture) * 1e3:.1f} ms",
          flush=True)

    # Against LinEAS: on the concepts it was fitted on.
    on_lineas = [names.index(name) for name in lineas_names]
    mean = lambda result: statistics.fmean(result.residuals[i] for i in on_lineas)  # noqa: E731
    mean_shift, lineas, refine50 = fitted[0], fitted[2], fitted[4]
    total = {row["method"]: row["seconds_total"] for row in rows}
    fit_only = {row["method"]: row["seconds_median"] for row in rows}
    lineas_residual = statistics.fmean(lineas.residuals)
    train_seconds = checkpoint.info.get("train_seconds", float("nan"))
    break_even = train_seconds / (total["lineas"] - total["hypertransport"])
    print(f"hypernetwork training took {train_seconds:.0f} s on {checkpoint.info.get('train_concepts')} concepts: "
          f"it pays for itself after {break_even:.1f} concepts")
    print(f"fit alone: LinEAS / HT {fit_only['lineas'] / fit_only['hypertransport']:.0f}x, "
          f"LinEAS / HT+50 {fit_only['lineas'] / fit_only[refine50.method]:.1f}x")
    figures = {
        "speed_ratio": total["lineas"] / total["hypertransport"],
        "quality_ratio": mean(hyper) / lineas_residual,
        "refine50_ratio": statistics.fmean(refine50.residuals) / lineas_residual,  # on the same concepts
        "refine50_speedup": total["lineas"] / total[refine50.method],
        "ht_vs_mean_shift": statistics.fmean(hyper.residuals) / statistics.fmean(mean_shift.residuals),
    }
    # Residual against similarity to the nearest training concept (bare names, as the
    # out-of-distribution check reads them): how far the prediction generalises.
    records = predictor.neighbours([library.resolve(name) for name in names])
    similarity = [r["nearest_training_concepts"][0]["similarity"] for r in records]
    flagged = [r for r in records if r["ood"]]
    correlation = statistics.correlation(similarity, hyper.residuals) if len(names) > 2 else float("nan")
    print(f"HT residual vs nearest-training similarity: Pearson r = {correlation:.2f} over {len(names)} concepts; "
          f"{len(flagged)} of them flagged out of distribution")
    if args.plot:
        plot_residual_vs_similarity(similarity, hyper.residuals, args.plot,
                                    f"HyperTransport on {len(names)} held-out concepts", reference=lineas_residual)
    if args.json:
        per_concept = {result.method: dict(zip(names if len(result.residuals) == len(names) else lineas_names,
                                               result.residuals)) for result in [*fitted, hyper]}
        write_json(args.json, {"concepts": names, "lineas_concepts": lineas_names, "rows": rows, "per_concept": per_concept,
                               "similarity": dict(zip(names, similarity)), "ood": dict(zip(names, (r["ood"] for r in records))),
                               "correlation": correlation,
                               "capture_seconds": dict(zip(names, capture)), "break_even": break_even, **figures})
    print(f"speed_ratio={figures['speed_ratio']:.0f} quality_ratio={figures['quality_ratio']:.3f} "
          f"refine50_ratio={figures['refine50_ratio']:.3f} refine50_speedup={figures['refine50_speedup']:.1f} "
          f"ht_vs_mean_shift={figures['ht_vs_mean_shift']:.3f}")


if __name__ == "__main__":
    main()
