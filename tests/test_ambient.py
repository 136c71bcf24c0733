"""The ambient math against analytic answers: EDM equivalence, Tweedie, buffer, and the σ-first sampler."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ambient_ray.diffusion import ambient as A
from ambient_ray.diffusion import edm
from ambient_ray.models import precond


def test_ambient_loss_with_sigma_n_zero_is_the_edm_loss():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 40.0])
    x_s = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    pred = torch.randn(x0.shape, generator=g)
    amb = A.ambient_loss(pred, x_s, x0, sigma, torch.zeros(6))
    torch.testing.assert_close(amb, edm.edm_loss(pred, x0, sigma))


def test_edm_preconditioning_identities():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = precond.edm_precond(sigma)
    # unit variance of the network's input and target (Karras et al. 2022, App. B.6)
    torch.testing.assert_close(c_in**2 * (sigma**2 + 0.25), torch.ones(3))
    torch.testing.assert_close(c_skip * (sigma**2 + 0.25), torch.full((3,), 0.25))
    torch.testing.assert_close(edm.edm_weight(sigma) * c_out**2, torch.ones(3))
    torch.testing.assert_close(c_noise, sigma.log() / 4)


@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_minimiser_of_the_ambient_loss_is_tweedie(sigma):
    """1-D Gaussian data seen only at σ_n: the ambient loss's minimiser over D(x) = a·x + b is E[x_0 | x_σ]."""
    mu, s, sigma_n, n = 0.3, 0.5, 0.4, 400_000
    g = torch.Generator().manual_seed(1)
    x0 = mu + s * torch.randn(n, generator=g, dtype=torch.float64)
    x_n = x0 + sigma_n * torch.randn(n, generator=g, dtype=torch.float64)  # all we observe
    x_s = x_n + math.sqrt(sigma**2 - sigma_n**2) * torch.randn(n, generator=g, dtype=torch.float64)
    sig, sig_n = torch.full((n,), sigma, dtype=torch.float64), torch.full((n,), sigma_n, dtype=torch.float64)
    assert sigma > float(A.buffer_sigma(sigma_n, 4.0))

    def fit(loss_fn):
        ab = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([ab], lr=1, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn(ab[0] * x_s + ab[1]).mean()
            loss.backward()
            return loss

        opt.step(closure)
        return ab.detach()

    a_true = s**2 / (s**2 + sigma**2)
    ab = fit(lambda d: A.ambient_loss(d, x_s, x_n, sig, sig_n))
    assert float(ab[0]) == pytest.approx(a_true, abs=0.01)
    assert float(ab[1]) == pytest.approx(mu * (1 - a_true), abs=0.01)
    # treating the noisy samples as clean learns the wrong (noisier) distribution
    naive = fit(lambda d: edm.edm_loss(d, x_n, sig))
    assert abs(float(naive[0]) - a_true) > 0.05


def test_buffer_bounds_the_ambient_weight():
    # Eq. D.2 bounds 1/α = σ²/(σ² − σ_n²) by λ_max, so the weight σ⁴/(σ² − σ_n²)² of Eq. D.1 by λ_max²
    # (the paper's own examples: λ_max = 2 -> σ > √2·σ_n, 4 -> σ > (2/√3)·σ_n)
    for lam in (1.5, 2.0, 4.0, 8.0):
        b = A.buffer_sigma(torch.tensor([0.7]), lam)
        assert float(b**2 / (b**2 - 0.49)) == pytest.approx(lam, rel=1e-5)
        assert float(A.ambient_weight(b, torch.tensor([0.7]))) == pytest.approx(lam**2, rel=1e-4)
        above = b * 1.01
        assert float(A.ambient_weight(above, torch.tensor([0.7]))) < lam**2
    assert float(A.buffer_sigma(1.0, 4.0)) == pytest.approx(2 / math.sqrt(3))  # Ambient-o Table 6
    assert float(A.buffer_sigma(1.0, 2.0)) == pytest.approx(math.sqrt(2))
    assert float(A.buffer_sigma(1.0, math.inf)) == 1.0
    with pytest.raises(ValueError, match="lambda_max must be > 1"):
        A.buffer_sigma(1.0, 1.0)


def mixed(n=1000, seed=0):
    g = np.random.default_rng(seed)
    smin = np.where(g.random(n) < 0.1, 0.0, g.uniform(0.1, 3.0, n)).astype(np.float32)
    return torch.tensor(smin)


def test_sampler_never_pairs_below_the_buffer_and_keeps_the_lognormal_marginal():
    smin = mixed()
    sampler = A.SigmaSampler(smin, lambda_max=4.0)
    g = torch.Generator().manual_seed(0)
    sig, idx, crop = sampler.sample(20000, g)
    assert (crop == 0).all()
    assert (sig > A.buffer_sigma(smin, 4.0)[idx]).all()
    # clean samples are eligible everywhere, so σ is never pushed: the marginal is the EDM log-normal
    ks = stats.kstest(np.log(sig.numpy()), "norm", args=(-1.2, 1.2))
    assert ks.pvalue > 0.001, ks
    assert sampler.coverage.redraws == 0 and int(sampler.coverage.draws.sum()) == 20000
    # low σ is trained by clean samples only; high σ by everything
    low = sig < 0.1
    assert (smin[idx[low]] == 0).all() and (smin[idx[sig > 10]] > 0).float().mean() > 0.8


def test_pick_is_uniform_over_eligible_samples():
    sampler = A.SigmaSampler(torch.tensor([0.0, 0.0, 5.0]), lambda_max=math.inf, p_mean=1.0, p_std=2.0)
    sig, idx, _ = sampler.sample(30000, torch.Generator().manual_seed(3))
    low, high = idx[sig < 5], idx[sig > 5]
    assert 2 not in set(low.tolist())
    assert (low == 0).float().mean() == pytest.approx(0.5, abs=0.02)
    counts = torch.bincount(high, minlength=3).float() / len(high)
    torch.testing.assert_close(counts, torch.full((3,), 1 / 3), atol=0.02, rtol=0)


def test_eligible_counts_on_a_hand_made_annotation():
    smin = torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0])
    smax = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.0])
    crop = A.CropTable(sigmas=[0.1, 0.3], sizes=[4, 8])
    sampler = A.SigmaSampler(smin, smax, lambda_max=math.inf, crop=crop, bucket_edges=[0.01, 0.2, 0.6, 1.5, 3.0, 100.0])
    s = torch.tensor([0.05, 0.4, 0.7, 1.2, 2.5])
    assert sampler.full_count(s).tolist() == [2, 2, 3, 4, 5]
    assert sampler.crop_count(s).tolist() == [1, 0, 0, 0, 0]
    donut = sampler.donut()
    assert [d["eligible_full"] for d in donut] == [2, 2, 3, 4, 5]
    assert [d["eligible_crops"] for d in donut] == [1, 1, 0, 0, 0]
    assert crop(torch.tensor([0.05, 0.2, 0.3, 0.9])).tolist() == [4, 8, 8, 8]
    sig, idx, size = sampler.sample(20000, torch.Generator().manual_seed(0))
    via_crop = size > 0
    assert via_crop.any() and (idx[via_crop] == 3).all() and (sig[via_crop] <= 0.3).all()
    assert (size[via_crop] == crop(sig[via_crop])).all()
    whole = ~via_crop
    assert (sig[whole] > smin[idx[whole]]).all()
    # the crops sample is one of three eligible at low σ: it takes about a third of those draws
    assert via_crop[sig <= 0.3].float().mean() == pytest.approx(1 / 3, abs=0.03)


