"""The recent families (SD3.5, SANA, FLUX.1-dev, Wan 2.1 video): their specs on the meta device,
and the offline `tiny-sd3`, `tiny-sana`, `tiny-wan` pipelines steered by `ht steer` and `ht.apply`.

The tiny pipelines are the real pipeline classes around small random modules: their images (and
`tiny-wan`'s 5-frame videos) are noise, so these tests check code paths, never steering quality.
"""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_intervention
from PIL import Image, ImageSequence
from typer.testing import CliRunner

import htcli as ht
from htcli.cli import app
from htcli.core.hooks import module_width, resolve_layers
from htcli.generate.steer import SteerRequest
from htcli.generate.video import Video
from htcli.models import build_meta_denoiser, get_model, load_pipeline
from htcli.serve.service import FieldError, Limits, Service

runner = CliRunner()
PROMPT, SEED = "a lighthouse on a cliff", 5
TINY = ["tiny-sd3", "tiny-sana", "tiny-wan"]


@pytest.fixture(scope="module")
def pipelines():
    return {name: (get_model(name), load_pipeline(name)) for name in TINY}


# (layers, neurons, denoiser parameters) of the hook points found in the shipped configs' denoisers.
REAL = {"sd35-medium": (24, 36_864, 2_243_171_520), "sana": (40, 89_600, 1_604_462_752),
        "flux-dev": (57, 175_104, 11_901_408_320), "wan-t2v": (90, 138_240, 1_418_996_800)}


@pytest.mark.parametrize("name", REAL)
def test_real_specs_build_on_the_meta_device(name):
    spec = get_model(name)
    model = build_meta_denoiser(spec)
    layers = resolve_layers(model, spec.hook_patterns)
    count = (len(layers), sum(module_width(m) for m in layers.values()), sum(p.numel() for p in model.parameters()))
    assert count == REAL[name]
    assert spec.licence and spec.base_repo and spec.schedule == "steps" and len(spec.timesteps) >= 20
    assert "timesteps" not in spec.pipeline_kwargs() and "sigmas" not in spec.pipeline_kwargs()


def test_flux_dev_takes_the_guidance_input_schnell_has_not():
    dev, schnell = (build_meta_denoiser(get_model(name)) for name in ("flux-dev", "flux-schnell"))
    assert dev.config.guidance_embeds and not schnell.config.guidance_embeds
    assert get_model("flux-dev").guidance_scale == 3.5 and "Non-Commercial" in get_model("flux-dev").licence


def _pixels(item) -> np.ndarray:
    """An image as an (H, W, 3) array, a video as (frames, H, W, 3)."""
    frames = item.frames if isinstance(item, Video) else [item]
    return np.stack([np.asarray(f.convert("RGB")) for f in frames]).squeeze(0) if len(frames) == 1 else \
        np.stack([np.asarray(f.convert("RGB")) for f in frames])


def _read(path) -> np.ndarray:
    with Image.open(path) as file:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(file)]
    return frames[0] if len(frames) == 1 else np.stack(frames)


def _generate(spec, pipe):
    """As a user would: `.images[0]`, or a video's `.frames[0]` asked for as PIL frames."""
    if spec.video:
        output = pipe([PROMPT], generator=[torch.Generator().manual_seed(SEED)], output_type="pil",
                      **spec.pipeline_kwargs())
        return Video(tuple(output.frames[0]))
    return pipe([PROMPT], generator=[torch.Generator().manual_seed(SEED)], **spec.pipeline_kwargs()).images[0]


