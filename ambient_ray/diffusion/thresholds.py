"""Annotation thresholds of Ambient-o, in pure torch (no Ray): σ_min and σ_max from classifier curves.

A *curve* is a classifier's mean probability that a sample is "good" (clean, or in-distribution) as a
function of σ on a grid, averaged over several noise draws. Ambient Diffusion Omni (Daras et al.
2025) reads the annotations off such curves:

- σ_min (Eq. 3.2): t_min = inf{t : E[c_noise(y_t, t)] > τ}, the first grid σ at which the noise
  classifier is fooled by the noised low-quality sample. Per sample (the mean over that sample's
  noise draws; the paper's best) or per dataset (the mean over all samples, one σ_min for all).
- σ_max (Eq. 3.4): t_max = sup{t : c_crops(A(t)(y_t)) > τ}, the largest grid σ whose crop(σ)-sized
  crops still fool the crops classifier.

τ = 0.5 − ε; crossings are strict (a probability equal to τ does not cross).
"""

from __future__ import annotations

from typing import Literal

import torch

Mode = Literal["per-sample", "per-dataset"]


def check_curves(curves: torch.Tensor, grid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (N, G) probability curves on an increasing positive σ grid of G points; return float64 copies."""
    curves = torch.as_tensor(curves, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1) (got {tau})")
    if grid.numel() == 0 or not torch.isfinite(grid).all() or (grid < 0).any() or (grid[1:] <= grid[:-1]).any():
        raise ValueError(f"the σ grid must be finite, >= 0 and strictly increasing (got {grid.tolist()})")
    if curves.ndim != 2 or curves.shape[1] != grid.numel():
        raise ValueError(f"curves must be (samples, {grid.numel()} grid points), got shape {tuple(curves.shape)}")
    bad = ~torch.isfinite(curves) | (curves < 0) | (curves > 1)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(f"curves must be probabilities in [0, 1]: sample {row} has {curves[row].tolist()}")
    return curves, grid


def _pool(curves: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Per sample: the curves as they are; per dataset: their mean, given to every sample."""
    if mode == "per-dataset":
        return curves.mean(dim=0, keepdim=True).expand(len(curves), -1)
    if mode != "per-sample":
        raise ValueError(f"mode must be 'per-sample' or 'per-dataset' (got {mode!r})")
    return curves


def sigma_min(
    curves: torch.Tensor, grid: torch.Tensor, tau: float, mode: Mode = "per-sample"
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_min per sample (Eq. 3.2) and whether its curve crossed τ at all.

    A sample whose curve never exceeds τ gets the top of the grid (usable only there) and
    ``crossed = False``, so the caller can report it. ``per-dataset`` averages the curves over the
    samples first and gives every sample the same σ_min.
    """
    curves, grid = check_curves(curves, grid, tau)
    curves = _pool(curves, mode)
    above = curves > tau
    crossed = above.any(dim=1)
    first = above.to(torch.int8).argmax(dim=1)  # index of the first True (0 if none)
    out = torch.where(crossed, grid[first], grid[-1])
    return out.float(), crossed


def sigma_max(
    curves: torch.Tensor, grid: torch.Tensor, tau: float, mode: Mode = "per-sample"
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_max per sample (Eq. 3.4) and whether any grid σ fooled the crops classifier.

    The largest grid σ with probability > τ; 0 (no use through crops) where none does.
    """
    curves, grid = check_curves(curves, grid, tau)
    curves = _pool(curves, mode)
    above = curves > tau
    fooled = above.any(dim=1)
    g = grid.numel()
    last = g - 1 - above.flip(dims=[1]).to(torch.int8).argmax(dim=1)
    out = torch.where(fooled, grid[last], torch.zeros_like(grid[0]))
    return out.float(), fooled
