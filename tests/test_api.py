"""The public API: `ht.apply` on pipelines built outside ht, `ht.HyperTransport`, `ht.Intervention`.

`ht.apply` must make exactly the images `ht steer` makes for the same request (they share one
mechanism), leave the pipeline exactly as it was once removed, and refuse maps that do not fit."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import htcli as ht
from conftest import random_intervention
from htcli.cli import app
from htcli.core import hooks
from htcli.core.hooks import Steering, module_width, resolve_layers
from htcli.errors import HTError
from htcli.models import denoiser

runner = CliRunner()
PROMPT, SEED = "a lighthouse on a cliff", 5
# Per model: a layer pattern that keeps part of its hooked layers.
SUBSETS = {"tiny": "transformer_blocks.[01].*", "tiny-sdxl": "*.norm1", "tiny-flux": r"re:single_transformer_blocks\.\d+"}


@pytest.fixture(scope="module")
def pipelines(tiny, tiny_sdxl, tiny_flux):
    return {"tiny": tiny, "tiny-sdxl": tiny_sdxl, "tiny-flux": tiny_flux}


def _generate(spec, pipe, seed=SEED, output_type="pil"):
    generator = [torch.Generator().manual_seed(seed)]
    return pipe([PROMPT], generator=generator, output_type=output_type, **spec.pipeline_kwargs()).images[0]


def _ht_steer(tmp_path, model, *args) -> np.ndarray:
    out = tmp_path / "steered"
    result = runner.invoke(app, ["steer", PROMPT, "--model", model, "--seed", str(SEED), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    (png,) = out.glob("0*.png")
    return np.asarray(Image.open(png).convert("RGB"))


VARIANTS = [("tiny", [], {}), ("tiny-sdxl", [], {}), ("tiny-flux", [], {}),
            ("tiny-sdxl", ["--steer-steps", "1:"], {"steps": range(1, 4)}),
            ("tiny-flux", ["--steer-steps", "2"], {"steps": 2}),
            ("tiny", ["--layers", SUBSETS["tiny"]], {"layers": [SUBSETS["tiny"]]}),
            ("tiny-flux", ["--layers", SUBSETS["tiny-flux"]], {"layers": [SUBSETS["tiny-flux"]]})]


@pytest.mark.parametrize("model,cli,api", VARIANTS, ids=lambda v: str(v))
def test_apply_makes_the_images_ht_steer_makes(pipelines, tmp_path, model, cli, api):
    spec, pipe = pipelines[model]
    file = random_intervention(spec, pipe).save(tmp_path / "maps.safetensors")
    expected = _ht_steer(tmp_path, model, "-i", str(file), "--strength", "0.7", *cli)
    with ht.apply(pipe, ht.Intervention.load(file), strength=0.7, **api):
        image = np.asarray(_generate(spec, pipe))
    assert np.array_equal(image, expected)
    assert not np.array_equal(np.asarray(_generate(spec, pipe)), expected)  # the maps did steer


def test_a_predicted_concept_steers_as_ht_steer_does(tiny, tmp_path):
    spec, pipe = tiny
    hyper = ht.HyperTransport.from_pretrained(model="tiny")  # the shipped network
    art_deco = hyper.intervention("art deco")
    assert art_deco.model == "tiny" and art_deco.method == "hypertransport" and art_deco.layers == [n for n, _ in hyper.layers]
    assert art_deco.nearest and art_deco.nearest[0]["source"] == "Art Deco" and isinstance(art_deco.ood, bool)
    expected = _ht_steer(tmp_path, "tiny", "-c", "art deco", "--strength", "0.6")
    with ht.apply(pipe, art_deco, strength=0.6):
        assert np.array_equal(np.asarray(_generate(spec, pipe)), expected)


def test_weighted_sources_compose_as_in_ht_steer(tiny, tmp_path):
    spec, pipe = tiny
    hyper = ht.HyperTransport.from_pretrained(model="tiny")
    both = hyper.intervention({"art deco": 0.5, "ukiyo-e": 0.8})
    assert [s["weight"] for s in both.info["sources"]] == [0.5, 0.8]
    assert {n["source"] for n in both.nearest} == set(both.concept.split("; ")) and len(both.concept.split("; ")) == 2
    expected = _ht_steer(tmp_path, "tiny", "-c", "art deco:0.5", "-c", "ukiyo-e:0.8", "--strength", "0.6")
    with ht.apply(pipe, both, strength=0.6):
        assert np.array_equal(np.asarray(_generate(spec, pipe)), expected)
    # A list of weighted interventions composes as ht steer composes files at those weights.
    parts = [(hyper.intervention("art deco"), 0.5), (hyper.intervention("ukiyo-e"), 0.8)]
    files = [part.save(tmp_path / f"{i}.safetensors") for i, (part, _) in enumerate(parts)]
    from_files = _ht_steer(tmp_path / "files", "tiny", "-i", f"{files[0]}:0.5", "-i", f"{files[1]}:0.8",
                           "--strength", "0.6")
    with ht.apply(pipe, parts, strength=0.6):
        assert np.array_equal(np.asarray(_generate(spec, pipe)), from_files)
    # Predicted one at a time rather than in one batch, the maps round a little differently
    # (batched matrix products, several threads): within two levels of the composed request's.
    assert np.abs(from_files.astype(int) - expected.astype(int)).max() <= 2


def _hook_count(model) -> int:
    registered = sum(len(m._diffusers_hook.hooks) for m in model.modules() if hasattr(m, "_diffusers_hook"))
    return registered + sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-flux"])
def test_removing_restores_the_pipeline_bit_for_bit(pipelines, model):
    spec, pipe = pipelines[model]
    model_module = denoiser(pipe, spec)
    untouched = _generate(spec, pipe, output_type="pt")
    maps = random_intervention(spec, pipe)

    handle = ht.apply(pipe, maps, strength=1.0, steps={0})
    assert handle.attached and _hook_count(model_module) > 0
    assert not torch.equal(_generate(spec, pipe, output_type="pt"), untouched)
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert not handle.attached and _hook_count(model_module) == 0
    assert torch.equal(_generate(spec, pipe, output_type="pt"), untouched)

    with ht.apply(pipe, maps):
        pass
    assert _hook_count(model_module) == 0 and torch.equal(_generate(spec, pipe, output_type="pt"), untouched)
    with pytest.raises(RuntimeError, match="inside the block"), ht.apply(pipe, maps):
        raise RuntimeError("inside the block")
    assert _hook_count(model_module) == 0 and torch.equal(_generate(spec, pipe, output_type="pt"), untouched)


def test_strength_set_on_the_handle_takes_effect_on_the_next_call(tiny_sdxl):
    spec, pipe = tiny_sdxl
    maps = random_intervention(spec, pipe)
    with ht.apply(pipe, maps, strength=0.9) as fresh:
        assert fresh.strength == 0.9
        reference = _generate(spec, pipe, output_type="pt")
    with ht.apply(pipe, maps, strength=0.2) as handle:
        weak = _generate(spec, pipe, output_type="pt")
        handle.strength = 0.9
        assert torch.equal(_generate(spec, pipe, output_type="pt"), reference)
        handle.strength = 0
        assert torch.equal(_generate(spec, pipe, output_type="pt"), _untouched(spec, pipe, handle))
        with pytest.raises(HTError, match="finite number"):
            handle.strength = float("nan")
    assert not torch.equal(weak, reference)


def _untouched(spec, pipe, handle):
    handle.remove()
    return _generate(spec, pipe, output_type="pt")


def test_a_step_window_restarts_with_every_pipeline_call(tiny_sdxl):
    """The window counts the scheduler's steps, so every call steers the same steps (not only the first)."""
    spec, pipe = tiny_sdxl
    maps = random_intervention(spec, pipe)
    with ht.apply(pipe, maps, strength=1.0, steps=range(2, 4)):
        first, second = _generate(spec, pipe, output_type="pt"), _generate(spec, pipe, output_type="pt")
    assert torch.equal(first, second) and not torch.equal(first, _generate(spec, pipe, output_type="pt"))


