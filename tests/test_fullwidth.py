"""The real architectures at full width through the whole CLI, on random weights (`--random-weights`).

Minutes per model on a CPU and several GiB each, so these are not in the default suite (pyproject's
addopts exclude the `fullwidth` marker; tests/test_random_weights.py runs `pixart`'s chain at 64 px
there). Run them, one process at a time, with:

    python -m pytest -m fullwidth tests/test_fullwidth.py

Each command runs as `python -m htcli ...` in a process of its own, as a user runs it; its wall
time and peak RSS are printed. $HT_CACHE, if set, keeps the drawn weights between runs (pixart
1.2 GB, dmd2 5.1 GB, flux-schnell's first 2 + 2 blocks 2 GB).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from htcli.data.concepts import load_library
from htcli.data.dataset import ActivationDataset
from htcli.models import get_model, load_pipeline

pytestmark = pytest.mark.fullwidth
NOTE = "random weights (--random-weights)"
# Run by the child: report the process's peak RSS (VmHWM, kB) on stderr as it exits.
LAUNCH = ("import atexit, sys, pathlib\n"
          "status = pathlib.Path('/proc/self/status')\n"
          "atexit.register(lambda: print('PEAK_KB', [l for l in status.read_text().splitlines()"
          " if l.startswith('VmHWM')][0].split()[1], file=sys.stderr))\n"
          "sys.argv = ['ht', *sys.argv[1:]]\n"
          "from htcli.cli import main\n"
          "main()\n")


@pytest.fixture
def ht(tmp_path, random_weights_cache, capsys, request):
    """Run `ht ARGS` in a fresh process with random weights; print its seconds and peak RSS."""
    env = {**os.environ, "HT_RUNS": str(tmp_path / "runs"), "HT_CACHE": os.environ.get("HT_CACHE") or random_weights_cache}
    env.pop("HT_RANDOM_WEIGHTS", None)  # each command passes --random-weights itself

    def run(*args, extra_env=None) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LAUNCH, *map(str, args), "--random-weights"], text=True,
                              capture_output=True, env=env | (extra_env or {}))
        seconds = time.perf_counter() - start
        assert done.returncode == 0, done.stderr[-3000:]
        assert NOTE in done.stderr
        peak = int(done.stderr.split("PEAK_KB")[-1].split()[0]) / 2**20
        with capsys.disabled():
            print(f"\n  fullwidth: ht {args[0]} ({request.node.name}): {seconds:.0f} s, peak RSS {peak:.2f} GiB")
        return done

    return run


def _train_concepts(count: int) -> list[str]:
    return [c.name for c in load_library().targets("train")[:count]]


def test_pixart_at_256_px_build_lineas_train_steer(ht, tmp_path, monkeypatch, random_weights_cache):
    """`pixart` (28 blocks of width 1152, 611M parameters) at 256 px: LinEAS and training in
    bfloat16 with gradient checkpointing (training in micro-batches of 2); both losses fall, and
    strength 0 is the unsteered image bit for bit."""
    a, b = _train_concepts(2)
    data, hyper, out = tmp_path / "data", tmp_path / "hyper", tmp_path / "steer"
    ht("build-dataset", "-m", "pixart", "--resolution", 256, "-c", a, "-c", b, "--samples", 4, "--eval-samples", 4,
       "-o", data)
    assert len(ActivationDataset(data).source_inputs("fit")) == 4
    ht("fit-linear-baselines", "--data", data, "--method", "lineas", "--steps", 3, "--dtype", "bfloat16",
       "--grad-checkpointing", "--split", "all", "-o", tmp_path / "baselines")
    rows = json.loads((tmp_path / "baselines" / "lineas" / "summary.json").read_text())["concepts"]
    assert len(rows) == 2 and all(row["loss_last"] < row["loss_first"] for row in rows.values())
    ht("train-hyper", "--data", data, "--steps", 2, "--concepts-per-step", 2, "--micro-batch", 2, "--dtype", "bfloat16",
       "--grad-checkpointing", "--eval-every", 1, "--val-fraction", 0, "-o", hyper)
    losses = [entry["loss"] for entry in json.loads((hyper / "history.json").read_text())]
    assert len(losses) == 2 and losses[1] < losses[0]
    ht("steer", "a lighthouse", "-m", "pixart", "--resolution", 256, "--hyper", hyper, "-c", a, "--strength", "0,1",
       "-o", out)
    zero, one = (np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png")))
    monkeypatch.setenv("HT_RANDOM_WEIGHTS", "1")
    monkeypatch.setenv("HT_CACHE", os.environ.get("HT_CACHE") or random_weights_cache)
    spec = get_model("pixart").at_resolution(256)
    unsteered = load_pipeline(spec)("a lighthouse", generator=[torch.Generator().manual_seed(0)],
                                    **spec.pipeline_kwargs()).images[0]
    assert np.array_equal(zero, np.asarray(unsteered)) and not np.array_equal(one, zero)


# model -> (its block cap, the hooked layers that leaves)
CAPTURED = {"dmd2": (None, 210), "flux-schnell": (2, 4), "flux-dev": (2, 4), "sd35-medium": (2, 2), "sana": (2, 4),
            "wan-t2v": (2, 6)}


@pytest.mark.parametrize("model", CAPTURED)
def test_capture_and_one_training_step(ht, tmp_path, model):
    """`dmd2` (the SDXL UNet, 2.6B parameters) at full size; the transformers at full width with
    their first 2 blocks of each kind (`flux-schnell`'s and `flux-dev`'s 12B parameters do not
    fit here; the others are capped alike to keep minutes, not hours; `wan-t2v` makes its 81
    frames): capture at 256 px, then one training step in bfloat16 with checkpointing."""
    blocks, hooked = CAPTURED[model]
    extra = {"HT_RANDOM_BLOCKS": str(blocks)} if blocks else {}
    data, hyper = tmp_path / "data", tmp_path / "hyper"
    (concept,) = _train_concepts(1)
    ht("build-dataset", "-m", model, "--resolution", 256, "-c", concept, "--samples", 2, "--eval-samples", 2, "-o", data,
       extra_env=extra)
    layers = ActivationDataset(data).settings.layers
    assert len(layers) == hooked
    ht("train-hyper", "--data", data, "--steps", 1, "--concepts-per-step", 1, "--micro-batch", 1, "--dtype", "bfloat16",
       "--grad-checkpointing", "--val-fraction", 0, "-o", hyper, extra_env=extra)
    (entry,) = json.loads((hyper / "history.json").read_text())
    assert entry["step"] == 1 and np.isfinite(entry["loss"]) and Path(hyper / "hyper.safetensors").is_file()
