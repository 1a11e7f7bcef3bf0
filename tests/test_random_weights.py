"""`--random-weights`: the real specs at full width with seeded random weights, no download.

The full-width `pixart` chain here runs at 64 px with few samples and steps (the default suite);
the same chain at 256 px, and `dmd2` and `flux-schnell`, are in tests/test_fullwidth.py.
"""

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from htcli.cli import app
from htcli.data.concepts import load_library
from htcli.data.dataset import FORMAT, ActivationDataset, open_dataset
from htcli.errors import HTError
from htcli.methods.hypernetwork import HyperCheckpoint, HyperConfig, build_hypernetwork
from htcli.methods.predict import Predictor
from htcli.models import denoiser, denoiser_config, get_model, list_models, load_denoiser, load_pipeline
from htcli.models.interventions import Intervention, load_intervention
from htcli.models.random_weights import draw_weights, random_weights_file, weights_path

runner = CliRunner()
NOTE = "random weights (--random-weights)"


@pytest.fixture
def random_weights(monkeypatch, random_weights_cache):
    """$HT_RANDOM_WEIGHTS set, with the session's weights cache."""
    monkeypatch.setenv("HT_CACHE", random_weights_cache)
    monkeypatch.setenv("HT_RANDOM_WEIGHTS", "1")


def test_get_model_gives_every_real_spec_its_random_variant(random_weights):
    for registered in list_models():
        spec = get_model(registered.id)
        if registered.offline:  # random already: unchanged
            assert spec is registered
            continue
        assert spec.random_weights and spec.offline and spec.id == registered.id
        assert (spec.family, spec.hook_patterns, spec.timesteps, spec.dtype, spec.resolution) == (
            registered.family, registered.hook_patterns, registered.timesteps, registered.dtype, registered.resolution)
        assert denoiser_config(spec) == denoiser_config(registered)  # full width and depth
        assert spec.concept_encoder == "minilm" and spec.weights == () and spec.base_repo is None


def test_without_the_variable_the_specs_are_the_real_ones():
    assert not get_model("pixart").random_weights and not get_model("pixart").offline


def test_blocks_are_seeded_by_name_so_a_capped_model_is_the_full_models_first_blocks(random_weights, monkeypatch):
    monkeypatch.setenv("HT_RANDOM_BLOCKS", "1")
    one = draw_weights(get_model("pixart"))
    monkeypatch.setenv("HT_RANDOM_BLOCKS", "2")
    spec = get_model("pixart")
    assert denoiser_config(spec)["num_layers"] == 2
    two = draw_weights(spec)
    assert set(one) < set(two) and any(key.startswith("transformer_blocks.1.") for key in two)
    block = [key for key in one if key.startswith("transformer_blocks.0.")]
    assert len(block) > 10 and all(torch.equal(one[key], two[key]) for key in block)
    assert all(t.dtype == torch.float16 for t in two.values() if t.is_floating_point())
    assert torch.equal(draw_weights(spec)["transformer_blocks.1.attn1.to_q.weight"],
                       two["transformer_blocks.1.attn1.to_q.weight"])  # seeded: the same every time
    monkeypatch.setenv("HT_RANDOM_BLOCKS", "0")
    with pytest.raises(HTError, match="HT_RANDOM_BLOCKS must be a positive"):
        get_model("pixart")


def test_the_random_denoiser_loads_through_the_real_weights_loader(random_weights, random_weights_cache, monkeypatch):
    """Drawn once into the cache, then read by `htcli.models.pretrained.load_module`: the safetensors
    file, the dtype and the device, as the distilled weights are."""
    import htcli.models.pretrained as hub

    monkeypatch.setenv("HT_RANDOM_BLOCKS", "1")
    spec = get_model("pixart")
    calls = []
    real = hub.load_module

    def recording(build, weights, dtype, device):
        calls.append((weights, dtype, device))
        return real(build, weights, dtype, device)

    monkeypatch.setattr(hub, "load_module", recording)
    model = load_denoiser(spec, "cpu", torch.bfloat16)
    path = weights_path(spec)
    assert calls == [(path, torch.bfloat16, torch.device("cpu"))] and path.is_file()
    assert path.parent.parent == Path(random_weights_cache)
    stamp = path.stat().st_mtime_ns
    assert random_weights_file(spec) == path and path.stat().st_mtime_ns == stamp  # cached, not redrawn
    drawn = draw_weights(spec)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, drawn[key].to(torch.bfloat16)), key
    with pytest.raises(HTError, match="--model-path .* and --random-weights"):
        load_denoiser(spec, model_path="/some/folder")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pixart", "flux-schnell"])
