"""Hook points found in the module tree (`htcli.models.layers`), not written per model."""

import pytest
from typer.testing import CliRunner

from htcli.cli import app
from htcli.core.hooks import resolve_layers
from htcli.errors import HTError
from htcli.models import build_meta_denoiser, get_model, list_models
from htcli.models.layers import find_hook_points, found_patterns, hook_patterns

# The patterns each shipped spec named before they were found (ht before issue 30).
WRITTEN = {
    "pixart": ("transformer_blocks.*.norm1", "transformer_blocks.*.norm2"),
    "sdxl": ("*.transformer_blocks.*.norm1", "*.transformer_blocks.*.norm2", "*.transformer_blocks.*.norm3"),
    "flux": (r"re:transformer_blocks\.\d+", r"re:single_transformer_blocks\.\d+"),
}


@pytest.mark.parametrize("spec", [s for s in list_models() if s.family in WRITTEN], ids=lambda s: s.id)
def test_the_layers_found_are_the_ones_once_written(spec):
    """DiT norms (PixArt), UNet transformer-block norms (SDXL) and FLUX's whole dual- and
    single-stream blocks, on the meta device, in module order."""
    model = build_meta_denoiser(spec)
    written = list(resolve_layers(model, WRITTEN[spec.family]))
    assert list(find_hook_points(model)) == written
    assert spec.hook_patterns_found and list(resolve_layers(model, spec.hook_patterns)) == written


def test_patterns_are_one_per_kind_of_layer():
    names = ["transformer_blocks.0.norm1", "transformer_blocks.0.norm2", "transformer_blocks.1.norm1"]
    assert hook_patterns(names) == (r"re:transformer_blocks\.\d+\.norm1", r"re:transformer_blocks\.\d+\.norm2")


def test_a_denoiser_with_no_blocks_is_refused():
    from torch import nn

    with pytest.raises(HTError, match="found no transformer blocks .* layers="):
        found_patterns(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))


def test_plan_lists_what_was_found_and_layers_still_choose():
    result = CliRunner().invoke(app, ["plan", "--model", "tiny-flux"])
    assert result.exit_code == 0, result.output
    assert "found in the module tree" in result.output and "single_transformer_blocks.1" in result.output
    assert "FluxSingleTransformerBlock" in result.output and "stream 1 of a tuple" in result.output
    chosen = CliRunner().invoke(app, ["plan", "--model", "tiny", "--layers", "transformer_blocks.0.norm2", "--json"])
    assert chosen.exit_code == 0, chosen.output
    assert '"name": "transformer_blocks.0.norm2"' in chosen.output and "transformer_blocks.1" not in chosen.output
    assert get_model("tiny").hook_patterns_found
