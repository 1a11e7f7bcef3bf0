"""Shared fixtures: everything runs offline on the CPU with the tiny models."""

import hashlib
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from htcli.models import get_model, load_pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def _real_weights_by_default(monkeypatch):
    """Every test starts without $HT_RANDOM_WEIGHTS: `--random-weights` sets it in the process
    (for the processes it starts), and a test that passes it must not leave it to the next."""
    monkeypatch.setenv("HT_RANDOM_WEIGHTS", "0")


@pytest.fixture(scope="session")
def random_weights_cache():
    """A cache folder for random full-width weights ($HT_CACHE), removed after the session (a
    pixart file is 1.2 GB)."""
    with tempfile.TemporaryDirectory(prefix="ht-random-weights-") as folder:
        yield folder


@pytest.fixture(scope="session")
def tiny():
    """(spec, pipeline) of the offline tiny PixArt world."""
    spec = get_model("tiny")
    return spec, load_pipeline(spec)


@pytest.fixture(scope="session")
def tiny_sdxl():
    spec = get_model("tiny-sdxl")
    return spec, load_pipeline(spec)


@pytest.fixture(scope="session")
def tiny_flux():
    spec = get_model("tiny-flux")
    return spec, load_pipeline(spec)


def generate(spec, pipe, prompt, seed=0, **kwargs) -> torch.Tensor:
    """Images as a (B, 3, H, W) float tensor (a video model's videos: (B, frames, 3, H, W));
    sample i of a batch uses seed + i."""
    count = len(prompt) if isinstance(prompt, list) else 1
    generator = [torch.Generator().manual_seed(seed + i) for i in range(count)]
    output = pipe(prompt, generator=generator, output_type="pt", **spec.pipeline_kwargs(), **kwargs)
    return output.frames if spec.video else output.images


def random_intervention(spec, pipe, seed: int = 0):
    """An `ht.Intervention` of random non-identity maps at every default hooked layer of the
    spec's denoiser."""
    from htcli.core.hooks import module_width, resolve_layers
    from htcli.models import denoiser
    from htcli.models.interventions import Intervention

    g = torch.Generator().manual_seed(seed)
    maps = {}
    for name, module in resolve_layers(denoiser(pipe, spec), spec.hook_patterns).items():
        width = module_width(module)
        maps[name] = (1 + 0.3 * torch.randn(width, generator=g), 0.3 * torch.randn(width, generator=g))
    return Intervention(maps, spec.id, "lineas", "random")


def build_tiny_dataset(out, train: int, test: int, samples: int = 8, eval_samples: int = 8):
    """A `tiny` dataset of the library's first `train` training and `test` held-out concepts,
    built through `ht build-dataset` (the CLI path users take)."""
    from typer.testing import CliRunner

    from htcli.cli import app
    from htcli.data.concepts import load_library
    from htcli.data.dataset import ActivationDataset

    library = load_library()
    names = [c.name for c in library.targets("train")[:train] + library.targets("test")[:test]]
    args = [arg for name in names for arg in ("--concept", name)]
    result = CliRunner().invoke(app, ["build-dataset", "-m", "tiny", "-o", str(out), *args, "--samples", str(samples),
                                      "--eval-samples", str(eval_samples), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    return ActivationDataset(out)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: `add(repo_id, {path_in_repo: local file}, repo_type)` fills it
    (the layout huggingface_hub writes)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id, files, repo_type="model"):
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        for name, source in files.items():
            target = repo / "snapshots" / commit / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())

    return add
