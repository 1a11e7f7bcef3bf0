"""Timing helpers for the benchmarks: interleaved repeats, medians, ratios measured in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def quiet() -> None:
    """Silence library progress bars and info logs so the benchmark output stays readable."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(numerator: Callable[[], object], denominator: Callable[[], object], repeats: int = 9) -> tuple[float, float, float]:
    """Median seconds of each and their ratio, alternating the two so drift hits both alike."""
    numerator(), denominator()  # warm up
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((numerator, a), (denominator, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ta, tb = statistics.median(a), statistics.median(b)
    return ta, tb, ta / tb


def train_run(data: Path, out: Path, options: list[str]) -> dict:
    """One `ht train-hyper` run into `out` (replaced); its final train, validation and test
    residuals, training concepts and seconds, from history.json and the checkpoint."""
    import json

    from safetensors import safe_open
    from typer.testing import CliRunner

    from htcli.cli import app

    result = CliRunner().invoke(app, ["train-hyper", "--data", str(data), "--out", str(out), "--overwrite", *options])
    assert result.exit_code == 0, result.output
    final = json.loads((out / "history.json").read_text())[-1]
    with safe_open(str(out / "hyper.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["info"])
    return {"train_concepts": info["train_concepts"], "train_residual": final.get("train_residual"),
            "val_residual": final["val_residual"], "test_residual": final["test_residual"], "train_seconds": final["seconds"]}
