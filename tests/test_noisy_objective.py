"""DSD's Phase I as the engine runs it (``objective: noisy``, issue 33), in pure torch: a noisy row is its own
x_{σ_n} (no noise added to it), every drawn σ lies above the row's σ_n, and the loss is DSD's (no ambient weight)
unless ``noisy.extra_weight`` asks for Ambient-o's."""

from __future__ import annotations

import math

import pytest
import torch

from ambient_ray.diffusion import ambient, dsd


def noisy_rows(n=64, sigma_n=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    sn = torch.where(torch.arange(n) % 4 == 0, 0.0, sigma_n)  # a quarter clean
    return x + sn.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g), sn


def test_a_noisy_row_is_its_own_x_sigma_n_and_every_sigma_lies_above_its_sigma_n():
    """observed_noisy: x_{σ_n} is the stored row exactly (the uint8 path would add σ_n noise again), and with the
    buffer off (λ_max = ∞, the noisy objective's default) σ > σ_n on every draw, down to σ_n itself."""
    y, sn = noisy_rows()
    sampler = ambient.SigmaSampler(sn, lambda_max=math.inf)
    g = torch.Generator().manual_seed(1)
    sigmas = []
    for _ in range(50):
        b = ambient.ambient_batch(sampler, y, sn, 32, g, observed_noisy=True)
        assert torch.equal(b.x_sigma_n, y[b.index]) and torch.equal(b.sigma_n, sn[b.index])
        assert bool((b.sigma > b.sigma_n).all())
        sigmas.append(b.sigma[b.sigma_n > 0])
    low = torch.cat(sigmas).min()
    assert 0.2 < float(low) < 0.25  # the restricted log-normal reaches down to σ_n, with no buffer above it
    resid = (b.x_sigma - b.x_sigma_n) / (b.sigma**2 - b.sigma_n**2).sqrt().view(-1, 1, 1, 1)
    assert float(resid.std()) == pytest.approx(1.0, abs=0.05)  # x_σ = y + sqrt(σ² − σ_n²)·ε
    b2 = ambient.ambient_batch(sampler, y, sn, 32, torch.Generator().manual_seed(1))
    assert not torch.equal(b2.x_sigma_n, y[b2.index])  # the uint8 path's way: σ_n noise added to the row


def test_the_noisy_loss_has_no_ambient_weight_unless_asked():
    """batch_loss(extra_weight=False) is DSD's Phase-I loss (dsd.noisy_loss, mean over pixels); with the weight it
    is that times σ⁴/(σ² − σ_n²)² per row (Ambient-o Eq. D.1)."""
    y, sn = noisy_rows()
    sampler = ambient.SigmaSampler(sn, lambda_max=math.inf)
    b = ambient.ambient_batch(sampler, y, sn, 32, torch.Generator().manual_seed(2), observed_noisy=True)
    pred = torch.randn(b.x_sigma.shape, generator=torch.Generator().manual_seed(3))
    _, plain = ambient.batch_loss(pred, b, extra_weight=False)
    ref = dsd.noisy_loss(pred, b.x_sigma, b.x_sigma_n, b.sigma, b.sigma_n).flatten(1).mean(1)
    torch.testing.assert_close(plain, ref)
    _, weighted = ambient.batch_loss(pred, b)
    torch.testing.assert_close(weighted, plain * ambient.ambient_weight(b.sigma, b.sigma_n))


def test_observed_noisy_rows_refuse_crops():
    y, sn = noisy_rows(8)
    with pytest.raises(ValueError, match="train whole"):
        ambient.noise_batch(torch.ones(8), y, sn, torch.full((8,), 4), torch.arange(8), None, observed_noisy=True)
