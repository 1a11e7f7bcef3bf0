"""Interventions managed like adapters (`ht.load`, `ht.set_weights`, `ht.active`, `ht.unload`) and
one intervention per prompt in one batched call (`ht.apply_per_prompt`).

Loaded interventions compose exactly as `ht steer` composes its sources (the same images), their
state lives on the denoiser (no handle needed), and per-prompt steering equals separate calls
within the batching tolerance docs/serve.md states: at most one level in a PNG value, a mean
under 0.01 levels."""

import numpy as np
import pytest
import torch
from conftest import random_intervention
from PIL import Image
from typer.testing import CliRunner

import htcli as ht
from htcli.cli import app
from htcli.errors import HTError
from htcli.generate.apply import composed_maps, steer_pipeline
from htcli.models import denoiser

PROMPT, SEED = "a lighthouse on a cliff", 5


def _image(spec, pipe, prompt=PROMPT, seed=SEED) -> np.ndarray:
    generator = [torch.Generator().manual_seed(seed)]
    return np.asarray(pipe([prompt], generator=generator, **spec.pipeline_kwargs()).images[0])


def _hook_names(model) -> set[str]:
    return {name for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
            for name in m._diffusers_hook.hooks}


def test_loaded_interventions_compose_as_ht_steer_composes_files(tiny, tmp_path):
    spec, pipe = tiny
    model = denoiser(pipe, spec)
    deco, ink = random_intervention(spec, pipe, seed=1), random_intervention(spec, pipe, seed=2)
    files = [deco.save(tmp_path / "deco.safetensors"), ink.save(tmp_path / "ink.safetensors")]
    out = tmp_path / "steered"
    result = CliRunner().invoke(app, ["steer", PROMPT, "--model", "tiny", "--seed", str(SEED), "--out", str(out),
                                      "-i", f"{files[0]}:0.5", "-i", f"{files[1]}:0.8", "--strength", "0.7"])
    assert result.exit_code == 0, result.output
    expected = np.asarray(Image.open(next(out.glob("0*.png"))).convert("RGB"))
    plain = _image(spec, pipe)

    assert ht.load(pipe, ht.Intervention.load(files[0]), name="deco", weight=0.5) == "deco"
    ht.load(pipe, ht.Intervention.load(files[1]), name="ink", weight=0.8)
    try:
        ht.set_weights(pipe, strength=0.7)
        assert np.array_equal(_image(spec, pipe), expected)
        ht.set_weights(pipe, {"deco": 0.2})  # ink keeps 0.8
        reweighted = _image(spec, pipe)
        ht.unload(pipe, "deco")
        ink_only = _image(spec, pipe)
    finally:
        ht.unload(pipe)
    assert np.array_equal(_image(spec, pipe), plain) and _hook_names(model) == set()
    with ht.apply(pipe, [(deco, 0.2), (ink, 0.8)], strength=0.7):
        assert np.array_equal(reweighted, _image(spec, pipe))
    with ht.apply(pipe, (ink, 0.8), strength=0.7):
        assert np.array_equal(ink_only, _image(spec, pipe))
    assert not np.array_equal(reweighted, expected) and not np.array_equal(ink_only, reweighted)


