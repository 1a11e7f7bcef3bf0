"""Model specs: registry, real architectures on the meta device, tiny pipelines end to end."""

import json
import subprocess
import sys

import pytest
import torch
import typer
from conftest import generate
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.hooks import module_width, resolve_layers
from htcli.core.steering import output_element
from htcli.errors import HTError
from htcli.models import (
    build_meta_denoiser,
    get_model,
    list_models,
    load_denoiser,
    load_pipeline,
)

runner = CliRunner()


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.id)
def test_every_spec_builds_on_meta_and_its_patterns_resolve(spec):
    model = build_meta_denoiser(spec)
    assert next(model.parameters()).device.type == "meta"
    layers = resolve_layers(model, spec.hook_patterns)
    assert layers and all(module_width(m) > 0 for m in layers.values())
    assert spec.pipeline_kwargs()["num_inference_steps"] == len(spec.timesteps)


def test_pixart_default_layers_inside_28_blocks_of_width_1152():
    spec = get_model("pixart")
    model = build_meta_denoiser(spec)
    assert len(model.transformer_blocks) == 28
    layers = resolve_layers(model, spec.hook_patterns)
    blocks = {name.split(".")[1] for name in layers}
    assert blocks == {str(i) for i in range(28)}
    assert {module_width(m) for m in layers.values()} == {1152}
    assert len(layers) == 56 and sum(module_width(m) for m in layers.values()) == 64_512


def test_dmd2_default_layers_cover_the_70_sdxl_transformer_blocks():
    spec = get_model("dmd2")
    model = build_meta_denoiser(spec)
    layers = resolve_layers(model, spec.hook_patterns)
    blocks = {name.rsplit(".", 1)[0] for name in layers}
    assert len(blocks) == 70
    widths = {module_width(m) for m in layers.values()}
    assert widths == {640, 1280}
    assert sum(module_width(m) for m in layers.values()) == 249_600
    assert get_model("dmd2-1step").timesteps == (399,)


def test_flux_schnell_default_layers_are_the_image_streams_of_its_57_blocks():
    spec = get_model("flux-schnell")
    model = build_meta_denoiser(spec)
    layers = resolve_layers(model, spec.hook_patterns)
    assert list(layers) == [f"transformer_blocks.{i}" for i in range(19)] + [
        f"single_transformer_blocks.{i}" for i in range(38)]
    assert {module_width(m) for m in layers.values()} == {3072}
    assert {type(m).__name__ for m in layers.values()} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert {output_element(m) for m in layers.values()} == {1}  # (text, image): the image stream
    assert spec.pipeline_kwargs()["sigmas"] == [1.0, 0.75, 0.5, 0.25]  # FluxPipeline's own 4-step schedule


def test_flux_schnell_config_is_diffusers_flux1_architecture():
    """The shipped config: every key an argument of FluxTransformer2DModel, at its default (the
    class's defaults are FLUX.1's architecture; schnell has no guidance embedding)."""
    import inspect

    from diffusers import FluxTransformer2DModel

    from htcli.models import denoiser_config

    defaults = {k: p.default for k, p in inspect.signature(FluxTransformer2DModel.__init__).parameters.items()}
    config = denoiser_config(get_model("flux-schnell"))
    assert config == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items() if k in config}
    assert set(defaults) - set(config) == {"self", "out_channels"}  # out_channels: None, i.e. in_channels


