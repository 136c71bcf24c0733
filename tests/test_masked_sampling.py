"""The samplers of a network trained on masked data (Ambient Diffusion, seed paper 003, Eq. 3.3 and 3.4) against the
exact denoiser of Gaussian data, reconstruction guidance's gradient, restoration, and the registry's entries."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ambient_ray.config import ConfigError, build
from ambient_ray.diffusion.masked import gaussian_posterior_mean
from ambient_ray.diffusion.samplers import heun_sample
from ambient_ray.sampling import SAMPLERS, Batch, SamplerConfig
from ambient_ray.sampling.draw import draw
from ambient_ray.sampling.masked import (
    draw_masks,
    fixed_mask,
    guidance_gradient,
    masked_heun,
    posterior_mean,
    reconstruction_guidance,
    restore,
)

D = 6  # the toy: x0 ~ N(MU, COV) in 6 dimensions, an "image" of 1 channel, 1 x 6 pixels
N = 20000
OBSERVED = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)  # S, the fixed mask's pixels


def _toy():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.linspace(0.05, 0.5, D, dtype=torch.float64)) @ q.T
    mu = 0.3 * torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5, 1.0], dtype=torch.float64)
    return mu, cov


MU, COV = _toy()


class Gaussian:
    """The exact D(x; σ, Ã) = E[x0 | Ã x_σ, Ã] = μ + Σ_{:,S}(Σ_SS + σ²I)⁻¹(x_S − μ_S) (S = Ã's pixels) on images
    (N, 1, 1, D), a mask per row; ``ignore_mask``: the full-observation denoiser whatever the mask says."""

    def __init__(self, mu=MU, cov=COV, ignore_mask=False):
        self.mu, self.cov, self.ignore_mask = mu, cov, ignore_mask

    def rows(self, flat: torch.Tensor, seen: torch.Tensor, sigma: float) -> torch.Tensor:
        if not seen.any():
            return self.mu.expand_as(flat)
        return gaussian_posterior_mean(self.mu, self.cov, flat, seen, sigma)

    def __call__(self, x, sigma, mask):
        assert sigma.shape == (x.shape[0],) and bool((sigma == sigma[0]).all())
        n, s = x.shape[0], float(sigma[0])
        flat = x.reshape(n, D).to(torch.float64)
        seen = torch.ones(n, D, dtype=torch.bool) if self.ignore_mask else mask.reshape(n, D).bool()
        if bool((seen == seen[0]).all()):
            return self.rows(flat, seen[0], s).reshape(x.shape)
        out = torch.zeros_like(flat)
        patterns, which = torch.unique(seen, dim=0, return_inverse=True)
        for j, pattern in enumerate(patterns):
            rows = (which == j).nonzero()[:, 0]
            out = out.index_put((rows,), self.rows(flat[rows], pattern, s))
        return out.reshape(x.shape)


def _image(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, D)


def _whitened_cov_error(x: torch.Tensor, cov: torch.Tensor) -> float:
    """max |Σ^(-1/2) Ĉ Σ^(-1/2) − I|: each entry has standard error at most sqrt(2/n)."""
    w = torch.linalg.inv(torch.linalg.cholesky(cov))
    return (w @ torch.cov(x.T) @ w.T - torch.eye(cov.shape[0], dtype=cov.dtype)).abs().max().item()


# ------------------------------------------------------------------------------------ the fixed-mask sampler


@pytest.mark.parametrize("steps", [18, 64])
def test_the_fixed_mask_sampler_keeps_the_seen_marginal_and_fills_the_rest_with_its_conditional_mean(steps):
    """Why: the exact D(x; σ, S) depends on x_S only, and its S part μ_S + Σ_SS(Σ_SS + σ²)⁻¹(x_S − μ_S) is the exact
    denoiser of the marginal N(μ_S, Σ_SS); so under a fixed mask the seen coordinates follow that marginal's
    probability-flow ODE (checked per sample: they equal EDM's Heun sampler on the 3-dimensional marginal with the
    same latents, to 1e-9) and end ~ N(μ_S, Σ_SS). The hidden coordinates never feed back into D: the returned
    prediction's hidden part is μ_H + Σ_HS(Σ_SS + σ_min²)⁻¹(x_S − μ_S) and its seen part μ_S + Σ_SS(Σ_SS +
    σ_min²)⁻¹(x_S − μ_S), so hidden = E[x_H | x_S] of the returned seen part exactly (to 1e-9, per sample).

    The law of the seen part, 20k samples, no clipping: at 64 steps the whitened covariance is the identity within
    0.06 (4 standard errors sqrt(2/n) = 0.04, plus Heun's discretisation at 64 steps, a variance ~1% too large on
    this toy) and the mean within 0.03 (4 standard errors of 0.005 plus the start's mismatch: x = σ_max·z with no μ
    term leaves ≤ |μ|·√λ_max/σ_max ≈ 0.003). At the paper's 18 steps Heun's own error is larger (the variance
    10-15% too large on this toy, as tests/test_sampling.py finds for the unmasked sampler), so there the check is
    the per-sample equality with the project's Heun sampler."""
    lat = torch.randn(N, 1, 1, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    masks = _image(OBSERVED.double()).expand(N, 1, 1, D)
    out = masked_heun(Gaussian(), lat, masks, steps=steps, clip=False).reshape(N, D)
    s, h = OBSERVED, ~OBSERVED
    seen = out[:, s]

    mu_s, cov_ss = MU[s], COV[s][:, s]

    def marginal(x, sigma, class_labels=None):  # the exact denoiser of N(μ_S, Σ_SS)
        all3 = torch.ones(3, dtype=torch.bool)
        return gaussian_posterior_mean(mu_s, cov_ss, x.reshape(-1, 3), all3, float(sigma[0])).reshape(x.shape)

    ref = heun_sample(marginal, lat.reshape(N, D)[:, s].reshape(N, 1, 1, 3), num_steps=steps).reshape(N, 3)
    assert torch.allclose(seen, ref, atol=1e-9, rtol=0)

    conditional = MU[h] + (seen - mu_s) @ torch.linalg.solve(cov_ss, COV[s][:, h])
    assert torch.allclose(out[:, h], conditional, atol=1e-9, rtol=0)

    if steps == 64:
        assert _whitened_cov_error(seen, cov_ss) < 4 * math.sqrt(2 / N) + 0.02
        assert (seen.mean(0) - mu_s).abs().max().item() < 0.03


def test_each_image_keeps_its_own_mask_and_the_prediction_is_clipped():
    """Two images with different masks, one batch: each equals the sampler run on it alone; with ``clip`` every
    prediction the update uses lies in [-1, 1], so the result does too (a Gaussian of std ~3 would leave it)."""
    lat = torch.randn(2, 1, 1, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    masks = _image(torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.float64))
    both = masked_heun(Gaussian(), lat, masks, steps=8, clip=False)
    for i in range(2):
        alone = masked_heun(Gaussian(), lat[i : i + 1], masks[i : i + 1], steps=8, clip=False)
        assert torch.allclose(both[i : i + 1], alone, atol=1e-12)
    wide = Gaussian(cov=9 * COV)
    out = masked_heun(wide, lat.repeat(32, 1, 1, 1), masks.repeat(32, 1, 1, 1), steps=8)
    assert out.abs().max().item() <= 1.0
    assert masked_heun(wide, lat, masks, steps=8, clip=False).abs().max().item() > 1.0


def test_masks_are_drawn_at_the_density_one_per_image():
    g = torch.Generator().manual_seed(3)
    m = draw_masks(64, (16, 16), 0.3, g)
    assert m.shape == (64, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert m.mean().item() == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / m.numel()))
    assert not torch.equal(m[0], m[1])
    assert draw_masks(2, (4, 4), 0.0).sum() == 0 and draw_masks(2, (4, 4), 1.0).mean() == 1
    with pytest.raises(ValueError, match="density"):
        draw_masks(2, (4, 4), 1.5)


