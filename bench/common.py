"""Timing helpers for the benchmarks: interleaved repeats, medians, ratios measured in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
