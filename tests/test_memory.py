"""Memory: the real denoisers load without a float32 copy, and batch sizes follow free memory."""

import json
from dataclasses import replace
from itertools import chain

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from typer.testing import CliRunner

from htcli.cli import app
from htcli.errors import HTError
from htcli.models.call import DenoiserCall
from htcli.models import denoiser_config, get_model, load_denoiser
from htcli.models.pretrained import EmptyParameters, _distilled_denoiser, load_strict
from htcli.models.memory import (
    MAX_FORWARD_BATCH,
    MAX_MICRO_BATCH,
    choose_batches,
    fit_batches,
    forward_bytes_per_sample,
    free_bytes,
    per_sample_bytes,
)
from htcli.models.plan import _SavedForBackward, example_call, make_plan

GiB = 2**30


class Float32Allocations(TorchDispatchMode):
    """Bytes of every new float32 CPU tensor created under the mode (views are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 and not t._is_view():
                self.bytes += t.numel() * t.element_size()
        return out


def _random_call(call):
    """`call` (an example call on the meta device) with seeded random floats, and ones for its
    integer tensors (masks, timesteps), on the CPU."""
    generator = torch.Generator().manual_seed(0)

    def fill(t):
        if t.is_floating_point():
            return torch.randn(t.shape, generator=generator).to(t.dtype)
        return torch.ones(t.shape, dtype=t.dtype)

    return DenoiserCall(call.structure, {k: fill(v) for k, v in call.rows.items()},
                        {k: fill(v) for k, v in call.shared.items()})


def _hub_spec(name: str, tmp_path, drop_key: bool = False):
    """The tiny model as the hub loader sees a real one: float16 weights in a safetensors file.
    Returns (spec, the float16 reference denoiser)."""
    spec = get_model(name)
    reference = load_denoiser(spec, dtype=torch.float16)
    state = reference.state_dict()
    if drop_key:
        state.pop(next(iter(state)))
    path = tmp_path / "denoiser.safetensors"
    save_file(state, str(path))
    return replace(spec, weights=(str(path),), dtype="float16", denoiser_loader=_distilled_denoiser), reference


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl", "tiny-flux"])
def test_hub_loader_takes_the_float16_weights_without_a_float32_copy(name, tmp_path):
    spec, reference = _hub_spec(name, tmp_path)
    with Float32Allocations() as allocations:
        loaded = load_denoiser(spec)

    saved = load_file(spec.weights[0])
    expected = dict(chain(reference.named_parameters(), reference.named_buffers()))
    tensors = dict(chain(loaded.named_parameters(), loaded.named_buffers()))
    assert tensors.keys() == expected.keys()
    for key, tensor in tensors.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float16, key
        assert torch.equal(tensor, saved.get(key, expected[key])), key  # non-persistent buffers are not in the file
    float32_params = 4 * sum(p.numel() for p in loaded.parameters())
    # Only the sin-cos position table and a few tiny parameters drawn at build time, never the weights.
    assert allocations.bytes < float32_params / 10, (allocations.bytes, float32_params)

    call = _random_call(example_call(spec))
    with torch.no_grad():
        assert torch.equal(call.replay(loaded)[0], call.replay(reference)[0])


def test_hub_loader_refuses_weights_missing_a_key(tmp_path):
    spec, _ = _hub_spec("tiny", tmp_path, drop_key=True)
    with pytest.raises(HTError, match="does not fit the architecture: 1 missing keys"):
        load_denoiser(spec)


def test_a_built_tensor_the_weights_do_not_fill_is_an_error():
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.empty(3).fill_(1.0), persistent=False)  # on meta: no values

    with EmptyParameters():
        module = Table()
    assert module.linear.weight.is_meta
    with pytest.raises(HTError, match="without values .*'table'"):
        load_strict(module, {"linear.weight": torch.ones(2, 2), "linear.bias": torch.zeros(2)}, "weights.safetensors")


def test_fit_batches_arithmetic():
    # 80% of 10 GiB is 8 GiB; 2 GiB of weights to come leave 6 GiB: 6 samples of 1 GiB, 61 of 100 MiB.
    batches = fit_batches(10 * GiB, 2 * GiB, GiB, 100 * 2**20, headroom=0.8)
    assert (batches.micro_batch, batches.forward_batch) == (6, 61)
    assert (batches.free_bytes, batches.per_sample_bytes) == (10 * GiB, GiB)
    assert fit_batches(GiB, 2 * GiB, GiB, GiB).micro_batch == 1  # weights alone do not fit: still 1
    huge = fit_batches(2**50, 0, 1, 1)
    assert (huge.micro_batch, huge.forward_batch) == (MAX_MICRO_BATCH, MAX_FORWARD_BATCH)
    sizes = [fit_batches(free, GiB, 3 * 2**20, 2**20) for free in range(0, 64 * GiB, GiB // 3)]
    micro = [b.micro_batch for b in sizes]
    forward = [b.forward_batch for b in sizes]
    assert micro == sorted(micro) and forward == sorted(forward) and min(micro + forward) == 1


def test_plan_counts_attention_as_fused_kernels_keep_it():
    q, k, v = (torch.randn(1, 2, 64, 8, device="meta", requires_grad=True) for _ in range(3))  # (B, heads, T, d)
    saved = _SavedForBackward()
    with saved, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        F.scaled_dot_product_attention(q, k, v)
    assert saved.bytes == 4 * q.numel() * 4  # query, key, value, output; not the (2 x 64 x 64) scores


@pytest.fixture(scope="module")
def pixart_plan():
    return make_plan(get_model("pixart"))


def test_plan_measures_what_checkpointing_keeps(pixart_plan):
    """Checkpointed blocks keep their inputs only; what attention saves inside them is dropped by
    the checkpoint's own hooks and must not be counted. Measured: 271 MiB against 4.88 GiB."""
    checkpointed = make_plan(get_model("pixart"), grad_checkpointing=True).activation_bytes_per_sample
    block_inputs = 28 * 4096 * 1152 * 2  # 28 blocks, (4096 tokens x 1152) float16 each
    assert block_inputs <= checkpointed < 0.1 * pixart_plan.activation_bytes_per_sample


