"""One prompt path: what `build-dataset` records is what the denoiser receives inside `pipe(prompt)`.

PixArt pipelines lowercase and strip every prompt before T5, which is case-sensitive; MiniLM
(the tiny model's encoder) is uncased and would hide a difference, so the PixArt test swaps in
a cased word-level tokenizer and a small random T5 encoder.
"""

import pytest
import torch

from htcli.models import denoiser
from htcli.models.record import record_call

PROMPTS = ["An Art Deco lighthouse ", "a Cat in a Garden"]
SEEDS = [3, 4]


def _cased_pixart(tiny):
    """The tiny PixArt pipeline with a cased tokenizer and a random T5 encoder of its width."""
    from diffusers import PixArtSigmaPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    spec, pipe = tiny
    words = ["<pad>", "</s>", "<unk>", *sorted({w for p in PROMPTS for w in p.split()} | {w.lower() for p in PROMPTS for w in p.split()})]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    width = pipe.transformer.config.caption_channels
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = T5EncoderModel(T5Config(vocab_size=len(words), d_model=width, d_kv=16, d_ff=64, num_layers=2,
                                          num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    cased = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=pipe.vae, transformer=pipe.transformer,
                                scheduler=pipe.scheduler)
    cased.set_progress_bar_config(disable=True)
    return spec, cased


def _received(spec, pipe, prompts, seeds) -> dict:
    """The denoiser's keyword inputs at the first step of `pipe(prompts)` (forward pre-hook)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("kwargs", {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        seen.setdefault("args", [a.detach().clone() if torch.is_tensor(a) else a for a in args])

    model = denoiser(pipe, spec)
    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(list(prompts), generator=generators, output_type="latent", **spec.pipeline_kwargs())
    finally:
        handle.remove()
    return seen


def _assert_same(recorded, seen, where: str) -> None:
    """`recorded` (a replayed argument) is `seen` (what the pipeline passed), exactly."""
    if torch.is_tensor(seen):
        torch.testing.assert_close(recorded, seen, rtol=0, atol=0, msg=where)
    elif isinstance(seen, dict):
        assert recorded.keys() == seen.keys(), where
        for key in seen:
            _assert_same(recorded[key], seen[key], f"{where}.{key}")
    else:
        assert recorded == seen, where


@pytest.mark.parametrize("fixture", ["cased_tiny", "tiny_sdxl", "tiny_flux"])
def test_the_recorded_call_is_what_the_pipeline_feeds_its_denoiser(fixture, request):
    """Every argument of the denoiser's first call inside `pipe(prompts)`, tensors and values,
    nested dicts included, comes back from the recorded call unchanged."""
    spec, pipe = _cased_pixart(request.getfixturevalue("tiny")) if fixture == "cased_tiny" else request.getfixturevalue(fixture)
    recorded = record_call(pipe, spec, PROMPTS, SEEDS)
    args, kwargs = recorded.arguments()
    seen = _received(spec, pipe, PROMPTS, SEEDS)
    assert len(args) == len(seen["args"])
    for index, (arg, expected) in enumerate(zip(args, seen["args"])):
        _assert_same(arg, expected, f"args.{index}")
    _assert_same(kwargs, seen["kwargs"], "kwargs")
    if fixture == "cased_tiny":  # the case matters to this tokenizer: raw text would be another conditioning
        assert pipe.tokenizer(PROMPTS[0]).input_ids != pipe.tokenizer(PROMPTS[0].lower().strip()).input_ids


@pytest.mark.parametrize("fixture", ["tiny", "tiny_sdxl", "tiny_flux"])
def test_the_replayed_call_reproduces_the_pipelines_first_step_activations(fixture, request):
    """End to end: the pooled activations of the replayed call equal those of `pipe(prompt)`."""
    from htcli.core.hooks import hooked, resolve_layers
    from htcli.data.forward import pooled_activations

    spec, pipe = request.getfixturevalue(fixture)
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, spec.hook_patterns)
    with torch.no_grad():
        cached = pooled_activations(model, layers, record_call(pipe, spec, PROMPTS, SEEDS))
        with hooked(model, layers, capture=True, stop_early=True) as run:
            pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent",
                 **spec.pipeline_kwargs())
    for name in layers:
        torch.testing.assert_close(cached[name], run.pooled[name], rtol=0, atol=0)
