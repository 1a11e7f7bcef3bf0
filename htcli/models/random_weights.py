"""Every real model spec at full width with seeded random weights, and no download (`--random-weights`).

With $HT_RANDOM_WEIGHTS set (the CLI's `--random-weights` sets it), `get_model` returns a real
spec's random-weights variant (`random_variant`). It keeps the spec's id, denoiser architecture,
hooks, timesteps and dtype, and changes where the weights come from:

- the denoiser: its shipped config at full width, each module's weights drawn as torch.nn
  initialises them from a seed of its own name (so a block's weights do not depend on how many
  blocks the model has; the few parameters diffusers draws in its constructors, such as
  PixArt's scale-shift tables, come from one seed in the order they are built), written once
  to a safetensors file in the spec's dtype in the cache
  folder ($HT_CACHE, default ~/.cache/ht), then loaded by the real weights' own code
  (`htcli.models.pretrained`: the same safetensors reading, dtype conversion and device placement);
- the text encoders: the real ones' output widths (T5-XXL: 4096; SDXL's CLIP-L and OpenCLIP
  bigG: 768 and 1280; FLUX's CLIP-L and T5-XXL: 768 and 4096; SD3.5's all three; SANA's
  Gemma-2-2B: 2304; Wan's UMT5-XXL: 4096) with one layer each, reading
  all-MiniLM-L6-v2's tokenizer (the real tokenizers are not available offline), as `tiny` does;
- the VAE: the real config and class (latent channels, scaling and shift; SANA's DC-AE, Wan's
  video VAE) with narrow channels;
- the scheduler: the real pipeline's, from its config values;
- the concept encoder: MiniLM (offline).

$HT_RANDOM_BLOCKS=N caps each block count of the denoiser at N: FLUX.1-schnell's 12B parameters
at full width take 24 GiB in bfloat16; its first blocks alone fit a small machine, with the
same weights as in the full model.

Random weights measure memory, speed and the code paths at full width. Their images are noise
and their quality numbers mean nothing: the variant is `offline`, so every output says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from htcli.core.files import save_tensors
from htcli.errors import HTError
from htcli.models.pretrained import PIPELINES, EmptyParameters, _distilled_denoiser
from htcli.models.spec import (
    CONFIG_DIR,
    ModelSpec,
    build_meta_denoiser,
    denoiser_class,
    denoiser_config,
    register_random_variant,
    shipped_config,
)
from htcli.models.tiny import _seeded, minilm_tokenizer

SEED = 0
DRAW_VERSION = 1  # part of the cache key: bump it when `draw_weights` draws differently
CACHE_VARIABLE = "HT_CACHE"
BLOCKS_VARIABLE = "HT_RANDOM_BLOCKS"
# The denoiser config keys that count blocks, per family (SDXL's UNet: transformer blocks per attention).
BLOCK_COUNTS = {"pixart": ("num_layers",), "flux": ("num_layers", "num_single_layers"),
                "sdxl": ("transformer_layers_per_block",), "sd3": ("num_layers",), "sana": ("num_layers",),
                "wan": ("num_layers",)}
VAE_WIDTH = 32  # channels of every VAE block: the real VAEs' 128-512 only cost time on noise images
MINILM_VOCABULARY = 30522  # the text encoders read MiniLM's (BERT) tokens


def cache_dir() -> Path:
    """$HT_CACHE, else $XDG_CACHE_HOME/ht, else ~/.cache/ht."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ht"


