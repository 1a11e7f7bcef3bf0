"""FLUX: its blocks' image stream, its prompt path, its loader, and `tiny-flux` through the CLI.

`tiny-flux` is a `FluxPipeline` of small random modules: its images are noise, so these tests
check the code paths (what is hooked, what is cached, what loads), never whether steering works.
The layer counts of the real `flux-schnell` are tested in test_models.py, on the meta device.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.hooks import Steering, hooked, resolve_layers
from htcli.data.forward import pooled_activations
from htcli.errors import HTError
from htcli.models import denoiser, get_model, load_denoiser, load_pipeline
from htcli.models.record import record_call

PROMPTS = ["An Art Deco lighthouse ", "a Cat in a Garden"]
SEEDS = [3, 4]
BLOCKS = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]


def _transformer_inputs(model: nn.Module, run) -> dict:
    """The keyword inputs of the first call of `model` during `run()`."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("kwargs", {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen["kwargs"]


def test_recorded_call_is_what_the_pipeline_feeds_its_transformer(tiny_flux):
    """`build-dataset`'s recorded call, replayed by `pooled_activations`, gives the transformer
    exactly the inputs of `pipe(prompt)`'s first step: packed latents, all T5 tokens (FLUX takes
    no mask), CLIP's pooled embedding, sigma as the timestep, position ids (stored once, shared
    by the samples), no guidance."""
    spec, pipe = tiny_flux
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, spec.hook_patterns)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    from_pipe = _transformer_inputs(
        model, lambda: pipe(PROMPTS, generator=generators, output_type="latent", **spec.pipeline_kwargs()))
    assert pipe.scheduler.timesteps.tolist() == list(spec.timesteps)  # the spec's schedule is the one that ran
    cached = record_call(pipe, spec, PROMPTS, SEEDS)
    assert set(cached.shared) == {"kwargs.img_ids", "kwargs.txt_ids"}
    with torch.no_grad():
        from_cache = _transformer_inputs(model, lambda: pooled_activations(model, layers, cached))
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    for name in names:
        torch.testing.assert_close(from_cache[name], from_pipe[name], rtol=0, atol=0, msg=name)
    assert from_cache["guidance"] is None and from_pipe["guidance"] is None
    assert float(from_cache["timestep"][0]) == spec.timesteps[0] / 1000


@pytest.mark.parametrize("name", ["transformer_blocks.1", "single_transformer_blocks.0"])
def test_a_flux_block_steers_and_captures_its_image_stream_only(tiny_flux, name):
    """Dual-stream and single-stream blocks both return (text, image): the map acts on every
    image token and on nothing else, and the pooled capture is the image stream's."""
    spec, pipe = tiny_flux
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, spec.hook_patterns)
    assert list(layers) == BLOCKS
    inputs = record_call(pipe, spec, PROMPTS, SEEDS)
    generator = torch.Generator().manual_seed(0)
    omega, beta = 1 + 0.3 * torch.randn(64, generator=generator), 0.5 * torch.randn(64, generator=generator)

    def run(steering):
        outputs = []
        with torch.no_grad(), hooked(model, layers, capture=True, steering=steering) as hooks:
            # Registered after the steering hook, so it sees what the next block receives.
            handle = layers[name].register_forward_hook(lambda m, a, out: outputs.append(out))
            try:
                pooled_activations(model, layers, inputs)
            finally:
                handle.remove()
        return outputs[0], hooks.pooled[name]

    (text, image), pooled = run(None)
    (steered_text, steered_image), steered_pooled = run(Steering({name: (omega, beta)}))
    assert image.shape[1] == 64 and text.shape[1] == 32  # 8x8 latent patches; all max_sequence_length T5 tokens
    torch.testing.assert_close(steered_text, text, rtol=0, atol=0)
    torch.testing.assert_close(steered_image, omega * image + beta)
    torch.testing.assert_close(pooled, image.mean(dim=1))
    torch.testing.assert_close(steered_pooled, omega * pooled + beta)


