"""Benchmark: HyperTransport's one forward pass against per-concept fitting, on held-out concepts.

Run (after building the tiny dataset and training a hypernetwork on it):
    python -m bench.amortization --data runs/tiny/data --hyper runs/tiny/hyper [--concepts 20]
In this one run it fits mean shift, Linear-AcT and LinEAS (1000 steps) on the first held-out
test concepts, evaluates the hypernetwork on the same concepts (concept text -> maps, timed),
and prints residual ratios on the evaluation samples, times per concept, the break-even
number of concepts, and last:
speed_ratio=<LinEAS fit / HT forward> quality_ratio=<HT / LinEAS held-out residual>
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
    parser.add_argument("--hyper", type=Path, default=Path("runs/tiny/hyper"))
    parser.add_argument("--concepts", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    quiet()
    from htcli.core.files import write_json
    from htcli.data.concepts import load_library
    from htcli.data.dataset import ActivationDataset
    from htcli.data.forward import Frozen
    from htcli.evaluation.residuals import compare, evaluate_hyper
    from htcli.methods.baselines import LineasConfig
    from htcli.methods.fitting import fit_baselines
    from htcli.methods.predict import Predictor
    from htcli.models import get_model

    data = ActivationDataset(args.data)
    predictor = Predictor.load(args.hyper / "hyper.safetensors")
    checkpoint = predictor.checkpoint
    spec = get_model(data.settings.model)
    frozen = Frozen.load(spec, data.settings.layers, "cpu")
    names = data.names("test")[: args.concepts]
    baselines = []
    for method in ("mean-shift", "linear-act", "lineas"):
        result = fit_baselines(method, frozen, data, names, lineas=LineasConfig(steps=args.steps))
        baselines.append(result)
        print(f"{method:14s} residual {statistics.fmean(result.residuals):.3f} +- {statistics.stdev(result.residuals):.3f}, "
              f"median {statistics.median(result.seconds):.4f} s/concept", flush=True)
    hyper = evaluate_hyper(predictor, load_library(), frozen, data, names)
    rows = compare(hyper, baselines)
    ht, lineas = rows[-1], next(r for r in rows if r["method"] == "lineas")
    print(f"{'hypertransport':14s} residual {ht['residual_mean']:.3f} +- {ht['residual_std']:.3f}, "
          f"median {ht['seconds_median'] * 1e3:.2f} ms/concept (text -> maps)")
    train_seconds = checkpoint.info.get("train_seconds", float("nan"))
    break_even = train_seconds / (lineas["seconds_median"] - ht["seconds_median"])
    print(f"{len(names)} held-out concepts; hypernetwork training took {train_seconds:.0f} s on "
          f"{checkpoint.info.get('train_concepts')} concepts: it pays for itself after {break_even:.1f} concepts")
    speed, quality = lineas["seconds_median"] / ht["seconds_median"], ht["residual_mean"] / lineas["residual_mean"]
    if args.json:
        write_json(args.json, {"concepts": names, "rows": rows, "break_even": break_even,
                                "speed_ratio": speed, "quality_ratio": quality})
    print(f"speed_ratio={speed:.0f} quality_ratio={quality:.3f}")


if __name__ == "__main__":
    main()
