"""A denoiser's inputs, per family: how each one is called at the first timestep from cached
inputs, and random inputs of the right shapes for planning and measuring.

Cached inputs are a dict of tensors, batch first (what `ht build-dataset` stores):
    noise     (B, C, h, w)   initial latents (FLUX packs them into (B, h/2 * w/2, 4C) tokens)
    text      (B, T, E)      text-encoder hidden states (FLUX: T5's)
    mask      (B, T)         PixArt: attention mask of the text tokens
    pooled    (B, P)         SDXL, FLUX: pooled text embedding (FLUX: CLIP's)
    time_ids  (B, 6)         SDXL: size/crop conditioning
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from htcli.models.spec import ModelSpec

TEXT_TOKENS = {"pixart": 300, "sdxl": 77}  # T5 max length for PixArt-Sigma, CLIP for SDXL
TEXT_WIDTH = {"pixart": "caption_channels", "sdxl": "cross_attention_dim", "flux": "joint_attention_dim"}


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens of 2x2 patches, as FLUX's pipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_image_ids(h: int, w: int) -> Tensor:
    """(h/2 * w/2, 3) position ids of FLUX's packed latent tokens: (0, row, column) in patches."""
    rows = torch.arange(h // 2)[:, None].expand(h // 2, w // 2)
    columns = torch.arange(w // 2)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def denoiser_call(spec: ModelSpec, model: nn.Module, inputs: Mapping[str, Tensor]) -> object:
    """Run `model` once at the spec's first timestep on cached `inputs`, as its pipeline calls it
    there; returns the model's output. Inputs move to the model's device and dtype."""
    device, dtype = model.device, model.dtype
    batch = inputs["noise"].shape[0]
    timestep = torch.full((batch,), spec.timesteps[0], device=device)
    noise = inputs["noise"].to(device, dtype)
    text = inputs["text"].to(device, dtype)
    if spec.family == "flux":
        # As FluxPipeline calls it: the timestep in the latents' dtype, then / 1000 (FLUX's time is
        # sigma, in [0, 1]); no guidance embedding (schnell has none).
        return model(
            hidden_states=pack_latents(noise),
            encoder_hidden_states=text,
            pooled_projections=inputs["pooled"].to(device, dtype),
            timestep=timestep.to(dtype) / 1000,
            img_ids=latent_image_ids(*noise.shape[2:]).to(device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            guidance=None,
        )
    if spec.family == "pixart":
        return model(
            noise,
            encoder_hidden_states=text,
            encoder_attention_mask=inputs["mask"].to(device),
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    return model(
        noise,
        timestep,
        encoder_hidden_states=text,
        added_cond_kwargs={
            "text_embeds": inputs["pooled"].to(device, dtype),
            "time_ids": inputs["time_ids"].to(device, dtype),
        },
    )


def example_inputs(spec: ModelSpec, config: dict, batch: int = 1, resolution: int | None = None) -> dict[str, Tensor]:
    """Random cached inputs for `batch` samples at `resolution` (default the spec's), shaped as
    `denoiser_call` takes them, on the default device (under `torch.device("meta")`: no memory).
    `config` is the denoiser's architecture config."""
    dtype = spec.torch_dtype
    latent = (resolution or spec.resolution) // 8
    # FLUX always attends to all max_sequence_length T5 tokens (padding included).
    tokens = spec.call_kwargs["max_sequence_length"] if spec.family == "flux" else TEXT_TOKENS[spec.family]
    channels = config["in_channels"] // (4 if spec.family == "flux" else 1)  # FLUX: 2x2 patches of latents
    inputs = {
        "noise": torch.randn(batch, channels, latent, latent),
        "text": torch.randn(batch, tokens, config[TEXT_WIDTH[spec.family]], dtype=dtype),
    }
    if spec.family == "pixart":
        inputs["mask"] = torch.ones(batch, tokens)
    elif spec.family == "flux":
        inputs["pooled"] = torch.randn(batch, config["pooled_projection_dim"], dtype=dtype)
    else:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["pooled"] = torch.randn(batch, pooled, dtype=dtype)
        inputs["time_ids"] = torch.zeros(batch, 6, dtype=dtype)
    return inputs