def test_a_single_stream_block_of_old_diffusers_is_a_clear_error():
    """Before diffusers 0.35 a single-stream block returned its text and image tokens as one
    tensor: steering it would move the text tokens too, so it is refused."""
    old_block = type("FluxSingleTransformerBlock", (nn.Linear,), {})
    model = nn.Sequential(old_block(4, 4))
    with pytest.raises(HTError, match="diffusers >= 0.35"), hooked(model, resolve_layers(model, ["0"]), capture=True):
        model(torch.randn(1, 3, 4))


def test_flux_schnell_loader_reads_a_local_pipeline_folder(tiny_flux, tmp_path, monkeypatch):
    """`flux-schnell`'s loaders, offline: a saved FluxPipeline (tiny-flux's, its transformer in
    several shards like the real one) given as --model-path / $HT_MODEL_PATH loads through the
    code that reads the Hub's copy. The transformer is loaded strictly: a lost shard is an error."""
    spec, pipe = tiny_flux
    pipe.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted((tmp_path / "transformer").glob("*.safetensors"))
    assert len(shards) > 1
    expected = pipe.transformer.state_dict()

    flux = get_model("flux-schnell")
    loaded = load_pipeline(flux, model_path=str(tmp_path), dtype=torch.float32)
    assert type(loaded).__name__ == "FluxPipeline" and loaded.transformer.config.num_layers == 2
    for key, tensor in loaded.transformer.state_dict().items():
        assert torch.equal(tensor, expected[key]), key

    monkeypatch.setenv("HT_MODEL_PATH", str(tmp_path))
    alone = load_denoiser(flux)  # training needs the transformer only, in the spec's dtype
    assert alone.dtype == torch.bfloat16 and not alone.training
    for key, tensor in alone.state_dict().items():
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key

    lost = shards[0]
    keys = len(load_file(str(lost)))
    lost.unlink()
    with pytest.raises(HTError, match=f"{keys} missing keys"):
        load_denoiser(flux)


def test_each_hooked_flux_block_is_its_own_block_for_memory():
    """Gradient checkpointing keeps one input per block: FLUX's hooks are whole blocks, each
    its own, not one 'transformer_blocks' block (which would undercount the memory)."""
    from htcli.models.memory import _block_activations
    from htcli.models.plan import make_plan

    plan = make_plan(get_model("tiny-flux"))
    assert [layer.name for layer in plan.layers] == BLOCKS
    assert _block_activations(plan) == [64 * 64] * 4  # 64 image tokens x width 64, per block


@pytest.mark.slow
def test_tiny_flux_through_the_whole_cli(tmp_path, monkeypatch):
    """build-dataset, fit-linear-baselines, train-hyper, steer, evaluate and score on tiny-flux,
    each finding the previous one's output under runs/tiny-flux/."""
    monkeypatch.setenv("HT_RUNS", str(tmp_path))
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, [*args, "--model", "tiny-flux"])
        assert result.exit_code == 0, result.output
        return result

    invoke("build-dataset", "--limit-concepts", "4", "--samples", "8", "--eval-samples", "8")
    run = tmp_path / "tiny-flux"
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["settings"]["layers"] == BLOCKS and len(manifest["concepts"]) == 4
    invoke("fit-linear-baselines", "--method", "linear-act", "--incremental", "--split", "all")
    assert len(list((run / "baselines" / "linear-act").glob("*.safetensors"))) == 4
    invoke("train-hyper", "--steps", "5")
    invoke("steer", "a lighthouse", "--concept", "art deco", "--strength", "0,1")
    unsteered, steered = (np.asarray(Image.open(p)) for p in sorted((run / "generations").glob("*/*-seed0.png")))
    assert (unsteered != steered).any()  # strength 0 is the unhooked pipeline; 1 moves the image
    invoke("evaluate", "--split", "all", "--limit-concepts", "1", "--prompts", "1", "--seeds", "1")
    invoke("score")
    invoke("score", "--judge", "transport")
    scores = json.loads(next((run / "eval").glob("*/scores.json")).read_text())
    assert scores["model"] == "tiny-flux" and {"clip", "transport"} <= set(scores)
    methods = {row["method"] for row in scores["clip"]["summary"]}
    assert {"none", "prompt", "hypertransport", "linear-act"} <= methods
