"""The EDM sampler against the exact denoiser of Gaussian data, and the image helpers."""

import math

import numpy as np
import pytest
import torch

from ambient_ray.diffusion.samplers import edm_time_steps, heun_sample, to_uint8
from ambient_ray.io.plots import image_grid

MU, S = 0.3, 0.4  # data x_0 ~ N(MU, S²) per pixel
STOCHASTIC = dict(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.0)


def gaussian_denoiser(mu=MU, s=S):
    """The exact D(x; σ) = E[x_0 | x_0 + σ·z = x] = mu + s²/(s² + σ²)·(x − mu)."""

    def d(x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)
        return mu + s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - mu)

    return d


def exact_ode_solution(latents, sigma_max=80.0, mu=MU, s=S):
    """The probability-flow ODE dx/dσ = (x − D)/σ keeps (x − mu)/sqrt(s² + σ²) constant."""
    return mu + (latents.double() * sigma_max - mu) * s / math.sqrt(s**2 + sigma_max**2)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(0))


def test_time_steps():
    t = edm_time_steps(18)
    assert t.shape == (19,) and t.dtype == torch.float64
    assert t[0] == 80.0 and t[-1] == 0.0
    assert math.isclose(float(t[-2]), 0.002, rel_tol=1e-9)
    assert (t[1:] < t[:-1]).all()
    # rho = 1 is a uniform grid; rho = 7 puts more steps at low σ (EDM Eq. 5)
    torch.testing.assert_close(
        edm_time_steps(5, 1.0, 9.0, rho=1.0), torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    )
    t7 = edm_time_steps(10, 0.002, 80.0)
    assert (t7[1:-1] < 1.0).sum() > (edm_time_steps(10, 0.002, 80.0, rho=1.0)[1:-1] < 1.0).sum()
    assert edm_time_steps(1).tolist() == [80.0, 0.0]


@pytest.mark.parametrize("num_steps", [18, 64])
def test_deterministic_sampler_matches_the_gaussian(latents, num_steps):
    x = heun_sample(gaussian_denoiser(), latents, num_steps=num_steps)
    assert x.shape == latents.shape and x.dtype == latents.dtype
    tol = 0.08 if num_steps == 18 else 0.02  # 18 steps: Heun's error on this toy is ~6% of the std
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() / S - 1) < tol


def test_deterministic_sampler_is_second_order(latents):
    """Per-sample error against the exact ODE solution shrinks ~4x per doubling of steps (Heun)."""
    exact = exact_ode_solution(latents)
    err = {
        n: (heun_sample(gaussian_denoiser(), latents, num_steps=n).double() - exact).abs().max().item()
        for n in (16, 32, 64)
    }
    assert err[64] < 0.01
    assert err[16] / err[32] > 3.0 and err[32] / err[64] > 3.0, err


def test_stochastic_sampler_matches_the_gaussian(latents):
    g = torch.Generator().manual_seed(1)
    x = heun_sample(gaussian_denoiser(), latents, num_steps=96, generator=g, **STOCHASTIC)
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() / S - 1) < 0.03
    # it really is stochastic: it left the deterministic trajectory
    det = heun_sample(gaussian_denoiser(), latents, num_steps=96)
    assert (x - det).abs().mean() > 0.05


