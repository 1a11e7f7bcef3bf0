"""Benchmark: per-concept fit time and held-out residual of each baseline on `tiny`.

Run: python -m bench.baselines [--concepts 3] [--steps 1000]
Builds a small tiny-world dataset (held-out concepts, N = 32 fit and 128 evaluation samples),
fits mean shift, Linear-AcT and LinEAS per concept, and reports median seconds per concept
and the mean residual ratio on the evaluation samples, all in one run.
Last line: lineas_s=<s> linear_act_s=<s> mean_shift_s=<s>
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import quiet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    quiet()
    from typer.testing import CliRunner

    from htcli.cli import app
    from htcli.data.dataset import ActivationDataset
    from htcli.data.forward import Frozen
    from htcli.methods.baselines import LineasConfig
    from htcli.methods.fitting import fit_baselines
    from htcli.models import get_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data"
        names = ["--concept", "ukiyo-e", "--concept", "cyberpunk", "--concept", "watercolor", "--concept", "film noir"]
        result = CliRunner().invoke(app, ["build-dataset", "-m", "tiny", "-o", str(out), *names[: 2 * args.concepts]])
        assert result.exit_code == 0, result.output
        data = ActivationDataset(out)
        spec = get_model("tiny")
        frozen = Frozen.load(spec, data.settings.layers, "cpu")
        medians = {}
        for method in ("mean-shift", "linear-act", "lineas"):
            result = fit_baselines(method, frozen, data, data.names(), lineas=LineasConfig(steps=args.steps))
            seconds, ratios = result.seconds, result.residuals
            medians[method] = statistics.median(seconds)
            print(f"{method:11s} median {medians[method]:.4f} s/concept, held-out residual {statistics.fmean(ratios):.3f} "
                  f"(per concept {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"lineas_s={medians['lineas']:.3f} linear_act_s={medians['linear-act']:.5f} mean_shift_s={medians['mean-shift']:.5f}")


if __name__ == "__main__":
    main()
