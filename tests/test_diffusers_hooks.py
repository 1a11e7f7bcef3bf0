"""Steering as a diffusers hook (`htcli.core.diffusers_hooks`): a checked config, stable names,
the step read from the pipeline's call, and one test per combination with diffusers' own hooks,
each stating what must hold. Hooks that change a denoiser for good (casting, offloading,
compiling) go on a copy of it, put in the pipeline for the test only."""

import copy
from contextlib import contextmanager

import pytest
import torch
from conftest import random_intervention

import htcli as ht
from htcli.core.diffusers_hooks import (
    SteeringRootHook,
    apply_steering,
    remove_steering,
    steering,
    steering_names,
    update_steering,
)
from htcli.core.steering import SteeringConfig
from htcli.errors import HTError
from htcli.models import denoiser


def _generate(spec, pipe, prompt="a lighthouse on a cliff", seed=5, **kwargs):
    generator = [torch.Generator().manual_seed(seed)]
    return pipe([prompt], generator=generator, output_type="pt", **spec.pipeline_kwargs() | kwargs).images


def _hooks(model) -> dict[str, list[str]]:
    """Module name -> the names of its diffusers hooks (modules without any left out)."""
    return {name: list(m._diffusers_hook.hooks) for name, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks}


@contextmanager
def _own_copy(pipe, spec):
    """The pipeline with a copy of its denoiser, for hooks that change a denoiser for good."""
    original = denoiser(pipe, spec)
    setattr(pipe, spec.denoiser_attr, copy.deepcopy(original))
    try:
        yield denoiser(pipe, spec)
    finally:
        setattr(pipe, spec.denoiser_attr, original)


def test_config_is_checked_and_names_its_parameters():
    maps = {"a": (torch.ones(3), torch.zeros(3))}
    for kwargs, message in (({"maps": [1]}, "maps takes"), ({"maps": {"a": (torch.ones(3), torch.zeros(2))}}, r"maps\['a'\]"),
                            ({"strength": float("inf")}, "strength= takes a finite number"),
                            ({"strength": "1"}, "strength= takes a finite number"),
                            ({"steps": True}, "steps= takes"), ({"steps": 1.5}, "steps= takes"), ({"steps": [-1]}, "steps= takes"),
                            ({"layers": "a"}, "layers takes a list"), ({"layers": ["b"]}, "layers names layers")):
        with pytest.raises(HTError, match=message) as raised:
            SteeringConfig(**{"maps": maps} | kwargs)
        assert "--" not in str(raised.value)
    config = SteeringConfig(maps, torch.tensor(0.5), steps=2, layers=["a"])
    assert config.strength == 0.5 and config.steps == frozenset({2}) and config.steered == ["a"]
    assert repr(config) == "SteeringConfig(1 layers, strength=0.5, steps=[2])"
    assert SteeringConfig(maps, steps=(s for s in (0, 1))).steps == frozenset({0, 1})  # a generator, read once


def test_apply_steering_by_stable_name_updates_and_removes(tiny):
    spec, pipe = tiny
    model = denoiser(pipe, spec)
    plain = _generate(spec, pipe)
    maps = random_intervention(spec, pipe).maps
    first = sorted(maps)[:2]
    root = apply_steering(model, SteeringConfig(maps, 0.8))
    try:
        assert isinstance(root, SteeringRootHook) and steering(model) is root and steering_names(model) == ["ht_steering"]
        assert _hooks(model) == {"": ["ht_steering"]} | {name: ["ht_steering"] for name in maps}
        assert "SteeringRootHook(SteeringConfig(" in repr(model._diffusers_hook)  # diffusers' own listing
        steered = _generate(spec, pipe)
        with pytest.raises(HTError, match="a steering named 'ht_steering' is already attached"):
            apply_steering(model, SteeringConfig(maps))
        update_steering(model, SteeringConfig(maps, 0.8, layers=first))  # fewer layers: hooks come off the others
        assert _hooks(model) == {"": ["ht_steering"]} | {name: ["ht_steering"] for name in first}
        fewer = _generate(spec, pipe)
        update_steering(model, SteeringConfig(maps, 0.8))
        assert torch.equal(_generate(spec, pipe), steered)
    finally:
        remove_steering(model)
    assert _hooks(model) == {} and torch.equal(_generate(spec, pipe), plain)
    assert not torch.equal(steered, plain) and not torch.equal(fewer, steered) and not torch.equal(fewer, plain)
    remove_steering(model)  # nothing attached: nothing to do


def test_the_step_is_read_from_each_pipeline_call(tiny_sdxl):
    """On a bare denoiser the step is counted from the timesteps it is called with, restarting at
    every pipeline call (even one that stopped part-way) and at `reset_state`: the same steps are
    steered as with the pipeline's scheduler (`ht.apply` on the pipeline)."""
    spec, pipe = tiny_sdxl
    model = denoiser(pipe, spec)
    maps = random_intervention(spec, pipe).maps
    with ht.apply(pipe, random_intervention(spec, pipe), strength=1.0, steps=range(1, 3)):
        expected = _generate(spec, pipe)
    root = apply_steering(model, SteeringConfig(maps, 1.0, steps=range(1, 3)))
    try:
        assert torch.equal(_generate(spec, pipe), expected) and torch.equal(_generate(spec, pipe), expected)

        def stop(pipeline, step, timestep, kwargs):
            if step == 1:
                raise RuntimeError("stopped part-way")
            return kwargs

        with pytest.raises(RuntimeError, match="part-way"):
            _generate(spec, pipe, callback_on_step_end=stop)
        assert root.step == 1
        assert torch.equal(_generate(spec, pipe), expected)  # the next call starts at step 0 again
        root.step = 7
        model._diffusers_hook.reset_stateful_hooks()  # what diffusers runs when a pipeline call ends
        assert root.step == -1
    finally:
        remove_steering(model)