def block_cap() -> int | None:
    """$HT_RANDOM_BLOCKS: the most blocks of each kind a random denoiser keeps (None: all)."""
    value = os.environ.get(BLOCKS_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise HTError(f"{BLOCKS_VARIABLE} must be a positive number of blocks, got {value!r}")
    return int(value)


def random_variant(spec: ModelSpec) -> ModelSpec:
    """`spec` with seeded random weights at full width (block counts capped by $HT_RANDOM_BLOCKS)."""
    cap, overrides = block_cap(), {}
    if cap is not None:
        shipped = denoiser_config(spec)
        for key in BLOCK_COUNTS[spec.family]:
            counts = shipped[key]
            overrides[key] = [min(n, cap) for n in counts] if isinstance(counts, list) else min(counts, cap)
    blocks = f", at most {cap} blocks of each kind" if cap is not None else ""
    return replace(spec, description=f"{spec.description}; random weights at full width{blocks} (--random-weights)",
                   loader=load_random_pipeline, denoiser_loader=load_random_denoiser, concept_encoder="minilm",
                   offline=True, base_repo=None, weights=(), config_overrides=overrides, random_weights=True)


register_random_variant(random_variant)


# --- the denoiser: drawn once, then loaded like the real weights ---------------------------------


def weights_path(spec: ModelSpec) -> Path:
    """Where the random denoiser of `spec` is cached: named by its architecture, dtype and seed
    (`dmd2` and `dmd2-1step` share one file)."""
    key = json.dumps([denoiser_config(spec), spec.dtype, SEED, DRAW_VERSION], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "random-weights" / f"{Path(spec.denoiser_config).stem}-{spec.dtype}-{digest}.safetensors"


def draw_weights(spec: ModelSpec, seed: int = SEED) -> dict[str, Tensor]:
    """The denoiser's state dict, random, in the spec's dtype: each module with parameters is
    initialised by torch.nn's `reset_parameters` from the seed `seed + crc32(its name)`, one
    module at a time (no float32 copy of the whole model: DMD2's UNet alone is 10 GB in float32)."""
    dtype = spec.torch_dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # for the few parameters diffusers draws in its constructors
        with EmptyParameters():
            model = denoiser_class(spec).from_config(denoiser_config(spec))
        state: dict[str, Tensor] = {}
        for name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if all(p.is_meta for p in own.values()):
                torch.manual_seed(seed + zlib.crc32(name.encode()))
                module.to_empty(device="cpu", recurse=False)
                module.reset_parameters()
            for key, param in module.named_parameters(recurse=False):
                state[f"{name}.{key}" if name else key] = param.detach().to(dtype)
            module.to_empty(device="meta", recurse=False)  # frees the float32 values
        for key, tensor in model.state_dict().items():  # persistent buffers
            if key not in state:
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def random_weights_file(spec: ModelSpec) -> Path:
    """The random denoiser's safetensors file, drawn and written (atomically) on first use."""
    path = weights_path(spec)
    if not path.is_file():
        save_tensors(path, draw_weights(spec), {"format": "ht-random-weights/1", "seed": str(SEED),
                                                "config": json.dumps(denoiser_config(spec))})
    return path


def _no_model_path(spec: ModelSpec, model_path: str | None) -> None:
    if model_path:
        raise HTError(f"model_path={str(model_path)!r} (or HT_MODEL_PATH) names real weights, and random_weights=True "
                      f"uses none: drop one of them to run {spec.id}")


def load_random_denoiser(spec: ModelSpec, dtype: torch.dtype, device: str | torch.device,
                         model_path: str | None = None) -> torch.nn.Module:
    """The random denoiser in `dtype` on `device`, read from its file by the distilled weights' loader."""
    _no_model_path(spec, model_path)
    return _distilled_denoiser(replace(spec, weights=(str(random_weights_file(spec)),)), dtype, device)


# --- the rest of the pipeline: shallow text encoders of the real widths, the real VAE config ------

# The T5-XXL encoder of PixArt-Sigma and FLUX (google/t5-v1_1-xxl), with one layer.
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64, "feed_forward_proj": "gated-gelu",
          "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32}
# CLIP ViT-L/14's text tower (SDXL's and FLUX's first encoder) and OpenCLIP ViT-bigG/14's (SDXL's second).
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768,
          "hidden_act": "quick_gelu"}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "projection_dim": 1280,
              "hidden_act": "gelu"}
# Each family's VAE config file (its class is the file's _class_name), and its scheduler: class
# and the real pipeline's config values (by spec id where two specs of a family differ).
VAES = {"pixart": "sdxl_vae.json", "sdxl": "sdxl_vae.json", "flux": "flux_vae.json", "sd3": "sd3_vae.json",
        "sana": "sana_vae.json", "wan": "wan_vae.json"}
FLOW_SIGMAS = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart": ("DPMSolverMultistepScheduler", {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                               "num_train_timesteps": 1000, "prediction_type": "epsilon"}),
    "sdxl": ("LCMScheduler", {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                              "num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}),
    "flux": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 1.0,
                                                 "use_dynamic_shifting": False}),
    "flux-dev": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0,
                                                     "use_dynamic_shifting": True, "base_shift": 0.5,
                                                     "max_shift": 1.15, "base_image_seq_len": 256,
                                                     "max_image_seq_len": 4096}),
    "sd3": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    "sana": ("DPMSolverMultistepScheduler", FLOW_SIGMAS),
    "wan": ("UniPCMultistepScheduler", FLOW_SIGMAS),
}
# The text encoders that follow: Gemma-2-2B's (SANA) and UMT5-XXL's (Wan) widths.
GEMMA2_2B = {"hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8, "num_key_value_heads": 4,
             "head_dim": 256, "query_pre_attn_scalar": 256}


def _t5(dtype: torch.dtype, seed: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=MINILM_VOCABULARY, num_layers=1, pad_token_id=0, eos_token_id=102,  # BERT's [SEP]
                          decoder_start_token_id=0, **T5_XXL)
    return _seeded(lambda: model._from_config(config, torch_dtype=dtype).eval(), seed)


def _clip(widths: dict[str, Any], with_projection: bool, dtype: torch.dtype, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=MINILM_VOCABULARY, num_hidden_layers=1, max_position_embeddings=77,
                            bos_token_id=101, eos_token_id=102, pad_token_id=0, **widths)  # BERT's [CLS], [SEP]
    model = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(lambda: model._from_config(config, torch_dtype=dtype).eval(), seed)