def test_determinism_and_reproducibility(latents):
    z = latents[:256]
    a = heun_sample(gaussian_denoiser(), z)
    b = heun_sample(gaussian_denoiser(), z.clone(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # s_churn = 0: no randomness, the generator is unused
    s1 = heun_sample(gaussian_denoiser(), z, generator=torch.Generator().manual_seed(3), **STOCHASTIC)
    s2 = heun_sample(gaussian_denoiser(), z, generator=torch.Generator().manual_seed(3), **STOCHASTIC)
    s3 = heun_sample(gaussian_denoiser(), z, generator=torch.Generator().manual_seed(4), **STOCHASTIC)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    # a churn window that holds no time step adds no noise
    off = heun_sample(
        gaussian_denoiser(), z, generator=torch.Generator().manual_seed(3), s_churn=40.0, s_min=100.0, s_max=200.0
    )
    assert torch.equal(off, a)


def test_sampler_calls_the_denoiser_as_expected():
    calls = []

    def d(x, sigma, class_labels):
        calls.append((float(sigma[0]), class_labels))
        return torch.zeros_like(x)

    labels = torch.tensor([1, 2])
    heun_sample(d, torch.randn(2, 1, 4, 4), num_steps=5, class_labels=labels)
    assert len(calls) == 2 * 5 - 1  # Algorithm 1: 2N − 1 evaluations
    assert calls[0][0] == 80.0 and all(c[1] is labels for c in calls)


def test_sampler_runs_with_the_unet_denoiser():
    from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser

    torch.manual_seed(0)
    net = build_denoiser(UNetConfig(label_dim=3)).eval()
    z = torch.randn(4, 1, 16, 16)
    x = heun_sample(net, z, num_steps=4, class_labels=torch.tensor([0, 1, 2, 0]))
    assert x.shape == z.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    # a fresh network has F = 0, so D = c_skip·x: the exact denoiser of N(0, σ_data²) data
    ref = heun_sample(gaussian_denoiser(mu=0.0, s=0.5), z, num_steps=4)
    torch.testing.assert_close(x, ref)


def test_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 2.0, 0.5]).view(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 1)
    assert u.ravel().tolist() == [0, 128, 255, 0, 255, 191]
    rgb = to_uint8(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)
    # the exact inverse of the training map pixel/127.5 − 1
    pix = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    back = to_uint8(torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert np.array_equal(back, pix)


def test_image_grid():
    imgs = np.stack([np.full((2, 3, 1), k, np.uint8) for k in range(5)])
    g = image_grid(imgs, ncols=2)
    assert g.shape == (6, 6, 1) and g.dtype == np.uint8
    assert g[0, 0, 0] == 0 and g[0, 3, 0] == 1 and g[2, 0, 0] == 2 and g[4, 0, 0] == 4
    assert g[4, 3, 0] == 255  # the empty cell
    p = image_grid(imgs, ncols=5, pad=1, pad_value=7)
    assert p.shape == (2 + 2, 5 * 4 + 1, 1) and p[0, 0, 0] == 7 and p[1, 1, 0] == 0
    with pytest.raises(ValueError):
        image_grid(imgs.astype(np.float32), ncols=2)


@pytest.mark.parametrize("w", [1.0, 2.0, 3.0])
def test_guidance_by_a_weaker_model_matches_the_gaussian_solution(latents, w):
    """EDM2's guidance D_g + w·(D − D_g) on Gaussian data: with both denoisers exact for N(0, s²) and N(0, s_g²),
    the guided denoiser is linear in x, and the ODE maps x_T to x_T·[s_g/√(s_g²+σ²)]^(1−w)·[s/√(s²+σ²)]^w
    at σ = σ_max (integrate (x − D)/σ over σ); the samples' std is σ_max times that."""
    from ambient_ray.diffusion.samplers import Guided

    s, s_g, sm = 0.4, 0.6, 80.0

    class Net:
        config = None

        def __init__(self, f):
            self.f = f

        def __call__(self, x, sigma, class_labels=None):
            return self.f(x, sigma, class_labels)

    net = Guided(Net(gaussian_denoiser(0.0, s)), Net(gaussian_denoiser(0.0, s_g)), w)
    x = heun_sample(net, latents, num_steps=64)
    want = sm * (s_g / math.sqrt(s_g**2 + sm**2)) ** (1 - w) * (s / math.sqrt(s**2 + sm**2)) ** w
    print(f"w={w}: std {x.std().item():.4f}, exact {want:.4f}")
    assert abs(x.std().item() / want - 1) < 0.02
    x_exact = latents.double() * want
    assert float((x.double() - x_exact).abs().max()) < 0.05 * want