def test_state_lives_on_the_denoiser_not_in_a_handle(tiny_sdxl):
    spec, pipe = tiny_sdxl
    model = denoiser(pipe, spec)
    deco, ink = random_intervention(spec, pipe, seed=1), random_intervention(spec, pipe, seed=2)
    assert repr(ht.active(pipe)) == "Loaded(nothing; strength 0.6, steps all)"
    ht.load(pipe, deco, name="deco")
    ht.load(pipe, ink, name="ink", weight=0.3, layers="*.norm1")
    try:
        ht.set_weights(pipe, {"deco": 0.6}, strength=0.9, steps=range(2, 4))
        loaded = ht.active(pipe)  # read back from the denoiser's hook registry
        assert loaded.weights == {"deco": 0.6, "ink": 0.3} and loaded.strength == 0.9 and loaded.steps == range(2, 4)
        assert repr(loaded) == "Loaded(deco=0.6, ink=0.3; strength 0.9, steps [2, 3])"
        assert model._diffusers_hook.get_hook("ht_adapters").sources is loaded and _hook_names(model) == {"ht_adapters"}
        windowed = _image(spec, pipe)
        for bad, message in ((lambda: ht.load(pipe, deco, name="deco"), "named 'deco' is loaded already"),
                             (lambda: ht.load(pipe, deco.maps, name="x"), "load takes an Intervention"),
                             (lambda: ht.load(pipe, deco, name="x", weight=float("nan")), "weight of 'x' must be"),
                             (lambda: ht.set_weights(pipe, {"nope": 1.0}), "no intervention named 'nope'.*loaded: deco, ink"),
                             (lambda: ht.set_weights(pipe, steps=True), "steps= takes"),
                             (lambda: ht.unload(pipe, "nope"), "no intervention named 'nope'")):
            with pytest.raises(HTError, match=message) as raised:
                bad()
            assert "--" not in str(raised.value)
        assert ht.active(pipe) == loaded  # a refused call changes nothing
        ht.set_weights(pipe, steps=None)
        assert ht.active(pipe).steps is None
    finally:
        ht.unload(pipe)
    assert _hook_names(model) == set() and ht.active(pipe).weights == {}
    # ink acted on its own layers only, as `ht steer -i ink.safetensors:0.3@*.norm1` composes it
    maps = composed_maps(model, [(deco, 0.6), (ink, 0.3)], own_layers=[None, "*.norm1"])
    with steer_pipeline(pipe, maps, 0.9, range(2, 4)):
        assert np.array_equal(windowed, _image(spec, pipe))
    assert not np.array_equal(windowed, _image(spec, pipe))


def test_per_prompt_interventions_in_one_call_equal_separate_calls(tiny):
    spec, pipe = tiny
    deco, ink = random_intervention(spec, pipe, seed=1), random_intervention(spec, pipe, seed=2)
    prompts, seeds = ["a lighthouse", "a kettle", "a fox"], [3, 4, 5]
    per_prompt = [deco, None, [(deco, 0.5), (ink, 0.5)]]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with ht.apply_per_prompt(pipe, per_prompt, strength=0.7) as handle:
        assert repr(handle).startswith("<Applied 'ht_steering': ") and "per sample" in repr(handle)
        batched = [np.asarray(i, dtype=int) for i in pipe(prompts, generator=generators, **spec.pipeline_kwargs()).images]
    alone = []
    for prompt, seed, item in zip(prompts, seeds, per_prompt):
        if item is None:
            alone.append(_image(spec, pipe, prompt, seed).astype(int))
            continue
        with ht.apply(pipe, item, strength=0.7):
            alone.append(_image(spec, pipe, prompt, seed).astype(int))
    for image, single in zip(batched, alone):
        diff = np.abs(image - single)
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    with ht.apply(pipe, deco, strength=0.7):  # each prompt had its own maps: not deco's for the third (10x the tolerance)
        assert np.abs(batched[2] - _image(spec, pipe, prompts[2], seeds[2]).astype(int)).mean() > 0.1
    # Two images per prompt: the pipeline repeats each prompt in place, and so do the maps.
    generators = [torch.Generator().manual_seed(s) for s in (3, 3, 4, 4)]
    with ht.apply_per_prompt(pipe, [deco, None], strength=0.7, images_per_prompt=2):
        pairs = pipe(prompts[:2], generator=generators, num_images_per_prompt=2, **spec.pipeline_kwargs()).images
    for image, single in zip(pairs, [alone[0], alone[0], alone[1], alone[1]]):
        assert np.abs(np.asarray(image, dtype=int) - single).max() <= 1
    with pytest.raises(HTError, match="one entry per prompt"):
        ht.apply_per_prompt(pipe, deco)
    with pytest.raises(HTError, match="images_per_prompt takes"):
        ht.apply_per_prompt(pipe, [deco], images_per_prompt=0)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in denoiser(pipe, spec).modules())