def test_first_block_cache(tiny_flux):
    """FirstBlockCache at threshold 0 skips nothing: the images equal steering alone. With
    skipping on, steering still changes the images, and removing it restores the cache's own
    images bit for bit (the hooks the cache put after steering keep working). Attaching steering
    to blocks the cache already hooks is refused: it would steer the blocks' skipped output."""
    from diffusers.hooks import FirstBlockCacheConfig

    spec, pipe = tiny_flux
    model = denoiser(pipe, spec)
    intervention = random_intervention(spec, pipe)
    with ht.apply(pipe, intervention, strength=1.0):
        steered = _generate(spec, pipe)
    for threshold in (0.0, 10.0):
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        cached = _generate(spec, pipe)
        model.disable_cache()
        handle = ht.apply(pipe, intervention, strength=1.0)
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        try:
            both = _generate(spec, pipe)
            handle.remove()
            assert torch.equal(_generate(spec, pipe), cached)
            with pytest.raises(HTError, match="already has hooks that may skip it .*fbc_"):
                ht.apply(pipe, intervention)
            assert not steering_names(model)
        finally:
            handle.remove()
            model.disable_cache()
        if threshold == 0:
            assert torch.equal(both, steered)
        else:
            assert not torch.equal(cached, _generate(spec, pipe))  # the cache did skip blocks
            assert (both - cached).abs().mean() > 1e-3  # and steering still steers
    assert not _hooks(model)


def test_pyramid_attention_broadcast(tiny_flux):
    """A cache of attention outputs (PyramidAttentionBroadcast, hooked on the attention modules
    inside the steered blocks): steering changes the cached pipeline's images, and removing it
    restores them bit for bit; attached before or after the cache alike."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    spec, pipe = tiny_flux
    intervention = random_intervention(spec, pipe)
    plain = _generate(spec, pipe)
    with _own_copy(pipe, spec) as model:
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                 spatial_attention_timestep_skip_range=(-1, 1001),
                                                 current_timestep_callback=lambda: pipe.current_timestep)
        apply_pyramid_attention_broadcast(model, config)
        cached = _generate(spec, pipe)
        assert not torch.equal(cached, plain)  # it did reuse attention outputs
        with ht.apply(pipe, intervention, strength=1.0):
            both = _generate(spec, pipe)
        assert torch.equal(_generate(spec, pipe), cached) and (both - cached).abs().mean() > 1e-3


def test_layerwise_casting(tiny):
    """Weights stored in float8, computed in float32: the steering's maps stay float32 (the casting
    hooks cast module weights, never the maps), steering changes the images, and removing it
    restores the casting pipeline's images bit for bit."""
    from diffusers.hooks import apply_layerwise_casting

    spec, pipe = tiny
    intervention = random_intervention(spec, pipe)
    with _own_copy(pipe, spec) as model:
        handle = ht.apply(pipe, intervention, strength=1.0)
        apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        assert model.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
        both = _generate(spec, pipe)
        assert {o.dtype for o, _ in steering(model).config.maps.values()} == {torch.float32}
        handle.remove()
        cast = _generate(spec, pipe)
        assert (both - cast).abs().mean() > 1e-3
        with ht.apply(pipe, intervention, strength=1.0):  # attached after the casting hooks: the same images
            assert torch.equal(_generate(spec, pipe), both)
        assert torch.equal(_generate(spec, pipe), cast)


def test_group_offloading(tiny, monkeypatch):
    """Block-level group offloading (on the CPU, CPU to CPU) moves nothing the steering math sees:
    the images equal steering without offloading bit for bit, and removing steering restores the
    unsteered images bit for bit. (diffusers calls accelerate's `send_to_device` for the
    arguments; ht does not depend on accelerate, and CPU to CPU it moves nothing.)"""
    import diffusers.hooks.group_offloading as group_offloading
    from diffusers.hooks import apply_group_offloading

    monkeypatch.setattr(group_offloading, "send_to_device", lambda data, device, non_blocking=False: data,
                        raising=False)
    spec, pipe = tiny
    intervention = random_intervention(spec, pipe)
    plain = _generate(spec, pipe)
    with ht.apply(pipe, intervention, strength=1.0):
        steered = _generate(spec, pipe)
    with _own_copy(pipe, spec) as model:
        apply_group_offloading(model, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
        with ht.apply(pipe, intervention, strength=1.0):
            assert torch.equal(_generate(spec, pipe), steered)
        assert torch.equal(_generate(spec, pipe), plain)


def test_torch_compile(tiny):
    """A `torch.compile`d denoiser is steered through the modules it compiled: the images equal
    eager steering within 1e-4 (inductor fuses and reorders float32 sums; measured ~1e-6), and
    removing steering restores the compiled pipeline's own images bit for bit."""
    spec, pipe = tiny
    intervention = random_intervention(spec, pipe)
    with ht.apply(pipe, intervention, strength=1.0):
        eager = _generate(spec, pipe)
    original = pipe.transformer
    pipe.transformer = torch.compile(original)
    try:
        compiled = _generate(spec, pipe)
        with ht.apply(pipe, intervention, strength=1.0):
            steered = _generate(spec, pipe)
        assert torch.equal(_generate(spec, pipe), compiled)
    finally:
        pipe.transformer = original
        torch._dynamo.reset()
    assert (steered - eager).abs().max() < 1e-4 and (steered - compiled).abs().mean() > 1e-3
    assert not _hooks(original)