def test_pixart_per_sample_figures(pixart_plan):
    plain = per_sample_bytes(pixart_plan, torch.bfloat16)
    checkpointed = per_sample_bytes(pixart_plan, torch.bfloat16, grad_checkpointing=True)
    forward = forward_bytes_per_sample(pixart_plan, torch.bfloat16)
    assert 0 < forward < checkpointed < plain / 4
    # The plan measured float16; float32 activations take twice the bytes.
    assert per_sample_bytes(pixart_plan, torch.float32) == 2 * plain
    # 28 blocks keep a (4096 tokens x 1152) input each, in bfloat16.
    assert checkpointed - forward > 28 * 4096 * 1152 * 2


def test_choose_batches_sets_the_weights_aside_until_loaded(pixart_plan):
    device, free = torch.device("cuda"), 8 * GiB  # no GPU needed: free memory is given
    loaded = choose_batches(pixart_plan, device, torch.bfloat16, free=free, grad_checkpointing=True)
    to_load = choose_batches(pixart_plan, device, torch.bfloat16, free=free, grad_checkpointing=True,
                             weights_loaded=False)
    weights = 2 * pixart_plan.denoiser_params
    assert loaded.micro_batch == int(0.8 * free) // loaded.per_sample_bytes
    assert to_load.micro_batch == (int(0.8 * free) - weights) // loaded.per_sample_bytes < loaded.micro_batch
    assert choose_batches(pixart_plan, device, torch.bfloat16, free=free).micro_batch < loaded.micro_batch


def test_free_cpu_memory_is_positive():
    assert free_bytes(torch.device("cpu")) > 0


def test_plan_shows_the_batches_for_this_machine():
    result = CliRunner().invoke(app, ["plan", "--model", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    batches = json.loads(result.output)["batches"]
    assert batches["device"] == "cpu" and batches["dtype"] == "float32" and batches["free_bytes"] > 0
    assert 1 <= batches["micro_batch"] <= batches["micro_batch_grad_checkpointing"] <= MAX_MICRO_BATCH
    assert 1 <= batches["forward_batch"] <= MAX_FORWARD_BATCH