def test_maps_that_do_not_fit_the_pipeline_are_refused_in_one_line(pipelines):
    spec, pipe = pipelines["tiny"]
    sdxl_spec, sdxl_pipe = pipelines["tiny-sdxl"]
    tiny_maps = random_intervention(spec, pipe)
    with pytest.raises(HTError, match=r"made for tiny\) steers layers this pipeline's UNet2DConditionModel does not"):
        ht.apply(sdxl_pipe, tiny_maps)
    name = next(iter(tiny_maps.maps))
    narrow = ht.Intervention({name: (torch.ones(3), torch.zeros(3))}, "tiny", "lineas", "narrow")
    with pytest.raises(HTError, match=f"has width 3 at {name}, but this pipeline's PixArtTransformer2DModel has width 64"):
        ht.apply(pipe, narrow)
    for bad, message in (([], "nothing to apply"), (tiny_maps.maps, "takes Intervention objects or"),
                         ((tiny_maps, 1.0, "x"), "takes Intervention objects or")):
        with pytest.raises(HTError, match=message):
            ht.apply(pipe, bad)
    with pytest.raises(HTError, match="matches none of the intervention's layers"):
        ht.apply(pipe, tiny_maps, layers=["nothing.*"])
    with pytest.raises(HTError, match="denoising step numbers"):
        ht.apply(pipe, tiny_maps, steps=-1)
    with pytest.raises(HTError, match="no denoiser to steer"):
        ht.apply(object(), tiny_maps)
    assert sum(len(m._diffusers_hook.hooks) for m in denoiser(pipe, spec).modules() if hasattr(m, "_diffusers_hook")) == 0


