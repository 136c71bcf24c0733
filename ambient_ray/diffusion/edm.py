"""The EDM objective in pure torch (no Ray): loss weight, loss, log-normal σ, and a fixed-noise validation loss.

Conventions: variance-exploding EDM, x_σ = x_0 + σ·z, data in [-1, 1], σ_data = 0.5 by default
(Karras et al. 2022, Table 1). The preconditioning of the network is :mod:`ambient_ray.models.precond`.
"""

from __future__ import annotations

import torch


def bcast(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value (B,) reshaped to broadcast over a (B, ...) tensor."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM loss weight λ(σ) = (σ² + σ_data²) / (σ·σ_data)² (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """Per-element EDM loss λ(σ)·(D(x_σ; σ) − x_0)²."""
    return bcast(edm_weight(sigma, sigma_data), x0) * (x0_pred - x0) ** 2


VAL_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


@torch.no_grad()
def validation_losses(
    denoise,
    y: torch.Tensor,
    sigmas=VAL_SIGMAS,
    sigma_data: float = 0.5,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over ``y``'s rows of the EDM loss λ(σ)·‖D(y + σz; σ) − y‖² (per-element mean), one entry per σ.

    A comparable yardstick for runs whose training losses are not (another τ moves every σ_min, another
    λ_max the buffer): the plain denoising loss on clean rows at a fixed σ grid, with noise fixed by
    ``seed``, so two evaluations differ by the network alone. ``denoise(x, sigma, labels)`` returns x_0.
    """
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(sigmas), dtype=torch.float64)
    for i, s in enumerate(sigmas):
        z = torch.randn(y.shape, generator=gen)
        sigma = torch.full((len(y),), float(s))
        pred = denoise((y + s * z).to(y.device), sigma.to(y.device), labels).float().cpu()
        out[i] = edm_loss(pred, y.float().cpu(), sigma, sigma_data).flatten(1).mean(1).sum().double()
    return out


def lognormal_sigma(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """σ = exp(P_mean + P_std·ε), ε ~ N(0, 1): the EDM training distribution."""
    return (p_mean + p_std * torch.randn(n, generator=generator)).exp()
