"""Small random pipelines of families ht ships no spec for, saved as diffusers pipeline folders
(`save_pretrained`), built offline from small configs: their text encoders are random too and
read MiniLM's tokens (as `tiny-flux`'s do)."""

from pathlib import Path

import torch

from htcli.models.spec import shipped_config
from htcli.models.tiny import minilm_tokenizer

TEXT_WIDTH = 32


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(shipped_config("tiny_vae.json"))


def _auraflow():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=TEXT_WIDTH, caption_projection_dim=32,
        pos_embed_max_size=64)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=30522, d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2,
                                          num_heads=4, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0))
    return AuraFlowPipeline(tokenizer=minilm_tokenizer(32), text_encoder=encoder.eval(), vae=_vae(),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())


def _cogview4():
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        text_embed_dim=TEXT_WIDTH, time_embed_dim=16, condition_dim=4, sample_size=8)
    encoder = GlmModel(GlmConfig(vocab_size=30522, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return CogView4Pipeline(tokenizer=minilm_tokenizer(32), text_encoder=encoder.eval(), vae=_vae(),
                            transformer=transformer, scheduler=scheduler)


BUILDERS = {"auraflow": _auraflow, "cogview4": _cogview4}


def save_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """The `family` pipeline, random from `seed`, saved into `folder` (returned)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = BUILDERS[family]()
    pipe.save_pretrained(folder)
    return Path(folder)
