"""Transport math: per-neuron affine maps, the 1-D Wasserstein loss and closed-form fits.

Pure functions on tensors whose last dimension indexes neurons (D) and whose second-to-last
dimension indexes samples (N). Everything is computed in float32 and is autograd-friendly.
Notation: a map is `T(z) = omega * z + beta`, and at strength
lambda >= 0 it becomes `(1 + lambda * (omega - 1)) * z + lambda * beta`. A negative strength
is the reverse transport: the same interpolation, by |lambda|, towards the inverse map
`T^-1(z) = (z - beta) / omega` (`inverse_map`), so that `T^-1` undoes `T`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Maps = dict[str, tuple[Tensor, Tensor]]  # layer name -> (omega, beta), each (D,) or (B, D)


# Reverse transport divides by omega. A neuron with |omega| below this floor is inverted as if
# |omega| were the floor (same sign), so its gain is at most 1 / OMEGA_MIN = 10 instead of
# unbounded: the forward map nearly collapsed that neuron, and no map can undo a collapse.
OMEGA_MIN = 0.1


def stack_maps(per_sample: Sequence[Maps | None]) -> Maps:
    """Per-sample maps stacked for one batch: {layer: ((B, D), (B, D))} in float32 over every
    layer any sample steers, a sample without maps for a layer (or None) getting the identity
    there, which at any strength leaves its activations unchanged."""
    identity = {layer: (torch.ones_like(o, dtype=torch.float32), torch.zeros_like(b, dtype=torch.float32))
                for maps in per_sample if maps for layer, (o, b) in maps.items()}
    own = [[(maps or {}).get(layer, pair) for maps in per_sample] for layer, pair in identity.items()]
    return {layer: (torch.stack([o.float() for o, _ in pairs]), torch.stack([b.float() for _, b in pairs]))
            for layer, pairs in zip(identity, own)}


def maps_to(maps: Maps, device: torch.device | str) -> Maps:
    """`maps` with every tensor on `device`, as float32 (no copy where they already are)."""
    return {layer: (o.to(device, torch.float32), b.to(device, torch.float32)) for layer, (o, b) in maps.items()}


def inverse_map(omega: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """(1 / omega, -beta / omega) of `T^-1(z) = (z - beta) / omega`, in float32, with |omega|
    floored at `OMEGA_MIN` (see there; omega = 0 counts as positive)."""
    omega, beta = omega.float(), beta.float()
    floor = torch.where(omega < 0, -OMEGA_MIN, OMEGA_MIN)
    safe = torch.where(omega.abs() < OMEGA_MIN, floor, omega)
    return 1.0 / safe, -beta / safe


def displacement(omega: Tensor, beta: Tensor, strength: float | Tensor) -> tuple[Tensor, Tensor]:
    """(omega_lambda - 1, beta_lambda) of `T^lambda`: how far it moves from the identity, from
    nothing (0) to `T` (1), or to its inverse `T^-1` (-1) for negative strengths; |lambda| > 1
    extrapolates past either end.

    `strength` is a float or a tensor broadcastable against `omega` (e.g. shape (B, 1) for one
    strength per sample of per-sample maps of shape (B, D)); signs may differ between entries.
    """
    omega, beta = omega.float(), beta.float()
    reverse = strength < 0  # a bool, or a bool tensor shaped like `strength`
    if isinstance(reverse, Tensor):
        inverse_omega, inverse_beta = inverse_map(omega, beta)
        omega, beta = torch.where(reverse, inverse_omega, omega), torch.where(reverse, inverse_beta, beta)
    elif reverse:
        omega, beta = inverse_map(omega, beta)
    size = abs(strength)
    return size * (omega - 1.0), size * beta


def at_strength(omega: Tensor, beta: Tensor, strength: float | Tensor) -> tuple[Tensor, Tensor]:
    """Scale and shift of the map `T^lambda` (see `displacement`): (omega_lambda, beta_lambda)."""
    delta, shift = displacement(omega, beta, strength)
    return 1.0 + delta, shift


def apply_affine(
    z: Tensor,
    omega: Tensor,
    beta: Tensor,
    strength: float = 1.0,
    channel_dim: int = -1,
) -> Tensor:
    """Apply `T^lambda` to every neuron of `z` along `channel_dim`, in float32.

    `omega` and `beta` have shape (D,) for one map, or (B, D) for one map per sample (batch
    dimension 0 of `z`). The result has `z`'s dtype. Strength 0 returns `z` itself (the exact
    identity, also for -0.0 and NaN entries).
    """
    if isinstance(strength, (int, float)) and strength == 0:
        return z
    scale, shift = at_strength(omega, beta, strength)
    shape = _broadcast_shape(z, scale, channel_dim)
    out = torch.addcmul(shift.reshape(shape), z.float(), scale.reshape(shape))
    return out.to(z.dtype)


def _broadcast_shape(z: Tensor, params: Tensor, channel_dim: int) -> list[int]:
    channel_dim = channel_dim % z.ndim
    shape = [1] * z.ndim
    shape[channel_dim] = z.shape[channel_dim]
    if params.ndim == 2:  # per-sample maps: (B, D)
        shape[0] = params.shape[0]
    if params.shape[-1] != z.shape[channel_dim]:
        raise ValueError(
            f"map width {params.shape[-1]} does not match activation width {z.shape[channel_dim]}"
        )
    return shape


def w2_per_neuron(x: Tensor, y: Tensor, y_is_sorted: bool = False) -> Tensor:
    """Squared 1-D Wasserstein-2 distance per neuron between equal-size sample sets.

    x, y: (..., N, D). Returns (..., D). For equal-size empirical distributions the optimal
    coupling pairs order statistics, so sorting each column is exact optimal transport.
    """
    if x.shape != y.shape:
        raise ValueError(f"sample sets differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    x_sorted = torch.sort(x.float(), dim=-2).values
    y_sorted = y.float() if y_is_sorted else torch.sort(y.float(), dim=-2).values
    return (x_sorted - y_sorted).pow(2).mean(dim=-2)


def w2_loss(x: Tensor, y: Tensor, y_is_sorted: bool = False) -> Tensor:
    """Mean over neurons (and any leading batch dims) of `w2_per_neuron`: a scalar."""
    return w2_per_neuron(x, y, y_is_sorted).mean()


def residual_ratio(steered: Tensor, source: Tensor, target: Tensor) -> float:
    """`W2(steered, target) / W2(source, target)`: 1 means no change, 0 a perfect match.

    All three are (N, D) pooled activations of one layer (or several layers concatenated).
    """
    base = w2_loss(source, target)
    if base == 0:
        return 0.0 if w2_loss(steered, target) == 0 else math.inf
    return math.sqrt(float(w2_loss(steered, target) / base))


def fit_linear_act(x: Tensor, y: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Linear-AcT closed form: per neuron, least squares `sort(y) ~ omega * sort(x) + beta`.

    x, y: (N, D) source and target samples. Returns omega, beta of shape (D,). A neuron whose
    source samples are constant gets omega = 1 and a pure shift.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    xs = torch.sort(x.float(), dim=0).values
    ys = torch.sort(y.float(), dim=0).values
    x_mean, y_mean = xs.mean(0), ys.mean(0)
    xc, yc = xs - x_mean, ys - y_mean
    var = xc.pow(2).mean(0)
    cov = (xc * yc).mean(0)
    degenerate = var <= eps
    omega = torch.where(degenerate, torch.ones_like(var), cov / var.clamp_min(eps))
    beta = y_mean - omega * x_mean
    return omega, beta


def fit_mean_shift(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean shift (ActAdd-style): omega = 1, beta = mean(y) - mean(x). x, y: (N, D)."""
    beta = y.float().mean(0) - x.float().mean(0)
    return torch.ones_like(beta), beta


def prox_sparse_group_lasso(
    delta_omega: Tensor, beta: Tensor, l1: float, group: float, lr: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Proximal step of the sparse group lasso on one layer's (omega - 1, beta).

    First soft-thresholds every entry by `lr * l1`, then shrinks the layer's whole vector by
    `lr * group * sqrt(D)` in L2 norm (zeroing it if the norm is below that). Returns the new
    (omega - 1, beta): the prox of `l1 * |v|_1 + group * sqrt(D) * |v|_2`. `lr` may be a
    tensor of per-entry step sizes over the concatenated (2D,) vector (Adam's preconditioned
    steps); the group step then uses their mean.
    """
    v = torch.cat([delta_omega.float(), beta.float()], dim=-1)
    if l1 > 0:
        v = torch.sign(v) * (v.abs() - lr * l1).clamp_min(0.0)
    if group > 0:
        step = lr.mean() if isinstance(lr, Tensor) else lr
        threshold = step * group * math.sqrt(delta_omega.shape[-1])
        norm = v.norm(dim=-1, keepdim=True)
        v = v * (1.0 - threshold / norm.clamp_min(1e-12)).clamp_min(0.0)
    d = delta_omega.shape[-1]
    return v[..., :d], v[..., d:]