def _gemma2(dtype: torch.dtype, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=MINILM_VOCABULARY, num_hidden_layers=1, pad_token_id=0, bos_token_id=101,
                          eos_token_id=102, **GEMMA2_2B)
    return _seeded(lambda: Gemma2Model._from_config(config, torch_dtype=dtype).eval(), seed)


def _vae(family: str, seed: int):
    """The family's VAE from its real config, every level `VAE_WIDTH` channels wide (Wan's: its
    base width a quarter of that, its levels multiplying it)."""
    import diffusers

    config = shipped_config(VAES[family])
    for key in ("block_out_channels", "encoder_block_out_channels", "decoder_block_out_channels"):
        if key in config:
            config[key] = [VAE_WIDTH] * len(config[key])
    if "base_dim" in config:
        config["base_dim"] = VAE_WIDTH // 4
    vae_class = getattr(diffusers, json.loads((CONFIG_DIR / VAES[family]).read_text())["_class_name"])
    return _seeded(lambda: vae_class.from_config(config), seed)


def _scheduler(spec: ModelSpec):
    import diffusers

    name, config = SCHEDULERS.get(spec.id) or SCHEDULERS[spec.family]
    with torch.device("cpu"):  # also when the rest is built on the meta device: schedulers compute their tables
        return getattr(diffusers, name).from_config(config)


def _text_encoders(family: str, dtype: torch.dtype) -> dict[str, Any]:
    """The family's tokenizers and shallow random text encoders, as pipeline components."""
    def clip_l(seed: int, with_projection: bool = False):
        return _clip(CLIP_L, with_projection, dtype, seed)

    if family == "pixart":
        return {"tokenizer": minilm_tokenizer(512), "text_encoder": _t5(dtype, SEED + 2)}
    if family == "sdxl":
        return {"tokenizer": minilm_tokenizer(77), "text_encoder": clip_l(SEED + 2),
                "tokenizer_2": minilm_tokenizer(77), "text_encoder_2": _clip(CLIP_BIG_G, True, dtype, SEED + 3)}
    if family == "flux":
        return {"tokenizer": minilm_tokenizer(77), "text_encoder": clip_l(SEED + 2),
                "tokenizer_2": minilm_tokenizer(512), "text_encoder_2": _t5(dtype, SEED + 3)}
    if family == "sd3":
        return {"tokenizer": minilm_tokenizer(77), "text_encoder": clip_l(SEED + 2, with_projection=True),
                "tokenizer_2": minilm_tokenizer(77), "text_encoder_2": _clip(CLIP_BIG_G, True, dtype, SEED + 3),
                "tokenizer_3": minilm_tokenizer(512), "text_encoder_3": _t5(dtype, SEED + 4)}
    if family == "sana":
        return {"tokenizer": minilm_tokenizer(512), "text_encoder": _gemma2(dtype, SEED + 2)}
    return {"tokenizer": minilm_tokenizer(512), "text_encoder": _t5(dtype, SEED + 2, umt5=True)}  # wan


def load_random_pipeline(spec: ModelSpec, model_path: str | None, device, dtype: torch.dtype) -> Any:
    """The spec's diffusers pipeline with its random denoiser (`load_random_denoiser`), shallow
    random text encoders of the real widths and the real VAE config, in `dtype` on `device` (on
    the meta device: its structure, no weights drawn)."""
    _no_model_path(spec, model_path)
    if torch.device(device).type == "meta":  # the structure alone (`htcli.models.plan`): nothing drawn
        with torch.device("meta"):
            return _random_pipeline(spec, torch.nn.Module.to(build_meta_denoiser(spec), dtype=dtype), dtype)
    return _random_pipeline(spec, load_random_denoiser(spec, dtype, device), dtype).to(device)


def _random_pipeline(spec: ModelSpec, denoiser: torch.nn.Module, dtype: torch.dtype) -> Any:
    """The spec's pipeline around `denoiser`, with the other components random, in `dtype`."""
    import diffusers

    pipelines = {"pixart": "PixArtSigmaPipeline", "sdxl": "StableDiffusionXLPipeline", **PIPELINES}
    vae = torch.nn.Module.to(_vae(spec.family, SEED + 1), dtype=dtype)  # not diffusers' `to`, which warns on every cast
    return getattr(diffusers, pipelines[spec.family])(vae=vae, scheduler=_scheduler(spec), **{spec.denoiser_attr: denoiser},
                                                      **_text_encoders(spec.family, dtype))


def check_same_weights(spec: ModelSpec, random_weights: bool, what: str) -> None:
    """Refuse `what` (a dataset, a hypernetwork...) made on random weights for a spec with its
    real weights, and the reverse: its numbers would belong to other weights."""
    if spec.random_weights == random_weights:
        return
    if random_weights:
        raise HTError(f"{what} was made on {spec.id}'s architecture with random weights: pass random_weights=True "
                      "(or set HT_RANDOM_WEIGHTS=1) to use it; it is meaningless for the real model")
    raise HTError(f"{what} was made on {spec.id}'s real weights, and random_weights=True (or HT_RANDOM_WEIGHTS) asks "
                  "for random ones: drop it to use this, or make one with random_weights=True")
