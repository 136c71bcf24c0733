"""The locality map crop(σ) of Ambient-o (Sec. 3.2, Figs. 11-14), pure torch: how much context a denoiser needs.

A trained denoiser D is given x_σ = y + σ·z cut to a centred s x s window (its context) and graded on the
centre ``patch`` x ``patch`` pixels of its x_0 prediction, for growing s and a grid of σ. crop(σ) is the
smallest context whose loss is within ε of the full-image loss, relatively: loss(s) ≤ (1 + ε)·loss(full)
(the losses span orders of magnitude across σ, so one absolute ε would mean nothing at small σ and be
unreachable at large σ). crop(σ) is then made non-decreasing in σ, as more noise never needs less context.
"""

from __future__ import annotations

import numpy as np
import torch


def centre_start(size: int, inner: int) -> int:
    return (size - inner) // 2


@torch.no_grad()
def locality_losses(
    net,
    y: torch.Tensor,
    sigmas: list[float],
    contexts: list[int],
    patch: int = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(len(sigmas), len(contexts)) mean squared error of D's x_0 prediction at the centre patch.

    ``y`` (B, C, H, W) in [-1, 1], square; the same noise is used for every context of one σ, so the
    curves differ by context alone.
    """
    h = y.shape[-1]
    p0 = centre_start(h, patch)
    truth = y[..., p0 : p0 + patch, p0 : p0 + patch]
    out = torch.empty(len(sigmas), len(contexts), dtype=torch.float64)
    for i, s in enumerate(sigmas):
        x = y + s * torch.randn(y.shape, generator=generator)
        for j, c in enumerate(contexts):
            c0 = centre_start(h, c)
            d = net(x[..., c0 : c0 + c, c0 : c0 + c], torch.full((len(y),), float(s)))
            q0 = centre_start(c, patch)
            pred = d[..., q0 : q0 + patch, q0 : q0 + patch]
            out[i, j] = ((pred.float() - truth) ** 2).mean().double()
    return out


def crop_sizes(losses: torch.Tensor, contexts: list[int], eps: float) -> list[int]:
    """crop(σ) per grid σ: the smallest context with loss ≤ (1 + eps)·loss(full context), non-decreasing in σ."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (got {eps})")
    full = losses[:, -1:]
    ok = losses <= (1.0 + eps) * full
    first = ok.to(torch.int8).argmax(dim=1)  # the full context always qualifies
    sizes = [contexts[int(k)] for k in first]
    return [int(v) for v in np.maximum.accumulate(sizes)]


def valid_contexts(img: int, patch: int, factor: int) -> list[int]:
    """Context sizes from ``patch`` to the image: centred on the patch (same parity) and divisible by
    the network's downsampling ``factor`` (2^(levels-1) for the U-Net)."""
    return [c for c in range(patch, img + 1) if (c - patch) % 2 == 0 and c % factor == 0 and (img - c) % 2 == 0]