def test_no_eligible_sample_redraws_sigma_and_reports_it():
    sampler = A.SigmaSampler(torch.full((50,), 1.0), lambda_max=4.0)  # no clean rows at all
    sig, idx, _ = sampler.sample(5000, torch.Generator().manual_seed(0))
    assert (sig > A.buffer_sigma(1.0, 4.0)).all()
    assert sampler.coverage.redraws > 0.5 * 5000  # most log-normal draws fall below 1.15
    state = sampler.state_dict()
    other = A.SigmaSampler(torch.full((50,), 1.0))
    other.load_state_dict(state)
    assert other.coverage.redraws == sampler.coverage.redraws


@pytest.mark.parametrize("bad", [float("nan"), -0.5, float("inf")])
def test_bad_sigma_min_is_refused(bad):
    with pytest.raises(ValueError, match="sample 1"):
        A.SigmaSampler(torch.tensor([0.0, bad]))


def test_crops_without_a_table_are_refused_and_masks_have_the_size():
    with pytest.raises(ValueError, match="crop table"):
        A.SigmaSampler(torch.zeros(2), torch.tensor([0.0, 1.0]))
    m = A.random_crop_mask((3, 1, 16, 16), torch.tensor([0, 4, 9]), torch.Generator().manual_seed(0))
    assert m[0].sum() == 256 and m[1].sum() == 16 and m[2].sum() == 81


def test_validation_losses_against_analytic_values():
    """Per σ, summed over rows: 0 for a denoiser that returns the truth; λ(σ)·Σ mean(y²) for one that returns 0."""
    y = torch.rand(5, 1, 4, 4) * 2 - 1
    sig = edm.VAL_SIGMAS
    perfect = edm.validation_losses(lambda x, s, c: y, y, sig)
    assert torch.equal(perfect, torch.zeros(len(sig), dtype=torch.float64))
    zero = edm.validation_losses(lambda x, s, c: torch.zeros_like(x), y, sig, sigma_data=0.5)
    expect = (
        torch.tensor([(s**2 + 0.25) / (s * 0.5) ** 2 for s in sig], dtype=torch.float64)
        * (y**2).mean(dim=(1, 2, 3)).sum().double()
    )
    assert torch.allclose(zero, expect, rtol=1e-5)

    # the noise is fixed by the seed: the same network scores the same, another seed differs
    def shrink(x, s, c):
        return x / (1 + s.view(-1, 1, 1, 1) ** 2)

    a, b = edm.validation_losses(shrink, y, sig, seed=3), edm.validation_losses(shrink, y, sig, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, edm.validation_losses(shrink, y, sig, seed=4))
