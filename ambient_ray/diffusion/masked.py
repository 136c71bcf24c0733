"""Ambient Diffusion on masked data (Daras et al. 2023, "Ambient Diffusion: Learning Clean Distributions from
Highly Corrupted Data"; seed paper 003), the math in pure torch.

A row is an image ``x0`` seen through a mask ``A`` (H x W, 1 = observed, shared across channels; its hidden pixels
stored as 0). Training corrupts further: ``Ã = B ⊙ A`` with ``B_ii ~ Bernoulli(1 - δ)``, and the network sees
``(Ã ⊙ x_t, Ã)`` and is graded on every pixel of ``A`` (Sec. 3.1, Eq. 3.2):

    L = λ(σ) · ‖A ⊙ (h(Ã ⊙ x_t, Ã, σ) − x0)‖²

so it must predict pixels it did not see (those of ``A`` that ``B`` erased), and its minimiser is
``E[x0 | Ã x_t, Ã]`` on every pixel (Theorem 4.1). ``δ = 0`` is the naive objective, whose minimiser is only
determined on the pixels it saw.

Normalisation: the loss of a row is the sum over its C·H·W entries (hidden entries contribute 0), and the batch
loss is the mean over rows, as the reference code's (sum over pixels, divided by the batch). A mean over the
observed entries instead would weight a row by 1/|A| and make a heavily masked row count as much as a full one.
"""

from __future__ import annotations

import torch


def further_mask(mask: torch.Tensor, delta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``Ã = B ⊙ A``: each observed pixel of ``mask`` (``N x H x W`` or ``N x 1 x H x W``, 0/1) erased again
    with probability ``delta`` (``B_ii ~ Bernoulli(1 − δ)``, independent per pixel, shared across channels)."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1): got {delta}")
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= delta
    return mask * keep.to(mask.dtype)


def hidden_was_observed(p: float, delta: float) -> float:
    """``P(A_ii = 1 | Ã_ii = 0)`` for pixels missing independently with probability ``p`` and further erased with
    probability ``δ``: ``(1 − p) δ / (p + δ − p δ)``. The chance that a pixel the network did not see is graded;
    positive exactly when ``δ > 0`` (and ``p < 1``), which is what identifies the hidden pixels."""
    seen = (1.0 - p) * delta  # observed in A, erased by B
    return seen / (p + seen)


def network_input(x_t: torch.Tensor, further: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the network sees: ``(Ã ⊙ x_t, Ã)``, the noisy image with every pixel outside ``Ã`` set to exactly 0,
    and the mask as a ``N x 1 x H x W`` channel."""
    m = _channel(further, x_t)
    return torch.where(m.bool(), x_t, torch.zeros_like(x_t)), m  # where, not a product: 0 * NaN would leak


def masked_loss(
    denoised: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Eq. 3.2 per row: ``λ(σ) · Σ_{c,h,w} A ⊙ (D − x0)²`` (``weight`` = λ(σ), a scalar or one per row). Entries
    outside ``A`` contribute exactly 0, and so does their gradient, whatever ``x0`` holds there."""
    m = _channel(mask, x0)
    err = torch.where(m.bool(), denoised - x0, torch.zeros_like(x0))  # no 0 * NaN or inf from a hidden entry
    per_row = err.square().flatten(1).sum(dim=1)
    return torch.as_tensor(weight, dtype=per_row.dtype, device=per_row.device) * per_row


def _channel(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as ``N x 1 x H x W`` in ``like``'s dtype, broadcasting over channels."""
    m = mask if mask.dim() == like.dim() else mask.unsqueeze(1)
    if m.shape[0] != like.shape[0] or m.shape[-2:] != like.shape[-2:] or m.shape[1] not in (1, like.shape[1]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(like.shape)}")
    return m.to(like.dtype)


def gaussian_posterior_mean(
    mu: torch.Tensor, cov: torch.Tensor, x_t: torch.Tensor, observed: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``E[x0 | Ã x_t, Ã]`` for ``x0 ~ N(mu, cov)`` and ``x_t = x0 + σ n``, given the coordinates ``observed``
    (a bool vector: the set S of Ã): ``μ + Σ_{:,S} (Σ_SS + σ² I)⁻¹ (x_{t,S} − μ_S)``, for each row of ``x_t``."""
    s = observed.bool()
    k = cov[:, s]
    gain = torch.linalg.solve(cov[s][:, s] + sigma**2 * torch.eye(int(s.sum()), dtype=cov.dtype), k.T).T
    return mu + (x_t[:, s] - mu[s]) @ gain.T