def test_hooks_go_through_diffusers_registry_and_forward_hooks_without_it(tiny_sdxl, monkeypatch):
    spec, pipe = tiny_sdxl
    model = denoiser(pipe, spec)
    maps = random_intervention(spec, pipe)
    name = next(iter(maps.maps))
    module = dict(model.named_modules())[name]
    with ht.apply(pipe, maps, strength=0.8, steps={1, 2}):
        assert any(key.startswith("ht.steer.") for key in module._diffusers_hook.hooks)
        assert any(key.startswith("ht.call.") for key in model._diffusers_hook.hooks)  # the step clock
        assert not module._forward_hooks
        through_registry = _generate(spec, pipe, output_type="pt")
    monkeypatch.setattr(hooks, "_registry_hooks", lambda: None)  # a diffusers without a hook registry
    with ht.apply(pipe, maps, strength=0.8, steps={1, 2}):
        assert module._forward_hooks and not module._diffusers_hook.hooks
        assert torch.equal(_generate(spec, pipe, output_type="pt"), through_registry)
    assert not module._forward_hooks


def test_intervention_save_and_load_from_a_folder(tmp_path, tiny):
    spec, pipe = tiny
    maps = random_intervention(spec, pipe)
    (tmp_path / "styles").mkdir()
    maps.save(tmp_path / "styles" / "random.safetensors")
    for loaded in (ht.Intervention.load(tmp_path / "styles" / "random.safetensors"),
                   ht.Intervention.load(tmp_path / "styles"),  # its one file
                   ht.Intervention.load(tmp_path, subfolder="styles", weight_name="random.safetensors")):
        assert loaded.layers == maps.layers and loaded.model == "tiny" and loaded.method == "lineas"
        assert all(torch.equal(loaded.maps[k][i], maps.maps[k][i]) for k in maps.maps for i in (0, 1))
    maps.save(tmp_path / "styles" / "second.safetensors")
    with pytest.raises(HTError, match="holds 2 safetensors files"):
        ht.Intervention.load(tmp_path / "styles")
    with pytest.raises(HTError, match="no intervention file at .*missing.safetensors: no such file"):
        ht.Intervention.load(tmp_path / "missing.safetensors")


def test_the_package_top_is_small_and_lazy():
    import subprocess
    import sys

    code = "import sys, htcli; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules)); print(dir(htcli))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]"  # importing htcli loads neither torch nor diffusers
    assert {"HyperTransport", "Intervention", "apply", "load_pipeline"} <= set(eval(out[1]))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ht.nothing


def test_nothing_is_attached_when_apply_refuses(tiny):
    """Every check comes before the first hook: a refused call leaves the pipeline as it was."""
    spec, pipe = tiny
    model = denoiser(pipe, spec)
    maps = random_intervention(spec, pipe)
    for bad in (float("nan"), "0.5", None, True):
        with pytest.raises(HTError, match="strength must be a finite number"):
            ht.apply(pipe, maps, strength=bad)
        assert _hook_count(model) == 0
    with pytest.raises(HTError, match="got 'art deco' \\(for concept text, use HyperTransport.intervention first\\)"):
        ht.apply(pipe, "art deco")
    with pytest.raises(HTError, match="use HyperTransport.intervention first"):
        ht.apply(pipe, ht.HyperTransport.from_pretrained(model="tiny"))
    with pytest.warns(UserWarning, match="strength 1.5 extrapolates"):
        ht.apply(pipe, maps, strength=1.5).remove()
    assert _hook_count(model) == 0


def test_windows_read_the_scheduler_of_each_call_and_generators_once(tiny_sdxl):
    spec, pipe = tiny_sdxl
    maps = random_intervention(spec, pipe)
    with ht.apply(pipe, maps, steps=(s for s in (2, 3))):  # a generator: read once, steering every call
        first, second = _generate(spec, pipe, output_type="pt"), _generate(spec, pipe, output_type="pt")
    assert torch.equal(first, second)
    original = pipe.scheduler
    with ht.apply(pipe, maps, steps=0) as handle:
        steered = _generate(spec, pipe, output_type="pt")
        pipe.scheduler = type(original).from_config(original.config)  # swapped while attached
        try:
            assert torch.equal(_generate(spec, pipe, output_type="pt"), steered)  # still steers step 0
        finally:
            pipe.scheduler = original
    assert not handle.attached


def test_maps_follow_the_model_to_another_device(tiny):
    """Attached on the CPU, then the model moves (pipe.to, CPU offload): the maps follow it on the
    next call instead of failing on mixed devices. The meta device stands in for a GPU."""
    from htcli.core.hooks import attach
    from htcli.models import build_meta_denoiser
    from htcli.models.plan import example_call

    spec, _ = tiny
    model = build_meta_denoiser(spec).to_empty(device="cpu")
    layers = resolve_layers(model, spec.hook_patterns)
    maps = {name: (torch.ones(module_width(m)), torch.zeros(module_width(m))) for name, m in layers.items()}
    hooks = attach(model, layers, steering=Steering(maps, 0.5))
    assert next(iter(hooks.steering.maps.values()))[0].device.type == "cpu"
    model.to("meta")
    example_call(spec).replay(model)
    assert {o.device.type for o, _ in hooks.steering.maps.values()} == {"meta"}
    hooks.remove()
