"""Any diffusers pipeline by its folder: a spec derived from the pipeline's own defaults
(`htcli.models.folder`), through the whole CLI and `ht.apply`, on small random pipelines of two
families ht ships no spec for (AuraFlow: MMDiT joint and single blocks, batched guidance;
CogView4: guidance as a second call), saved with `save_pretrained`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import htcli as ht
from htcli.cli import app
from htcli.errors import HTError
from htcli.models import get_model, load_pipeline
from tests.foreign_pipelines import save_pipeline

PROMPT = "a lighthouse on a cliff"
# AuraFlow's call defaults to 1024 px and 50 steps: the id's query overrides them.
QUERIES = {"auraflow": "?steps=2&resolution=64", "cogview4": "?steps=2"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(family, root / family) for family in QUERIES}


def test_the_spec_comes_from_the_pipelines_own_defaults(folders):
    aura = get_model(f"{folders['auraflow']}{QUERIES['auraflow']}")
    assert aura.denoiser_type == ("AuraFlowTransformer2DModel", "transformer") and aura.family == "AuraFlowPipeline"
    assert (len(aura.timesteps), aura.resolution, aura.guidance_scale, aura.dtype) == (2, 64, 3.5, "float32")
    assert aura.hook_patterns == (r"re:joint_transformer_blocks\.\d+\.norm2", r"re:single_transformer_blocks\.\d+\.norm2")
    cog = get_model(str(folders["cogview4"]))
    assert (len(cog.timesteps), cog.resolution, cog.guidance_scale) == (50, 64, 5.0)  # 8 latent patches x VAE's 8
    assert cog.concept_encoder == "minilm" and get_model(cog.id) is cog


def test_folders_that_are_not_text_to_image_pipelines_are_refused(folders, tmp_path):
    with pytest.raises(HTError, match="is not a diffusers pipeline folder: it has no model_index.json"):
        get_model(str(tmp_path))
    index = json.loads((folders["cogview4"] / "model_index.json").read_text())
    for change, message in (({"_class_name": "StableDiffusionImg2ImgPipeline"}, "not a text-to-image .* takes image"),
                            ({"transformer": [None, None]}, "names no denoiser")):
        folder = tmp_path / message[:8].strip()
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps(index | change))
        with pytest.raises(HTError, match=message):
            get_model(str(folder))
    with pytest.raises(HTError, match="unknown setting 'step'"):
        get_model(f"{folders['cogview4']}?step=2")


@pytest.mark.parametrize("family", list(QUERIES))
def test_a_pipeline_folder_through_the_whole_cli_and_apply(folders, family, tmp_path, monkeypatch):
    monkeypatch.setenv("HT_RUNS", str(tmp_path / "runs"))
    model = f"{folders[family]}{QUERIES[family]}"
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [*args, "--model", model])
        assert result.exit_code == 0, result.output
        return result

    data = tmp_path / "data"
    invoke("build-dataset", "--limit-concepts", "2", "--samples", "4", "--eval-samples", "2", "--batch-size", "4",
           "-o", str(data))
    baselines = tmp_path / "baselines"
    invoke("fit-linear-baselines", "--data", str(data), "--method", "linear-act", "--split", "all", "-o", str(baselines))
    invoke("train-hyper", "--data", str(data), "--steps", "2", "-o", str(tmp_path / "hyper"))
    invoke("steer", PROMPT, "--hyper", str(tmp_path / "hyper"), "--concept", "art deco", "--strength", "0,1",
           "--out", str(tmp_path / "steered"))
    invoke("evaluate", "--hyper", str(tmp_path / "hyper"), "--baselines", str(baselines), "--split", "all",
           "--limit-concepts", "1", "--prompts", "1", "--seeds", "1", "--out", str(tmp_path / "eval"))

    # ht.apply on the folder's own pipeline makes the image `ht steer` makes from the same maps.
    file = next((baselines / "linear-act").glob("*.safetensors"))
    out = tmp_path / "one"
    invoke("steer", PROMPT, "-i", str(file), "--strength", "0.7", "--seed", "0", "--out", str(out))
    (png,) = out.glob("0*.png")
    expected = np.asarray(Image.open(png).convert("RGB"))
    spec = get_model(model)
    pipe = load_pipeline(spec)

    def generate():
        return np.asarray(pipe([PROMPT], generator=[torch.Generator().manual_seed(0)], **spec.pipeline_kwargs()).images[0])

    with ht.apply(pipe, ht.Intervention.load(file), strength=0.7):
        assert np.array_equal(generate(), expected)
    assert not np.array_equal(generate(), expected)


def test_steps_and_guidance_options_go_into_the_models_id(folders):
    folder = folders["cogview4"]
    result = CliRunner().invoke(app, ["plan", "--model", str(folder), "--steps", "3", "--guidance", "1.5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["model"] == f"{folder}?guidance=1.5&steps=3"
    assert len(get_model(f"{folder}?guidance=1.5&steps=3").timesteps) == 3
    refused = CliRunner().invoke(app, ["build-dataset", "--model", "tiny", "--steps", "2", "--dry-run"])
    assert refused.exit_code == 1 and "--steps apply to a pipeline folder" in refused.output


@pytest.mark.parametrize("model", ["tiny-sana", "tiny-wan"])
def test_a_folder_is_generated_at_the_resolution_asked_and_video_pipelines_are_known(model, tmp_path):
    """SANA's pipeline snaps sizes to its training buckets unless told not to: a folder asked for
    another resolution turns binning off. A pipeline that takes `num_frames` makes videos."""
    folder = tmp_path / model
    load_pipeline(model).save_pretrained(folder)
    spec = get_model(f"{folder}?resolution=128")
    kwargs = spec.pipeline_kwargs()
    assert (kwargs["height"], kwargs["width"]) == (128, 128)
    if model == "tiny-sana":
        assert kwargs["use_resolution_binning"] is False and not spec.video
    else:
        assert "use_resolution_binning" not in kwargs and spec.video
