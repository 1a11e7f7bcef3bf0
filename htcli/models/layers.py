"""The layers to steer, found in a denoiser's module tree rather than written per model.

The rule, the same for DiT, MMDiT (dual-stream), single-stream and UNet denoisers:

1. the blocks are the elements of the denoiser's `nn.ModuleList`s that hold an attention
   module among their direct children (a UNet's `down_blocks` hold no attention themselves:
   their transformer blocks, inside, do; a block's resnets and feed-forward layers are no
   blocks), lists whose name says they hold the text stream (`*context*`) excepted;
2. in a block that returns several streams (`htcli.core.hooks.STREAMS`: FLUX's 19 dual-stream
   blocks, where the text reaches the image through joint attention, and its 38 single-stream
   blocks), the whole block, whose image stream `STREAMS` takes: no submodule of a dual-stream
   block outputs its image stream, and a single-stream block's norm holds text and image tokens
   together (why not the text stream: docs/models.md);
3. in any other block, its normalisation layers among its direct children: LayerNorm,
   GroupNorm and RMSNorm, and their subclasses, with a tensor output; adaptive norms (AdaLayerNorm*,
   *Zero*: they return a tuple of the normed tokens and their modulation) and norms of the text
   stream (`*context*`) are left out.

This gives PixArt's `transformer_blocks.N.norm1/norm2`, SDXL's `*.transformer_blocks.N.norm1/2/3`
and FLUX's `transformer_blocks.N` and `single_transformer_blocks.N` (tests/test_layers.py).
`hook_patterns` turns the layers found into `re:` patterns, one per kind of layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from torch import nn

from htcli.core.hooks import STREAMS
from htcli.errors import HTError

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_NAMES = ("LayerNorm", "GroupNorm", "RMSNorm")  # diffusers' own RMSNorm subclasses nn.Module only
_FOUND: dict[str, tuple[str, ...]] = {}  # found patterns per denoiser architecture, for the process


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _is_plain_norm(name: str, module: nn.Module) -> bool:
    kind = type(module).__name__
    if "context" in name or kind.startswith("Ada") or "Zero" in kind:
        return False
    return isinstance(module, _NORMS) or kind.endswith(_NORM_NAMES)


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The denoiser's transformer blocks (rule 1 of the module docstring), in module order."""
    blocks = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or "context" in name.rsplit(".", 1)[-1]:
            continue
        for index, block in enumerate(module):
            if any(_is_attention(child) for child in block.children()):
                blocks[f"{name}.{index}"] = block
    return blocks


def find_hook_points(model: nn.Module) -> dict[str, nn.Module]:
    """The layers to steer by default (the module docstring's rule), by qualified name, in module order."""
    found = {}
    for name, block in find_blocks(model).items():
        if type(block).__name__ in STREAMS:
            found[name] = block
            continue
        for child, module in block.named_children():
            if _is_plain_norm(child, module):
                found[f"{name}.{child}"] = module
    return found


def hook_patterns(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`re:` patterns that match exactly `names` in a denoiser, one per kind of layer (block
    indices generalised): ("re:transformer_blocks\\.\\d+\\.norm1", ...), in first-seen order."""
    patterns: dict[str, None] = {}
    for name in names:
        parts = [r"\d+" if part.isdigit() else re.escape(part) for part in name.split(".")]
        patterns["re:" + r"\.".join(parts)] = None
    return tuple(patterns)


def found_patterns(model: nn.Module, key: str | None = None) -> tuple[str, ...]:
    """`hook_patterns` of `find_hook_points(model)`; kept for the process under `key` (e.g. the
    architecture's config) when given. An HTError when the rule finds nothing."""
    if key is not None and key in _FOUND:
        return _FOUND[key]
    found = find_hook_points(model)
    if not found:
        raise HTError(f"found no transformer blocks with normalisation layers in {type(model).__name__}; "
                      "name the layers to steer with layers= (module-name patterns)")
    patterns = hook_patterns(list(found))
    if key is not None:
        _FOUND[key] = patterns
    return patterns


def architecture_key(denoiser_class: str, config: Mapping) -> str:
    return json.dumps([denoiser_class, dict(config)], sort_keys=True, default=str)