@pytest.mark.parametrize("name,layers,neurons", [
    ("pixart", 56, 64_512), ("dmd2", 210, 249_600),
    pytest.param("flux-schnell", 57, 175_104, marks=pytest.mark.slow),  # 12B parameters on the meta device
])
def test_plan_prints_the_counts(name, layers, neurons):
    result = runner.invoke(app, ["plan", "--model", name, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert len(plan["layers"]) == layers and plan["neurons"] == neurons
    assert plan["hyper_outputs"] == 2 * neurons
    assert plan["dataset_bytes_per_concept"] == (32 + 128) * neurons * 2
    table = runner.invoke(app, ["plan", "--model", name])
    assert f"layers: {layers}" in table.output and f"neurons: {neurons:,}" in table.output


def test_plan_sizes_memory_for_train_hypers_default_batch():
    from htcli.methods.train_config import TrainConfig

    train_hyper = typer.main.get_command(app).commands["train-hyper"]
    default = next(p.default for p in train_hyper.params if p.name == "concepts_per_step")
    assert default == TrainConfig().concepts_per_step
    plan = json.loads(runner.invoke(app, ["plan", "--model", "tiny", "--json"]).output)
    assert plan["concepts_per_step"] == default
    per_sample = plan["activation_bytes_per_sample"]
    assert plan["training_bytes"] == plan["weights_bytes"] + default * plan["samples"] * per_sample


def test_plan_with_custom_layers_and_errors():
    result = runner.invoke(app, ["plan", "-m", "pixart", "-l", "transformer_blocks.*.norm2", "--json"])
    assert json.loads(result.output)["neurons"] == 28 * 1152
    bad = runner.invoke(app, ["plan", "-m", "pixart", "-l", "transformer_block.*.norm9"])
    assert bad.exit_code == 1 and "matches no module" in bad.output
    unknown = runner.invoke(app, ["plan", "-m", "pixrt"])
    assert unknown.exit_code == 1 and "Did you mean 'pixart'" in unknown.output


def test_models_command_lists_every_spec():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert [row["id"] for row in rows] == [s.id for s in list_models()]
    assert rows[0] == json.loads(json.dumps(list_models()[0].record()))  # the spec's own record, every field
    assert {"timesteps", "hook_patterns", "concept_encoder", "licence"} <= set(rows[0]) and "loader" not in rows[0]



def test_quick_commands_load_neither_diffusers_nor_transformers():
    """`ht models`, help and a usage error answer without the seconds those imports take."""
    script = ("import sys; from htcli.cli import main; sys.argv = ['ht', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    for argv in (["models"], ["steer", "-h"], ["steer", "x", "--no-such-option"]):
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
        assert result.stdout.strip().splitlines()[-1] == "[]", (argv, result.stdout[-300:], result.stderr[-300:])

def test_unknown_model():
    with pytest.raises(HTError, match="known models"):
        get_model("sd15")


def test_unknown_model_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("HT_MODEL", "nope")
    result = runner.invoke(app, ["plan"])
    assert result.exit_code == 1 and "unknown model 'nope' (from $HT_MODEL" in result.output
    assert "$HT_MODEL" not in runner.invoke(app, ["plan", "-m", "nope"]).output  # --model says it itself
    monkeypatch.setenv("HT_MODEL", "tiny")
    assert get_model().id == "tiny"


def test_plan_of_a_small_model_shows_its_size():
    from htcli.models.plan import human_count

    assert [human_count(n) for n in (999, 48_321, 999_999, 611_000_000, 2_567_000_000)] == [
        "999", "48.3k", "1M", "611M", "2.57B"]
    result = runner.invoke(app, ["plan", "--model", "tiny"])
    params = json.loads(runner.invoke(app, ["plan", "--model", "tiny", "--json"]).output)["denoiser_params"]
    assert f"denoiser: {human_count(params)} parameters" in result.output and "0M" not in result.output


@pytest.mark.parametrize("spec", [s for s in list_models() if not s.offline], ids=lambda s: s.id)
def test_real_model_offline_is_a_one_line_error_pointing_to_tiny(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.delenv("HT_MODEL_PATH", raising=False)
    for load in (load_pipeline, load_denoiser):
        with pytest.raises(HTError, match="model='tiny'") as error:
            load(spec)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("spec", [s for s in list_models() if s.offline], ids=lambda s: s.id)
def test_tiny_models_generate_offline(spec):
    pipe = load_pipeline(spec)
    image = generate(spec, pipe, "a lighthouse on a cliff")
    frames = (spec.call_kwargs["num_frames"],) if spec.video else ()
    assert image.shape == (1, *frames, 3, spec.resolution, spec.resolution)
    assert torch.isfinite(image).all()
    again = generate(spec, pipe, "a lighthouse on a cliff")
    assert torch.equal(image, again)  # seeded, deterministic


@pytest.mark.parametrize("spec", [s for s in list_models() if s.offline], ids=lambda s: s.id)
def test_tiny_models_are_built_identically_every_time(spec):
    pipe, other = load_pipeline(spec), load_pipeline(spec)
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert {"vae", "text_encoder", spec.denoiser_attr} <= set(modules)
    for component, module in modules.items():
        theirs = getattr(other, component).state_dict()
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, theirs[name]), f"{component}.{name}"


def test_tiny_weights_come_from_the_shipped_files(tmp_path, monkeypatch):
    """`tiny`'s transformer and VAE hold the tensors of safetensors files (shipped in the package;
    not a seeded draw that a PyTorch release could change), so hypernetworks trained on `tiny`
    stay valid. Checked with altered copies of the files: what loads is what they hold."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    import htcli.models.tiny as tiny_module
    from htcli.models import load_denoiser

    altered = {}
    for path in (tiny_module.TINY_TRANSFORMER, tiny_module.TINY_VAE):
        altered[path.name] = {k: v * 2 if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        save_file(altered[path.name], str(tmp_path / path.name))
    monkeypatch.setattr(tiny_module, "TINY_VAE", tmp_path / tiny_module.TINY_VAE.name)
    spec = dataclasses.replace(get_model("tiny"), weights=(str(tmp_path / tiny_module.TINY_TRANSFORMER.name),))
    pipe = load_pipeline(spec)
    for module, name in ((pipe.transformer, tiny_module.TINY_TRANSFORMER.name), (load_denoiser(spec),
                         tiny_module.TINY_TRANSFORMER.name), (pipe.vae, tiny_module.TINY_VAE.name)):
        state = module.state_dict()
        assert set(state) == set(altered[name]), name
        for key, tensor in altered[name].items():
            assert torch.equal(state[key], tensor), key
    assert get_model("tiny").weights == (str(tiny_module.TINY_TRANSFORMER),) and tiny_module.TINY_TRANSFORMER.is_file()
