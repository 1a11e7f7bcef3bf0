"""Benchmark: peak memory of loading the full-width PixArt-Sigma transformer, old way vs new.

Run: python -m bench.loading
Writes a random-weight float16 safetensors file of `pixart`'s 611M-parameter transformer
(about 1.2 GB, deleted afterwards) and loads it in a fresh process each way:
  old: build it in float32 on the CPU (randomly initialised), load the state dict, cast;
  new: `load_denoiser` (parameters never allocated, the file's tensors assigned as read).
Peak RSS is the process's VmHWM, imports included (their RSS is printed too); both ways must
end with the same weights (checked). Last line: peak_rss_ratio=<new/old> new_gib=<x> old_gib=<y>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import quiet  # noqa: E402
from htcli.models import (  # noqa: E402
    build_meta_denoiser,
    denoiser_class,
    denoiser_config,
    get_model,
    load_denoiser,
)

MODEL = "pixart"
DTYPE = torch.float16


def write_random_weights(path: Path) -> None:
    """A float16 state dict of the model's architecture, drawn one tensor at a time."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state = {
        key: (torch.randn(t.shape, generator=generator) * 0.02).to(DTYPE)
        for key, t in build_meta_denoiser(get_model(MODEL)).state_dict().items()
    }
    save_file(state, str(path))


def _status_gib(field: str) -> float:
    """A memory line of /proc/self/status (in kB) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def load(way: str, path: Path) -> dict:
    """Load the weights in this process the `way` asked; its peak RSS and a weights checksum."""
    spec = get_model(MODEL)
    denoiser_class(spec)  # import the model code before the baseline
    imports = _status_gib("VmRSS")
    start = time.perf_counter()
    if way == "old":  # what htcli did before: a float32 model, then a cast
        from safetensors.torch import load_file

        model = denoiser_class(spec).from_config(denoiser_config(spec))
        model.load_state_dict(load_file(str(path)))
        model = model.to(DTYPE)
    else:
        model = load_denoiser(replace(spec, weights=(str(path),)), "cpu", DTYPE)
    seconds = time.perf_counter() - start
    checksum = sum(p.double().sum().item() for p in model.parameters())
    assert all(t.dtype == DTYPE for t in model.state_dict().values())
    return {"peak_gib": _status_gib("VmHWM"), "imports_gib": imports, "seconds": seconds, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", choices=["old", "new"], help="(internal) load once in this process and report")
    parser.add_argument("--weights", type=Path)
    args = parser.parse_args()
    quiet()
    if args.load:
        print(json.dumps(load(args.load, args.weights)))
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        path = Path(folder) / f"{MODEL}-random-float16.safetensors"
        write_random_weights(path)
        print(f"{MODEL} transformer, random float16 weights: {path.stat().st_size / 2**30:.2f} GiB")
        results = {}
        for way in ("old", "new"):
            command = [sys.executable, "-m", "bench.loading", "--load", way, "--weights", str(path)]
            results[way] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            r = results[way]
            print(f"{way}: peak RSS {r['peak_gib']:.2f} GiB ({r['imports_gib']:.2f} GiB after imports), "
                  f"{r['seconds']:.1f} s")
    assert results["old"]["checksum"] == results["new"]["checksum"], "the two ways loaded different weights"
    new, old = results["new"]["peak_gib"], results["old"]["peak_gib"]
    print(f"peak_rss_ratio={new / old:.3f} new_gib={new:.2f} old_gib={old:.2f}")


if __name__ == "__main__":
    main()
