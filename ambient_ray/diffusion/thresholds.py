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

import math

import numpy as np
import torch

from ambient_ray.diffusion.threshold_rules import DRAW_RULES, RULES, Mode, Rule  # noqa: F401 (re-exported)


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
    out, crossed = first_crossing(_pool(curves, mode), grid, tau)
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


# ------------------------------------------------------------------------------ per-sample σ_min estimators
#
# A per-sample curve is the mean of a few noise draws, so it is noisy, and the first grid σ where a noisy
# curve exceeds τ is biased early: noise makes early crossings, never late ones (issue 21). The rules below
# read σ_min off the same curves in other ways; each takes the (N, G) mean curves on an increasing grid and
# returns (σ_min, crossed) as :func:`sigma_min` does.

# (their names, Rule, RULES and DRAW_RULES, are in threshold_rules: the annotate config takes them without torch)


def lognormal_grid(n: int, p_mean: float = -1.2, p_std: float = 1.2, seed: int = 0) -> torch.Tensor:
    """The authors' dense σ grid: ``n`` sorted draws of the training log-normal σ = exp(P_mean + P_std·ε), so
    the grid is densest where training σ's are (their ``annotate.py`` uses 2,048)."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(p_mean + p_std * torch.randn(n, generator=g, dtype=torch.float64)).sort().values.unique()


def first_crossing(curves: torch.Tensor, grid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first grid σ with curve > τ (Eq. 3.2 as written); the top of the grid, not crossed, if none."""
    above = curves > tau
    crossed = above.any(dim=1)
    return torch.where(crossed, grid[above.to(torch.int8).argmax(dim=1)], grid[-1]), crossed


def last_crossing(curves: torch.Tensor, grid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The σ from which the curve stays above τ: the grid point after its last one at or below τ (the first
    grid σ if it is above τ everywhere). A curve that ends at or below τ never stays above: not crossed."""
    g = grid.numel()
    low = curves <= tau
    last_low = g - 1 - low.flip(dims=[1]).to(torch.int8).argmax(dim=1)  # valid where low.any()
    start = torch.where(low.any(dim=1), last_low + 1, torch.zeros_like(last_low))
    crossed = start < g
    return torch.where(crossed, grid[start.clamp(max=g - 1)], grid[-1]), crossed


def ewm(curves: torch.Tensor, span: float) -> torch.Tensor:
    """Exponential moving average along σ, from low to high (pandas' ``ewm(span=span).mean()``, adjusted form):
    y_t = Σ_{i≤t} (1−α)^{t−i} x_i / Σ_{i≤t} (1−α)^{t−i}, α = 2/(span + 1). Causal: it lags, which moves a
    crossing up."""
    if span < 1:
        raise ValueError(f"span must be >= 1 (got {span})")
    keep = 1.0 - 2.0 / (span + 1.0)
    num = torch.zeros(len(curves), dtype=curves.dtype)
    den = 0.0
    out = torch.empty_like(curves)
    for t in range(curves.shape[1]):
        num = curves[:, t] + keep * num
        den = 1.0 + keep * den
        out[:, t] = num / den
    return out


def isotonic(curves: torch.Tensor) -> torch.Tensor:
    """Each curve's least-squares non-decreasing fit along σ (pool-adjacent-violators, scikit-learn's
    ``isotonic_regression``): more noise can only make a noised sample look more like a clean one."""
    from sklearn.isotonic import isotonic_regression

    rows = [isotonic_regression(c, increasing=True) for c in curves.numpy()]
    return torch.from_numpy(np.stack(rows)).to(curves.dtype) if rows else curves.clone()


def lower_bound(mean: torch.Tensor, std: torch.Tensor, draws: int, z: float) -> torch.Tensor:
    """A lower confidence bound of each curve point's mean over ``draws`` noise draws: mean − z·std/√draws."""
    return mean - z * std / math.sqrt(draws)


def shrink(mean: torch.Tensor, std: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical-Bayes shrinkage of each sample's curve toward its set's mean curve, point by point (the
    normal-normal model): sample i's mean has sampling variance v_i = std_i²/draws; the spread of the true
    curves across samples is estimated as T = max(Var_i(mean_i) − E_i[v_i], 0); the weight on the sample's own
    curve is w_i = T/(T + v_i). With T = 0 every sample gets the set's curve (the per-dataset annotation).
    Returns the shrunk curves and the weights."""
    if len(mean) < 2:  # no set to shrink toward
        return mean.clone(), torch.ones_like(mean)
    v = std.square() / draws
    between = (mean.var(dim=0, unbiased=True, keepdim=True) - v.mean(dim=0, keepdim=True)).clamp(min=0)
    w = torch.where(between + v > 0, between / (between + v), torch.ones_like(v))
    return w * mean + (1 - w) * mean.mean(dim=0, keepdim=True), w


def estimate_sigma_min(
    rule: Rule,
    mean: torch.Tensor,
    grid: torch.Tensor,
    tau: float,
    *,
    std: torch.Tensor | None = None,
    draws: int | None = None,
    span: float = 32.0,
    z: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_min per sample by ``rule`` from (N, G) mean curves (and, for ``confident`` and ``shrunk``, the std over
    the ``draws`` noise draws behind each point):

    - ``first``: the first crossing of τ (Eq. 3.2 as written);
    - ``smoothed``: the authors' rule, an exponential moving average along σ (``span``), then the first crossing;
    - ``last``: the σ from which the curve stays above τ;
    - ``isotonic``: the first crossing of the curve's non-decreasing fit;
    - ``confident``: the first σ where the lower bound mean − z·std/√draws exceeds τ;
    - ``shrunk``: the first crossing of the curve shrunk toward its set's (:func:`shrink`).
    """
    mean, grid = check_curves(mean, grid, tau)
    if rule in DRAW_RULES:
        if std is None or not draws:
            raise ValueError(f"rule {rule!r} needs the std over the noise draws and their number")
        std = torch.as_tensor(std, dtype=torch.float64)
        if std.shape != mean.shape:
            raise ValueError(f"std must have the curves' shape {tuple(mean.shape)}, got {tuple(std.shape)}")
    if rule == "first":
        return first_crossing(mean, grid, tau)
    if rule == "smoothed":
        return first_crossing(ewm(mean, span), grid, tau)
    if rule == "last":
        return last_crossing(mean, grid, tau)
    if rule == "isotonic":
        return first_crossing(isotonic(mean), grid, tau)
    if rule == "confident":
        return first_crossing(lower_bound(mean, std, draws, z), grid, tau)
    if rule == "shrunk":
        return first_crossing(shrink(mean, std, draws)[0], grid, tau)
    raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