# ------------------------------------------------------------------------------------ reconstruction guidance


def _masks(k: int, n: int, seed: int) -> torch.Tensor:
    return _image(draw_masks(k * n, (1, D), 0.5, torch.Generator().manual_seed(seed)).double()).reshape(k, n, 1, 1, D)


def test_the_guidance_gradient_is_the_analytic_one():
    """For the Gaussian D_k(x) = μ + G_k(x − μ) is affine (G_k: Σ_{:,S_k}(Σ_{S_k S_k} + σ²)⁻¹ on S_k's columns), so
    ∇_x ½Σ_k‖D_1 − D_k‖² = Σ_k (G_1 − G_k)ᵀ(D_1 − D_k): the gradient flows through D_1 as well as the D_k."""
    sigma, k, n = 0.7, 4, 5
    masks = _masks(k, n, 4)
    x = torch.randn(n, 1, 1, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    d1, grad = guidance_gradient(Gaussian(), x, torch.tensor(sigma, dtype=torch.float64), masks, clip=False)

    def gain(seen: torch.Tensor) -> torch.Tensor:
        g = torch.zeros(D, D, dtype=torch.float64)
        if seen.any():
            eye = torch.eye(int(seen.sum()), dtype=torch.float64)
            g[:, seen] = COV[:, seen] @ torch.linalg.inv(COV[seen][:, seen] + sigma**2 * eye)
        return g

    flat = x.reshape(n, D)
    for i in range(n):
        gains = [gain(masks[j, i].reshape(D).bool()) for j in range(k)]
        preds = [MU + gk @ (flat[i] - MU) for gk in gains]
        want = sum((gains[0] - gains[j]).T @ (preds[0] - preds[j]) for j in range(1, k))
        assert torch.allclose(grad.reshape(n, D)[i], want, atol=1e-12)
        assert torch.allclose(d1.reshape(n, D)[i], preds[0], atol=1e-12)


def test_guidance_is_zero_when_the_masks_agree_and_moves_the_state_otherwise():
    """A denoiser that ignores the mask predicts the same under every mask: the gradient is 0 and the guided
    trajectory is the unguided one (even at weight 1). Under the masks' own predictions the paper's w = 5e-4 moves
    it, and the masks' predictions at the end disagree less than without guidance."""
    n, k = 256, 4
    lat = torch.randn(n, 1, 1, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    masks = _masks(k, n, 7)
    blind = Gaussian(ignore_mask=True)
    plain = masked_heun(blind, lat, masks[0], steps=10)
    guided = masked_heun(blind, lat, masks[0], steps=10, guidance_masks=masks[1:], weight=1.0)
    assert torch.allclose(guided, plain, atol=1e-12, rtol=0)
    _, grad = guidance_gradient(blind, lat, torch.tensor(1.0, dtype=torch.float64), masks)
    assert grad.abs().max().item() < 1e-12

    plain = masked_heun(Gaussian(), lat, masks[0], steps=10, clip=False)
    guided = masked_heun(Gaussian(), lat, masks[0], steps=10, clip=False, guidance_masks=list(masks[1:]), weight=5e-4)
    assert (guided - plain).abs().max().item() > 1e-6
    stronger = masked_heun(Gaussian(), lat, masks[0], steps=10, clip=False, guidance_masks=masks[1:], weight=0.05)

    def disagreement(x):  # ½Σ_k‖D_1 − D_k‖² at σ_min, per image, averaged
        preds = torch.stack([Gaussian()(x, torch.full((n,), 0.002, dtype=torch.float64), m) for m in masks])
        return 0.5 * (preds[:1] - preds[1:]).square().sum().item() / n

    assert disagreement(stronger) < disagreement(plain)


def test_the_guidance_weight_is_checked():
    lat = torch.randn(2, 1, 1, D, dtype=torch.float64)
    masks = _masks(2, 2, 8)
    with pytest.raises(ValueError, match="guidance weight"):
        masked_heun(Gaussian(), lat, masks[0], guidance_masks=masks[1:], weight=-1.0)
    with pytest.raises(ValueError, match="does not fit"):
        masked_heun(Gaussian(), lat, masks[0][:1])


# ------------------------------------------------------------------------------------ restoration


def _observation(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = _image(MU + torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).T)
    a = _image((torch.rand(n, D, generator=g) < 0.5).double())
    a[:, :, :, 0] = 1  # every row sees something
    return torch.where(a.bool(), y, torch.full_like(y, math.nan)), a


def test_restore_keeps_the_observed_pixels_and_no_nan_from_the_hidden_ones():
    y, a = _observation(64, 9)
    calls = []

    def spy(x, sigma, mask):
        calls.append((x.clone(), sigma.clone()))
        return Gaussian()(x, sigma, mask)

    out = restore(spy, y, a, steps=6, generator=torch.Generator().manual_seed(10))
    assert not out.isnan().any()
    assert torch.equal(out[a.expand_as(y).bool()], y[a.expand_as(y).bool()])
    seen = a.expand_as(y).bool()
    z = (calls[0][0] - torch.where(seen, y, 0.0)) / 80.0  # the start: σ_max·z, y + σ_max·z on the observed pixels
    for x, sigma in calls:  # every state the network sees is consistent with the observation, one z throughout
        assert not x.isnan().any()
        assert torch.allclose(x[seen], (y + sigma[0] * z)[seen], atol=1e-9)


def test_restore_with_the_observation_mask_is_the_posterior_mean_at_sigma_min():
    """Under Ã = A the network never sees the hidden state, so restore's hidden pixels are D(y + σ_min·z; A) there:
    E[x_H | y_S] up to the gain times σ_min·z (< 1e-2 here)."""
    y, a = _observation(32, 11)
    out = restore(Gaussian(), y, a, generator=torch.Generator().manual_seed(12), clip=False).reshape(-1, D)
    flat, seen = y.reshape(-1, D), a.reshape(-1, D).bool()
    for i in range(len(flat)):
        s = seen[i]
        want = MU + (flat[i, s] - MU[s]) @ torch.linalg.solve(COV[s][:, s], COV[s])
        assert torch.allclose(out[i], want, atol=1e-2)


def test_the_posterior_mean_is_the_gaussian_one_at_a_noisy_observation():
    y, a = _observation(4000, 13)
    seen = a.expand_as(y).bool()
    given = []

    def spy(x, sigma, mask):
        given.append(x.clone())
        return Gaussian()(x, sigma, mask)

    sigma = 0.4
    out = posterior_mean(spy, y, a, sigma, generator=torch.Generator().manual_seed(14))
    (x,) = given
    assert not x.isnan().any() and bool((x[~seen] == 0).all())  # A x_σ: the hidden pixels are 0
    noise = (x - y)[seen] / sigma
    assert noise.mean().abs().item() < 0.05 and noise.std().item() == pytest.approx(1.0, abs=0.05)
    flat, mask = x.reshape(-1, D), a.reshape(-1, D).bool()
    for i in range(0, len(flat), 400):
        want = gaussian_posterior_mean(MU, COV, flat[i : i + 1], mask[i], sigma)
        assert torch.allclose(out.reshape(-1, D)[i : i + 1], want, atol=1e-12)
    assert out.dtype == y.dtype and not out.isnan().any()


# ------------------------------------------------------------------------------------ the registry's entries


class MaskedNet:
    """A stand-in masked network for the registry: the Gaussian toy per pixel row (1 x 1 x 6 images), called as a
    masked network is, ``net(x, σ, labels, mask=m)``; it records the masks it is given."""

    def __init__(self, density=0.4, mask_input=True):
        self.config = SimpleNamespace(arch="ddpmpp", in_channels=1, img_resolution=D, label_dim=0)
        self.meta = {"masked": {"delta": 0.1, "observed_fraction": density / 0.9, "density": density}}
        self.mask_input, self.masks = mask_input, []
        self.gaussian = Gaussian()

    def __call__(self, x, sigma, class_labels=None, *, mask):
        self.masks.append(mask)
        rows = x.reshape(-1, 1, 1, D)
        return self.gaussian(rows, sigma.repeat_interleave(D), mask.reshape(-1, 1, 1, D)).reshape(x.shape)


def test_the_registry_lists_both_and_refuses_a_network_without_masks():
    assert {"fixed-mask", "reconstruction-guidance"} <= set(SAMPLERS.names())
    for name in ("fixed-mask", "reconstruction-guidance"):
        cfg = SamplerConfig(name=name)
        with pytest.raises(ConfigError, match="takes no mask"):
            SAMPLERS.get(name).prepare(MaskedNet(mask_input=False), cfg)
        net = MaskedNet()
        net.meta = {}
        with pytest.raises(ConfigError, match="sampler.mask_density"):
            SAMPLERS.get(name).prepare(net, cfg)
        assert SAMPLERS.get(name).prepare(net, SamplerConfig(name=name, mask_density=0.5)) is net
        with pytest.raises(ConfigError, match="deterministic"):
            build(SamplerConfig, sets=[f"name={name}", "stochastic=true"])
        with pytest.raises(ConfigError, match="takes no guidance weight"):
            build(SamplerConfig, sets=[f"name={name}", "guidance=2"])
    with pytest.raises(ConfigError, match="mask_density"):
        build(SamplerConfig, sets=["name=fixed-mask", "mask_density=1.5"])
    with pytest.raises(ConfigError, match="guidance_masks"):
        build(SamplerConfig, sets=["name=reconstruction-guidance", "guidance_masks=1"])


def test_the_samplers_draw_masks_at_the_models_density_and_zero_weight_is_the_fixed_mask_sampler():
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return Batch(torch.randn(64, 1, D, D, generator=g), None, None, g)

    net = MaskedNet(density=0.4)
    fixed = fixed_mask(net, batch(0), SamplerConfig(name="fixed-mask", steps=4))
    m = net.masks[0]
    assert m.shape == (64, 1, D, D) and m.mean().item() == pytest.approx(0.4, abs=0.04)
    assert all(torch.equal(x, m) for x in net.masks)  # one mask per image, fixed for all steps
    cfg = SamplerConfig(name="reconstruction-guidance", steps=4, guidance_weight=0.0)
    assert torch.equal(reconstruction_guidance(net, batch(0), cfg), fixed)  # the first mask is the fixed one
    net.masks.clear()
    cfg = SamplerConfig(name="reconstruction-guidance", steps=4, mask_density=0.7)
    guided = reconstruction_guidance(net, batch(0), cfg)
    assert net.masks[0].shape == (4 * 64, 1, D, D) and net.masks[0].mean().item() == pytest.approx(0.7, abs=0.03)
    assert not torch.equal(guided, fixed)


def test_draw_samples_a_masked_network_by_name():
    net = MaskedNet()
    imgs = draw(net, 6, SamplerConfig(name="fixed-mask", steps=3), batch_size=4)
    again = draw(MaskedNet(), 6, SamplerConfig(name="fixed-mask", steps=3), batch_size=4)
    assert imgs.shape == (6, D, D, 1) and imgs.dtype.name == "uint8" and (imgs == again).all()


def test_a_ddpmpp_with_a_mask_channel_samples_with_both():
    """The registry's DDPM++ built with ``mask_input`` (random weights): both samplers run on it through ``draw``,
    and guidance changes the images; a DDPM++ without the mask channel is refused."""
    from ambient_ray.models import registry

    model = {"preset": "tiny", "img_resolution": 8, "in_channels": 1}
    try:
        net = registry.build({"kind": "denoiser", "arch": "ddpmpp", "model": {**model, "mask_input": True}})
    except ValueError:
        pytest.skip("this checkout's DDPM++ takes no mask")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    net.eval().meta = {"masked": {"delta": 0.1, "observed_fraction": 0.6, "density": 0.54}}
    fixed = draw(net, 2, SamplerConfig(name="fixed-mask", steps=3))
    weak = draw(net, 2, SamplerConfig(name="reconstruction-guidance", steps=3, guidance_masks=2, guidance_weight=0))
    guided = draw(net, 2, SamplerConfig(name="reconstruction-guidance", steps=3, guidance_masks=2, guidance_weight=5))
    assert (fixed == weak).all() and (fixed != guided).any()
    plain = registry.build({"kind": "denoiser", "arch": "ddpmpp", "model": model})
    with pytest.raises(ConfigError, match="takes no mask"):
        draw(plain, 2, SamplerConfig(name="fixed-mask", mask_density=0.5))
