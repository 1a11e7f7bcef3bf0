"""Transport math against oracles: POT's 1-D Wasserstein, known Gaussian maps, identities."""

import numpy as np
import ot
import pytest
import torch

from htcli.core.transport import (
    apply_affine,
    fit_linear_act,
    fit_mean_shift,
    prox_sparse_group_lasso,
    residual_ratio,
    w2_loss,
    w2_per_neuron,
)


@pytest.mark.parametrize("n,d", [(2, 1), (32, 7), (128, 64), (33, 5)])
def test_w2_matches_pot_values_and_gradients(n, d):
    g = torch.Generator().manual_seed(n * 100 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.randn(n, d, generator=g, dtype=torch.float64).exp()
    ours = w2_per_neuron(x, y).double()
    pot = torch.tensor([ot.wasserstein_1d(x[:, j].numpy(), y[:, j].numpy(), p=2) for j in range(d)])
    torch.testing.assert_close(ours, pot, rtol=1e-5, atol=1e-6)

    # Gradients: POT's torch backend differentiates the same quantity.
    xg = x.clone().requires_grad_(True)
    w2_loss(xg, y).backward()
    xp = x.clone().requires_grad_(True)
    ot.wasserstein_1d(xp, y, p=2).mean().backward()
    torch.testing.assert_close(xg.grad.double(), xp.grad, rtol=1e-4, atol=1e-7)


def test_w2_batched_over_concepts_and_presorted_target():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    per_concept = torch.stack([w2_loss(x[k], y[k]) for k in range(3)])
    torch.testing.assert_close(w2_loss(x, y), per_concept.mean())
    torch.testing.assert_close(w2_loss(x, torch.sort(y, dim=-2).values, y_is_sorted=True), w2_loss(x, y))
    with pytest.raises(ValueError):
        w2_loss(x, y[:, :8])


def test_linear_act_recovers_known_gaussian_transport():
    # Target = a known affine map of the source Gaussian, observed in another order: the 1-D
    # OT map between the two empirical distributions is exactly that map.
    g = torch.Generator().manual_seed(1)
    d, n = 16, 4096
    mu, s = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    a, b = torch.rand(d, generator=g) * 2 + 0.2, torch.randn(d, generator=g) * 3
    x = mu + s * torch.randn(n, d, generator=g)
    y = (a * x + b)[torch.randperm(n, generator=g)]
    omega, beta = fit_linear_act(x, y)
    assert ((omega - a).abs() / a).max() < 1e-2
    assert ((beta - b).abs() / b.abs()).max() < 1e-2
    assert residual_ratio(apply_affine(x, omega, beta), x, y) < 1e-2


def test_linear_act_between_independent_gaussian_samples():
    # Independent draws: the estimate carries sampling noise of order 1/sqrt(N) only.
    g = torch.Generator().manual_seed(2)
    d, n = 16, 4096
    mu, s = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    a, b = torch.rand(d, generator=g) * 2 + 0.2, torch.randn(d, generator=g) * 3
    x = mu + s * torch.randn(n, d, generator=g)
    y = (a * mu + b) + a * s * torch.randn(n, d, generator=g)
    omega, beta = fit_linear_act(x, y)
    assert ((omega - a).abs() / a).mean() < 2e-2
    assert ((omega - a).abs() / a).max() < 1e-1
    assert residual_ratio(apply_affine(x, omega, beta), x, y) < 0.1


def test_linear_act_constant_neuron_is_a_pure_shift():
    x = torch.ones(10, 2)
    x[:, 1] = torch.arange(10.0)
    y = x + 3
    omega, beta = fit_linear_act(x, y)
    torch.testing.assert_close(omega, torch.ones(2))
    torch.testing.assert_close(beta, torch.full((2,), 3.0))


def test_mean_shift():
    x, y = torch.randn(50, 4), torch.randn(50, 4) + torch.tensor([1.0, -2.0, 0.0, 5.0])
    omega, beta = fit_mean_shift(x, y)
    assert torch.equal(omega, torch.ones(4))
    torch.testing.assert_close(beta, y.mean(0) - x.mean(0))


def test_strength_zero_is_bit_exact_and_one_is_the_map():
    z = torch.randn(2, 5, 4).to(torch.bfloat16)
    z[0, 0, 0] = -0.0
    omega, beta = torch.rand(4) + 0.5, torch.randn(4)
    assert apply_affine(z, omega, beta, 0.0) is z
    full = apply_affine(z, omega, beta, 1.0)
    torch.testing.assert_close(full, (z.float() * omega + beta).to(torch.bfloat16))
    half = apply_affine(z.float(), omega, beta, 0.5)
    torch.testing.assert_close(half, z.float() * (1 + 0.5 * (omega - 1)) + 0.5 * beta)


def test_half_precision_map_is_computed_in_float32():
    # omega * z overflows float16 (max 65504) although the result fits: only float32 math gets it.
    z = torch.full((1, 3), 300.0, dtype=torch.float16)
    omega, beta = torch.full((3,), 300.0), torch.full((3,), -89_000.0)
    out = apply_affine(z, omega, beta)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.full((1, 3), 1000.0, dtype=torch.float16))


def test_feature_maps_and_per_sample_maps():
    z = torch.randn(3, 4, 2, 2)  # (B, C, H, W)
    omega, beta = torch.rand(3, 4), torch.randn(3, 4)
    out = apply_affine(z, omega, beta, channel_dim=1)
    for i in range(3):
        torch.testing.assert_close(out[i], z[i] * omega[i, :, None, None] + beta[i, :, None, None])


def test_prox_sparse_group_lasso():
    dw, b = torch.tensor([0.5, -0.05, 0.0]), torch.tensor([0.02, -1.0, 0.3])
    # L1 alone: soft threshold.
    w1, b1 = prox_sparse_group_lasso(dw, b, l1=0.1, group=0.0, lr=1.0)
    torch.testing.assert_close(w1, torch.tensor([0.4, 0.0, 0.0]))
    torch.testing.assert_close(b1, torch.tensor([0.0, -0.9, 0.2]))
    # Group alone: uniform shrink of the whole vector's norm by lr * group * sqrt(D).
    v = torch.cat([dw, b])
    w2, b2 = prox_sparse_group_lasso(dw, b, l1=0.0, group=0.1, lr=1.0)
    expected = v * (1 - 0.1 * 3**0.5 / v.norm())
    torch.testing.assert_close(torch.cat([w2, b2]), expected)
    # A big group penalty zeroes the layer: it returns to the identity map.
    w3, b3 = prox_sparse_group_lasso(dw, b, l1=0.0, group=10.0, lr=1.0)
    assert not w3.any() and not b3.any()


def test_residual_ratio_bounds():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g) + 2
    assert residual_ratio(x, x, y) == pytest.approx(1.0)
    assert residual_ratio(y, x, y) == 0.0
    assert np.isfinite(residual_ratio(x + 1, x, y)) and residual_ratio(x + 1, x, y) < 1