def test_the_random_pipeline_has_the_real_widths_and_generates(model, random_weights, monkeypatch):
    """One-layer text encoders of the real output widths, the real VAE config (narrow), the
    real scheduler; the pipeline's own prompt encoding feeds the denoiser's real input widths."""
    from htcli.models.record import record_call

    monkeypatch.setenv("HT_RANDOM_BLOCKS", "1")
    spec = get_model(model).at_resolution(64)
    pipe = load_pipeline(spec)
    config = denoiser_config(spec)
    if model == "pixart":
        assert type(pipe).__name__ == "PixArtSigmaPipeline"
        assert pipe.text_encoder.config.d_model == 4096 and pipe.text_encoder.config.num_layers == 1
        assert pipe.vae.config.latent_channels == 4 and pipe.vae.config.scaling_factor == 0.13025
    else:
        assert type(pipe).__name__ == "FluxPipeline"
        assert pipe.text_encoder.config.hidden_size == 768 == config["pooled_projection_dim"]
        assert pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder_2.config.num_layers == 1
        assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.1159
    assert denoiser(pipe, spec).dtype == spec.torch_dtype
    call = record_call(pipe, spec, ["a lighthouse on a cliff"], [0])
    text_width = config["caption_channels" if model == "pixart" else "joint_attention_dim"]
    assert call.rows["kwargs.encoder_hidden_states"].shape[-1] == text_width == 4096
    latents = call.rows["args.0" if model == "pixart" else "kwargs.hidden_states"]
    assert latents.shape[1:] == ((4, 8, 8) if model == "pixart" else (16, 64))  # FLUX packs 2x2 patches
    image = pipe("a lighthouse", generator=torch.Generator().manual_seed(0), output_type="pt",
                 **spec.pipeline_kwargs()).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def _manifest(root, model, random):
    """A dataset folder holding only a manifest: enough to open it and check its weights."""
    root.mkdir(parents=True)
    settings = {"model": model, "layers": ["transformer_blocks.0.norm1"], "widths": [1152], "encoder": "minilm",
                "fit_prompts": ["a"], "eval_prompts": ["b"], "fit_seeds": [0], "eval_seeds": [1],
                "random_weights": random}
    (root / "manifest.json").write_text(json.dumps({"format": FORMAT, "settings": settings, "concepts": [],
                                                    "settings_digest": "x", "complete": True}))
    return root


def test_datasets_are_refused_across_real_and_random_weights(tmp_path, monkeypatch):
    real, random = _manifest(tmp_path / "real", "pixart", False), _manifest(tmp_path / "random", "pixart", True)
    assert open_dataset(real, "pixart").spec().id == "pixart"
    with pytest.raises(HTError, match="random weights: pass --random-weights"):
        open_dataset(random, "pixart")
    monkeypatch.setenv("HT_RANDOM_WEIGHTS", "1")
    assert open_dataset(random, "pixart").spec().random_weights
    with pytest.raises(HTError, match="real weights, and --random-weights"):
        open_dataset(real, "pixart")
    with pytest.raises(HTError, match="real weights"):
        ActivationDataset(real).spec()


def test_a_datasets_digest_is_unchanged_by_the_new_settings_at_their_defaults():
    """Datasets built before `random_weights` and `resolution` existed keep their digest (a
    changed digest would make every one of them "built with other settings")."""
    from htcli.data.dataset import DatasetSettings

    settings = DatasetSettings("tiny", ("a",), (4,), "minilm", ("p",), ("q",), (0,), (1,))
    before = {k: v for k, v in asdict(settings).items() if k not in ("random_weights", "resolution")}
    assert settings.digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert replace(settings, random_weights=True).digest() != settings.digest()
    assert replace(settings, resolution=256).digest() != settings.digest()