@pytest.mark.parametrize("model", TINY)
def test_apply_makes_what_ht_steer_makes(pipelines, tmp_path, model):
    """`ht steer` with an intervention file writes what `ht.apply` on the same pipeline makes,
    bit for bit: an image (PNG), or a video's every frame (lossless animated WebP)."""
    spec, pipe = pipelines[model]
    file = random_intervention(spec, pipe).save(tmp_path / "maps.safetensors")
    out = tmp_path / "steered"
    result = runner.invoke(app, ["steer", PROMPT, "--model", model, "--seed", str(SEED), "--out", str(out),
                                 "-i", str(file), "--strength", "0.7"])
    assert result.exit_code == 0, result.output
    (written,) = out.glob("0*.webp" if spec.video else "0*.png")
    assert written.with_suffix(".json").is_file()
    with ht.apply(pipe, ht.Intervention.load(file), strength=0.7):
        steered = _pixels(_generate(spec, pipe))
    assert np.array_equal(_read(written), steered)
    assert not np.array_equal(_pixels(_generate(spec, pipe)), steered)  # the maps did steer
    if spec.video:
        assert steered.shape == (5, 128, 128, 3)  # tiny-wan's 5 frames


def test_a_video_sweep_writes_videos_a_grid_and_sidecars(pipelines, tmp_path):
    spec, pipe = pipelines["tiny-wan"]
    file = random_intervention(spec, pipe).save(tmp_path / "maps.safetensors")
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["steer", PROMPT, "--model", "tiny-wan", "--out", str(out), "-i", str(file),
                                 "--strength", "0,1"])
    assert result.exit_code == 0, result.output
    videos = sorted(out.glob("0*.webp"))
    assert len(videos) == 2 and all(v.with_suffix(".json").is_file() for v in videos)
    unsteered, steered = (_read(v) for v in videos)
    assert unsteered.shape[0] == 5 and (unsteered != steered).any()
    grid = _read(out / "grid.webp")
    assert grid.shape[0] == 5 and grid.shape[2] == 2 * 128  # one grid per frame, the two videos side by side


def test_serve_refuses_a_video_model_in_one_line():
    service = SimpleNamespace(spec=get_model("tiny-wan"), limits=Limits())
    with pytest.raises(FieldError, match="tiny-wan makes videos.*ht steer") as error:
        Service.check(service, SteerRequest(PROMPT))
    assert "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("htcli.models.record") is None,
                    reason="needs the recorded denoiser call (htcli.models.record): these families have no input code")
@pytest.mark.parametrize("model", TINY)
def test_through_the_whole_cli(tmp_path, monkeypatch, model):
    """build-dataset, fit-linear-baselines, train-hyper, steer and evaluate on each tiny pipeline,
    each finding the previous one's output under runs/MODEL/ (the denoiser's call recorded from
    the pipeline itself, classifier-free guidance and video frames included)."""
    monkeypatch.setenv("HT_RUNS", str(tmp_path))
    spec = get_model(model)

    def invoke(*args):
        result = runner.invoke(app, [*args, "--model", model])
        assert result.exit_code == 0, result.output
        return result

    invoke("build-dataset", "--limit-concepts", "2", "--samples", "4", "--eval-samples", "4")
    run = tmp_path / model
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert len(manifest["settings"]["layers"]) == len(resolve_layers(build_meta_denoiser(spec), spec.hook_patterns))
    invoke("fit-linear-baselines", "--method", "mean-shift", "--split", "all")
    assert len(list((run / "baselines" / "mean-shift").glob("*.safetensors"))) == 2
    invoke("train-hyper", "--steps", "3")
    invoke("steer", "a lighthouse", "--concept", "art deco", "--strength", "0,1")
    written = sorted((run / "generations").glob(f"*/*-seed0{'.webp' if spec.video else '.png'}"))
    unsteered, steered = (_read(p) for p in written)
    assert (unsteered != steered).any()  # strength 0 is the unhooked pipeline; 1 moves it
    invoke("evaluate", "--split", "all", "--limit-concepts", "1", "--prompts", "1", "--seeds", "1")
    files = [r["file"] for r in json.loads(next((run / "eval").glob("*/index.json")).read_text())["records"]]
    assert files and all(f.endswith(".webp" if spec.video else ".png") for f in files)
