"""The recent real models: SD3.5 Medium, SANA 1600M, FLUX.1-dev and Wan 2.1 T2V 1.3B (video).

Each is a whole diffusers pipeline in one Hub repo, loaded by `pretrained._load_hub_pipeline`
(its denoiser strictly from the repo's `transformer` folder, the rest by diffusers). Their
samplers are the pipelines' own: `schedule="steps"` passes only the number of steps, and
`timesteps` records the schedule each pipeline draws at its default resolution (the values of
`scheduler.timesteps`, rounded; FLUX.1-dev's shifts with the resolution). The sampling defaults
are the model cards' (steps, guidance, resolution, max_sequence_length).
Nothing downloads at import; the architectures ship in `configs/`, so `ht plan` and
`--random-weights` need no download.
"""

from __future__ import annotations

from htcli.models.pretrained import _load_hub_pipeline, _pipeline_denoiser
from htcli.models.spec import ModelSpec, register

SD35_MEDIUM_TIMESTEPS = (1000, 991, 982, 973, 963, 953, 943, 932, 921, 909, 897, 885, 871, 858, 843, 828, 813, 796, 779,
                         761, 741, 721, 700, 678, 654, 629, 602, 574, 544, 511, 477, 440, 400, 357, 311, 261, 206, 147, 81,
                         9)  # 40 steps, flow matching shifted by 3
SANA_TIMESTEPS = (999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617, 562, 499, 428, 345, 249,
                  136)  # 20 steps of Flow-DPM-Solver, shift 3
FLUX_DEV_TIMESTEPS = (1000, 994, 987, 980, 973, 966, 959, 951, 943, 935, 927, 918, 909, 900, 890, 881, 870, 860, 849, 837,
                      826, 813, 801, 788, 774, 760, 745, 729, 713, 696, 678, 659, 640, 619, 598, 575, 551, 526, 499, 471,
                      441, 409, 376, 340, 301, 260, 215, 168, 116, 61)  # 50 steps at 1024 px (resolution-dependent shift)
WAN_TIMESTEPS = (999, 993, 986, 979, 971, 964, 956, 948, 940, 931, 923, 914, 904, 895, 885, 875, 864, 853, 842, 830, 818,
                 805, 792, 779, 765, 750, 735, 719, 702, 685, 667, 648, 628, 607, 586, 563, 539, 514, 487, 459, 429, 398,
                 365, 329, 292, 251, 208, 162, 113, 60)  # 50 steps of UniPC on flow sigmas, shift 3


def _hub(spec_id: str, description: str, family: str, config: str, timesteps: tuple[int, ...], **values) -> ModelSpec:
    """A real model whose whole pipeline (`base_repo`) loads from the Hub and samples on its own
    schedule; the layers to steer are found in its denoiser's module tree (`htcli.models.layers`)."""
    return ModelSpec(id=spec_id, description=description, family=family, denoiser_config=config, timesteps=timesteps,
                     loader=_load_hub_pipeline, denoiser_loader=_pipeline_denoiser, schedule="steps", **values)


register(_hub(
    "sd35-medium", "Stable Diffusion 3.5 Medium (Stability AI): MMDiT-X, three text encoders, 40 steps, 1024 px",
    "sd3", "sd35_medium_transformer.json", SD35_MEDIUM_TIMESTEPS,
    resolution=1024, dtype="bfloat16", guidance_scale=4.5, base_repo="stabilityai/stable-diffusion-3.5-medium",
    licence="Stability AI Community License (free below USD 1M annual revenue; a licence from Stability AI above)",
    hub_license="other", call_kwargs={"max_sequence_length": 256},
))
register(_hub(
    "sana", "SANA 1600M (NVIDIA): linear-attention DiT, Gemma-2 text encoder, 32x DC-AE, 20 steps, 1024 px",
    "sana", "sana_1600m_transformer.json", SANA_TIMESTEPS,
    resolution=1024, dtype="float16", guidance_scale=4.5, base_repo="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    licence="NVIDIA NSCL v2-custom (non-commercial); Gemma Terms of Use for its Gemma-2-2B-IT text encoder",
    hub_license="other", call_kwargs={"max_sequence_length": 300, "use_resolution_binning": False},
))
register(_hub(
    "flux-dev", "FLUX.1-dev (Black Forest Labs): guidance-distilled rectified-flow transformer, 50 steps, 1024 px",
    "flux", "flux_dev_transformer.json", FLUX_DEV_TIMESTEPS,
    resolution=1024, dtype="bfloat16", guidance_scale=3.5,  # the distilled guidance, an input of the transformer
    base_repo="black-forest-labs/FLUX.1-dev",
    licence="FLUX.1 [dev] Non-Commercial License (the weights: non-commercial use only)",
    hub_license="other", call_kwargs={"max_sequence_length": 512},
))
register(_hub(
    "wan-t2v", "Wan 2.1 T2V 1.3B (Alibaba): text-to-VIDEO DiT, UMT5 text encoder, 81 frames, 50 steps, 480 px",
    "wan", "wan21_t2v_1_3b_transformer.json", WAN_TIMESTEPS,
    resolution=480, dtype="bfloat16", guidance_scale=5.0, base_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    licence="Apache-2.0", video=True, call_kwargs={"num_frames": 81, "max_sequence_length": 512},
))
