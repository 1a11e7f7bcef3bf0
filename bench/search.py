"""Experiment: hypernetwork settings chosen on the validation concepts, never on the test split.

Run: python -m bench.search --data runs/tiny/data --out runs/tiny/search \
         --runs "default: ;steps 3000: --steps 3000;lr 3e-3: --lr 3e-3"
Each run is `name: train-hyper options` (`;`-separated), trained with the same seed into
`out/<name>`. The table reports each run's train-concept residual (a fixed sample of training
concepts, their evaluation samples), its validation residual and its time, sorted by validation
residual: the chosen setting is the first row. Held-out test residuals are written to
search.json but not shown, so that nothing is chosen on them.
Last line: best=<name> val_residual=<its validation residual>
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet, train_run  # noqa: E402


def parse_runs(text: str) -> dict[str, list[str]]:
    """'a: --lr 1e-3; b: --steps 10' -> {'a': ['--lr', '1e-3'], 'b': ['--steps', '10']}."""
    runs = {}
    for part in filter(str.strip, text.split(";")):
        name, _, options = part.partition(":")
        runs[name.strip()] = options.split()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("runs/tiny/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/tiny/search"))
    parser.add_argument("--runs", default="default:")
    args = parser.parse_args()
    quiet()
    results = []
    for name, options in parse_runs(args.runs).items():
        row = {"name": name, "options": " ".join(options), **train_run(args.data, args.out / name.replace(" ", "-"), options)}
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(results, indent=2))
    results.sort(key=lambda r: r["val_residual"])
    print("| run | options | train residual | validation residual | training time (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | `{r['options']}` | {r['train_residual']:.3f} | {r['val_residual']:.3f} | {r['train_seconds']:.0f} |")
    print(f"best={results[0]['name'].replace(' ', '-')} val_residual={results[0]['val_residual']:.3f}")


if __name__ == "__main__":
    main()
