"""Denoising Score Distillation (DSD, seed 004) in pure torch (no Ray): the two phases' losses and noise levels.

Setting: the data are only observed noisy, y = x + σ_n·z (σ_n known, images in [-1, 1]); the goal is a one-step
generator of the *clean* x. Conventions as in :mod:`ambient_ray.diffusion.edm`: variance-exploding EDM, a denoiser
D(x_σ; σ) predicts x_0, λ(σ) = (σ² + σ_d²)/(σσ_d)².

- **Phase I** (denoising pretraining, "adjusted diffusion way", paper Eq. (3), the Ambient Tweedie loss, and
  Algorithm 2): σ > σ_n, x_σ = y + sqrt(σ² − σ_n²)·ε (:func:`noise_up`), and
  λ(σ)·‖α·D(x_σ; σ) + (1 − α)·x_σ − y‖², α = (σ² − σ_n²)/σ² (:func:`noisy_loss`). Its minimiser is the clean
  posterior mean E[x_0 | x_σ] for every σ > σ_n (Tweedie applied to x_σ = y + ...: α·E[x_0|x_σ] + (1 − α)·x_σ is
  E[y|x_σ]). The "standard diffusion way" pretrains with the plain EDM loss, paper Eq. (1), on y and so learns
  the noisy data's score.
- **Phase II** (denoising distillation, paper Eq. (2), Algorithm 1): a one-step generator
  G(z) = D_θ(σ_init·z; σ_init) (:data:`SIGMA_INIT`), initialised from the teacher f_φ together with a fake
  denoiser f_ψ. Per iteration (strictly 1:1): one fake-score step, where f_ψ learns the generator's distribution
  from corrupted samples ỹ = G(z) + σ_n·ε (Algorithm 1 lines 8/11) with the Phase-I loss
  (:func:`fake_score_loss`, σ from :func:`sigma_above`); then one generator step with SiD's loss
  (paper App. C, Eq. (10); :func:`generator_loss`) at x_t = x_g + σ·ε, σ on SiD's schedule (:func:`sid_sigmas`).
- **Proximal FD** (paper Sec. 4, "New Metric: Proximal FID"): generated samples re-noised to σ_n
  (:func:`renoise`) are compared against the noisy training set; :func:`gaussian_fd_1d` and
  :func:`proximal_fd_1d` are the closed forms for 1-D Gaussians used by the tests.

The equations of the paper's text are numbered (1)-(10); this module cites them as "Eq. (k)".
"""

from __future__ import annotations

import math

import torch

from ambient_ray.diffusion.ambient import ambient_loss
from ambient_ray.diffusion.edm import bcast, lognormal_sigma
from ambient_ray.evaluation.metrics import frechet_distance_from_stats

SIGMA_INIT = 2.5
"""σ_init of the one-step generator G(z) = D_θ(σ_init·z; σ_init) (SiD's choice, kept by DSD)."""


