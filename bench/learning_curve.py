"""Experiment: held-out residual of the hypernetwork vs the number of training concepts.

Run: python -m bench.learning_curve --data runs/tiny/data --out runs/tiny/curve [--sizes 40,150,300,0] [--steps 1000]
Trains one hypernetwork per size (0 = every training concept but the validation ones) with
the same settings and seed, and reports the final residual ratio on the validation concepts
and on all held-out test concepts (evaluation samples), with each run's training time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet, train_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("runs/tiny/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/tiny/curve"))
    parser.add_argument("--sizes", default="40,150,300,0")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--extra", default="", help="more train-hyper options, space separated")
    args = parser.parse_args()
    quiet()
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        options = ["--steps", str(args.steps), "--eval-every", str(args.steps), *args.extra.split()]
        row = train_run(args.data, args.out / f"train-{size or 'all'}", options + (["--limit-concepts", str(size)] if size else []))
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_curve.json").write_text(json.dumps(results, indent=2))
    print("| training concepts | validation residual | held-out test residual | training time (s) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['train_concepts']} | {r['val_residual']:.3f} | {r['test_residual']:.3f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