def test_hypernetworks_and_intervention_files_are_refused_across(tmp_path, monkeypatch):
    layers = (("transformer_blocks.0.norm1", 1152),)
    config = HyperConfig(embed_dim=384, layers=layers, hidden=8, rank=2)
    paths = {}
    for random in (False, True):
        paths[random] = tmp_path / f"hyper-{random}.safetensors"
        HyperCheckpoint(build_hypernetwork(config), config, "pixart", "minilm", random_weights=random).save(paths[random])
        maps = {"transformer_blocks.0.norm1": (torch.ones(1152), torch.zeros(1152))}
        Intervention(maps, "pixart", "lineas", "x", random_weights=random).save(tmp_path / f"file-{random}.safetensors")
    widths = {"transformer_blocks.0.norm1": 1152}
    with pytest.raises(HTError, match="random weights: pass --random-weights"):
        Predictor.load(paths[True], model="pixart")
    with pytest.raises(HTError, match="random weights: pass --random-weights"):
        load_intervention(tmp_path / "file-True.safetensors", "pixart", widths)
    load_intervention(tmp_path / "file-False.safetensors", "pixart", widths)
    monkeypatch.setenv("HT_RANDOM_WEIGHTS", "1")
    assert Predictor.load(paths[True], model="pixart").checkpoint.random_weights
    with pytest.raises(HTError, match="real weights, and --random-weights"):
        Predictor.load(paths[False], model="pixart")
    with pytest.raises(HTError, match="real weights, and --random-weights"):
        load_intervention(tmp_path / "file-False.safetensors", "pixart", widths)
    # A file made while random weights are asked for records them (`save` asks the spec).
    Intervention(maps, "pixart", "lineas", "x").save(tmp_path / "made.safetensors")
    assert load_intervention(tmp_path / "made.safetensors").random_weights


def _run(*args):
    """`ht ARGS` as a fresh process would run it: $HT_RANDOM_WEIGHTS, which `--random-weights`
    sets, back to unset afterwards."""
    return runner.invoke(app, [str(arg) for arg in args], env={"HT_RANDOM_WEIGHTS": "0"})


def _invoke(*args):
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert NOTE in result.output  # every command says so
    return result


@pytest.mark.slow
def test_pixart_full_width_through_the_cli(tmp_path, random_weights_cache, monkeypatch):
    """`pixart`'s architecture at full width (28 blocks of 1152, 611M parameters) through the
    whole CLI at 64 px: build-dataset, LinEAS in bfloat16 with checkpointing, train-hyper in
    bfloat16 with checkpointing and micro-batches, steer; LinEAS's and training's losses fall,
    and strength 0 is the unsteered image bit for bit."""
    monkeypatch.setenv("HT_CACHE", random_weights_cache)
    a, b = (c.name for c in load_library().targets("train")[:2])
    data, hyper, out = tmp_path / "data", tmp_path / "hyper", tmp_path / "steer"
    _invoke("build-dataset", "-m", "pixart", "--random-weights", "--resolution", 64, "-c", a, "-c", b, "--samples", 2,
            "--eval-samples", 2, "-o", data)
    settings = ActivationDataset(data).settings
    assert settings.random_weights and settings.resolution == 64 and len(settings.layers) == 56
    assert ActivationDataset(data).source_inputs("fit").rows["args.0"].shape == (2, 4, 8, 8)

    refused = _run("fit-linear-baselines", "--data", data, "--method", "lineas", "-c", a)
    assert refused.exit_code == 1 and "pass --random-weights" in refused.output and NOTE not in refused.output

    _invoke("fit-linear-baselines", "--data", data, "--random-weights", "--method", "lineas", "--steps", 2, "-c", a,
            "--dtype", "bfloat16", "--grad-checkpointing", "-o", tmp_path / "baselines")
    row = json.loads((tmp_path / "baselines" / "lineas" / "summary.json").read_text())["concepts"][a]
    assert row["loss_last"] < row["loss_first"]
    fitted = load_intervention(tmp_path / "baselines" / "lineas" / row["file"])
    assert fitted.random_weights and fitted.model == "pixart"

    _invoke("train-hyper", "--data", data, "--random-weights", "--steps", 2, "--concepts-per-step", 2, "--micro-batch",
            2, "--dtype", "bfloat16", "--grad-checkpointing", "--eval-every", 1, "--val-fraction", 0, "--hidden", 32,
            "--rank", 4, "--prior", "none", "--lr", "1e-2", "-o", hyper)  # from the identity: the loss must fall
    losses = [entry["loss"] for entry in json.loads((hyper / "history.json").read_text())]
    assert len(losses) == 2 and losses[1] < losses[0]

    _invoke("steer", "a lighthouse", "-m", "pixart", "--random-weights", "--resolution", 64, "--hyper", hyper,
            "-c", a, "--strength", "0,1", "-o", out)
    sidecars = sorted(out.glob("*.json"))
    assert all(json.loads(p.read_text())["random_weights"] for p in sidecars)
    zero, one = (np.asarray(Image.open(p.with_suffix(".png"))) for p in sidecars)
    monkeypatch.setenv("HT_RANDOM_WEIGHTS", "1")
    spec = get_model("pixart").at_resolution(64)
    unsteered = load_pipeline(spec)("a lighthouse", generator=[torch.Generator().manual_seed(0)],
                                    **spec.pipeline_kwargs()).images[0]
    assert np.array_equal(zero, np.asarray(unsteered)) and not np.array_equal(one, zero)