def _per_sample(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


def noise_up(
    y: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_n: torch.Tensor | float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_σ = y + sqrt(σ² − σ_n²)·ε: a sample observed at noise σ_n, noised on to σ (paper Eq. (3), Algorithm 2).

    ``sigma`` and ``sigma_n`` are per-sample (B,) tensors or scalars. Raises ValueError, naming the offending
    (σ, σ_n) pairs, where σ ≤ σ_n: noise cannot be taken out, and at σ = σ_n the Phase-I loss is identically 0.
    """
    s = _per_sample(sigma, y)
    sn = _per_sample(sigma_n, y)
    s_f, sn_f = (v.flatten() for v in torch.broadcast_tensors(s, sn))
    bad = ~(s_f > sn_f)  # NaN counts as bad
    if bool(bad.any()):
        pairs = [(float(s_f[i]), float(sn_f[i])) for i in bad.nonzero().flatten()[:5].tolist()]
        raise ValueError(f"noise_up needs sigma > sigma_n; {int(bad.sum())} violate it: (sigma, sigma_n) = {pairs}")
    eps = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    return y + bcast((s**2 - sn**2).sqrt(), y) * eps


def sigma_above(
    sigma_n: torch.Tensor,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    max_rounds: int = 32,
) -> torch.Tensor:
    """Per-sample σ from EDM's log-normal ln σ ~ N(P_mean, P_std²) restricted to σ > σ_n (``sigma_n``: (B,)).

    Rejection per sample: every round redraws only the rows still at or below their σ_n, for at most
    ``max_rounds`` rounds; rows still rejected then (a σ_n far in the log-normal's upper tail: e.g. σ_n = 20 accepts
    ≈ 2e-4 of draws) take a log-uniform σ in (σ_n, 4σ_n], just above σ_n where the truncated log-normal has its
    mass. Rows with σ_n = 0 are plain log-normal draws.

    The DSD authors' code instead draws σ log-normal and *clamps* it to σ_n. At σ = σ_n, α = 0 and x_σ = y, so the
    Phase-I loss is identically 0: with P_mean = −1.2, P_std = 1.2 and σ_n = 0.2 that is
    Φ((ln 0.2 + 1.2)/1.2) ≈ 37% of the draws wasted (checked in tests/test_dsd.py), and the remaining σ's follow
    the same truncated law as here.
    """
    sigma_n = torch.as_tensor(sigma_n, dtype=torch.float32).flatten()
    if not bool(torch.isfinite(sigma_n).all()) or bool((sigma_n < 0).any()):
        raise ValueError(f"sigma_n must be finite and >= 0, got {sigma_n[~torch.isfinite(sigma_n) | (sigma_n < 0)]}")
    sigma = lognormal_sigma(len(sigma_n), p_mean, p_std, generator)
    todo = ~(sigma > sigma_n)
    for _ in range(max_rounds):
        if not bool(todo.any()):
            return sigma
        rows = todo.nonzero().flatten()
        sigma[rows] = lognormal_sigma(len(rows), p_mean, p_std, generator)
        todo = ~(sigma > sigma_n)
    rows = todo.nonzero().flatten()
    if len(rows):
        u = torch.rand(len(rows), generator=generator)
        sigma[rows] = sigma_n[rows] * (1.0 + 1e-6) * torch.exp(u * math.log(4.0))
    return sigma


def noisy_loss(
    denoised: torch.Tensor,
    x_sigma: torch.Tensor,
    y: torch.Tensor,
    sigma: torch.Tensor,
    sigma_n: torch.Tensor,
    sigma_data: float = 0.5,
    extra_weight: bool = False,
) -> torch.Tensor:
    """Per-element Phase-I loss λ(σ)·‖α·D + (1 − α)·x_σ − y‖², α = (σ² − σ_n²)/σ² (paper Eq. (3)).

    ``denoised`` = D(x_σ; σ), the x_0 prediction at x_σ = :func:`noise_up` (y, σ, σ_n); σ > σ_n. Its minimiser over
    D is the clean posterior mean E[x_0 | x_σ], not the noisy-data one. Through
    :func:`ambient_ray.diffusion.ambient.ambient_loss`; ``extra_weight`` True adds Ambient-o's λ_amb = σ⁴/(σ² −
    σ_n²)² (same minimiser), off by default as DSD grades with λ(σ) alone.
    """
    return ambient_loss(denoised, x_sigma, y, sigma, sigma_n, sigma_data, extra_weight)


def sid_sigmas(
    n: int,
    generator: torch.Generator | None = None,
    t_max: float = 0.8,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """SiD's generator-step noise levels: t ~ U[0, t_max], σ = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.

    t = 0 gives σ_min and t = t_max = 0.8 gives ≈ 24.4, so σ ∈ [0.002, ≈24.4]. Used for x_t = x_g + σ·ε in the
    generator step (paper Eq. (6)). Note for DSD: ≈ 1/3 of these σ's lie below σ_n = 0.2, where the teacher never
    trained; the authors keep them.
    """
    t = torch.rand(n, generator=generator) * t_max
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + (1.0 - t) * (lo - hi)) ** rho


def generator_loss(
    f_teacher: torch.Tensor, f_fake: torch.Tensor, x_g: torch.Tensor, alpha: float = 1.2
) -> torch.Tensor:
    """Per-sample (B,) SiD generator loss (paper App. C, Eq. (10); SiD's Fisher-divergence loss with weight α).

    Σ over non-batch dims of (f_φ − f_ψ)·((f_φ − x_g) − α·(f_φ − f_ψ)) / w, where f_φ = ``f_teacher`` and
    f_ψ = ``f_fake`` are the teacher's and the fake denoiser's x_0 predictions at x_t = x_g + σ·ε, and
    w = per-sample mean |x_g − f_φ|, clamped at ≥ 1e-5. **Only w is detached**: gradients reach x_g directly and
    through both networks' outputs (the fake network's parameters are simply not stepped by the generator's
    optimiser). The loss is signed and is 0 where f_ψ = f_φ.
    """
    b = x_g.shape[0]
    diff = (f_teacher - f_fake).reshape(b, -1)
    resid = (f_teacher - x_g).reshape(b, -1)
    with torch.no_grad():
        w = resid.abs().mean(1).clamp(min=1e-5)
    return (diff * (resid - alpha * diff)).sum(1) / w


def fake_score_loss(
    denoised: torch.Tensor,
    x_sigma: torch.Tensor,
    target: torch.Tensor,
    sigma: torch.Tensor,
    sigma_n: torch.Tensor,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Per-element fake-score loss of the adjusted DSD way (Algorithm 1): the Phase-I loss on generated samples.

    ``target`` is ỹ = G(z) + σ_n·ε (:func:`renoise` of detached generator output) where σ_n > 0, and the clean G(z)
    where σ_n = 0; x_σ = :func:`noise_up` (target, σ, σ_n) with σ from :func:`sigma_above`. This is
    :func:`noisy_loss` with λ(σ) alone: at σ_n = 0 it has α = 1 and is exactly EDM's λ(σ)·(D − x_0)²
    (:func:`ambient_ray.diffusion.edm.edm_loss`), so one formula serves both kinds of row. f_ψ then learns the
    clean posterior of the generator's own distribution, matching the adjusted teacher.
    """
    return noisy_loss(denoised, x_sigma, target, sigma, sigma_n, sigma_data, extra_weight=False)


def renoise(
    samples: torch.Tensor, sigma_n: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """samples + σ_n·ε: generated (clean) samples corrupted like the training set (Algorithm 1 lines 8/11).

    Also the first step of the proximal FD (paper Sec. 4): generated samples re-noised to σ_n are compared
    against the noisy training set, which needs no clean data. ``sigma_n``: a scalar or per-sample (B,).
    """
    eps = torch.randn(samples.shape, generator=generator, dtype=samples.dtype).to(samples.device)
    return samples + bcast(sigma_n, samples) * eps


def gaussian_fd_1d(mean_a: float, var_a: float, mean_b: float, var_b: float) -> float:
    """Fréchet distance between N(μa, va) and N(μb, vb) in 1-D: (μa − μb)² + (√va − √vb)².

    Computed by :func:`ambient_ray.evaluation.metrics.frechet_distance_from_stats` (μa−μb)² + va + vb − 2√(va·vb),
    which in 1-D is the closed form above.
    """
    if var_a < 0 or var_b < 0:
        raise ValueError(f"variances must be >= 0, got {var_a}, {var_b}")
    return frechet_distance_from_stats([float(mean_a)], [[float(var_a)]], [float(mean_b)], [[float(var_b)]])


def proximal_fd_1d(gen_var: float, data_var: float, sigma_n: float, mean: float = 0.0) -> float:
    """Proximal FD of a 1-D Gaussian generator N(mean, gen_var) (closed form).

    Its samples re-noised to σ_n follow N(mean, gen_var + σ_n²); the noisy training data (clean variance
    ``data_var``) follow N(mean, data_var + σ_n²). The FD between the two is (√(gen_var + σ_n²) − √(data_var + σ_n²))²:
    0 for the clean variance; (√(s² + 2σ_n²) − √(s² + σ_n²))² for a generator that learned the noisy data.
    """
    sn2 = float(sigma_n) ** 2
    return gaussian_fd_1d(mean, float(gen_var) + sn2, mean, float(data_var) + sn2)
