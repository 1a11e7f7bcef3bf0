"""The dtype policy: which precision each part of a run computes in.

- Generation (`ht steer`, `ht evaluate`'s images, `build-dataset`) runs the pipeline in the
  spec's dtype (float16 for `pixart` and `dmd2`): no backward pass goes through it.
- Whatever back-propagates through the denoiser (LinEAS, `train-hyper`) never does so in
  float16. At PixArt scale the gradient reaching one activation element is about
  2(x - y) / (layers x concepts x samples x neurons x tokens), around 1e-11: below float16's
  smallest subnormal (6e-8), so it flushes to zero and nothing is learned. bfloat16 has
  float32's exponent range: it is the default on CUDA; float32 on the CPU, where bfloat16
  matmuls are slow and save no memory that matters. Activation-space scoring (residual
  ratios) uses the same dtype, so validation during training equals what `ht score` reports.
- Maps, hypernetwork outputs and losses are float32 everywhere: the hypernetwork runs outside
  any autocast, and the steering hook computes the affine map in float32 before casting back
  to the activation's dtype (`htcli.core.transport.apply_affine`).
"""

from __future__ import annotations

import torch

from htcli.errors import HTError

TRAINING_DTYPES = ("auto", "bfloat16", "float32")


def training_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen denoiser computes in when gradients flow through it (`--dtype`).

    auto: bfloat16 on a CUDA device that supports it, else float32. float16 is refused: its
    gradients underflow (see the module docstring).
    """
    if choice == "float16":
        raise HTError("dtype='float16' is refused for fitting and training: gradients of the W2 loss "
                      "underflow in float16 (use bfloat16, or float32)")
    if choice not in TRAINING_DTYPES:
        raise HTError(f"dtype= must be one of {', '.join(TRAINING_DTYPES)}, got {choice!r}")
    if choice == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, choice)
