"""The per-sample σ_min estimators of issue 21 (ambient_ray/diffusion/thresholds.py), pure torch: each rule on
hand-made curves with a known answer, the smoothing against pandas, and, on noisy draws around known crossings,
the confidence and shrinkage rules landing on them more often than the first crossing."""

import math

import numpy as np
import pytest
import torch

from ambient_ray.diffusion import thresholds as th

GRID = torch.logspace(math.log10(0.05), math.log10(20), 24, dtype=torch.float64)
TAU = 0.45


def sigmoid_curves(star: torch.Tensor, k: float, top: float = 0.95) -> torch.Tensor:
    """Curves rising in log σ to ``top``, each crossing τ exactly at its own ``star`` (N, 1)."""
    return top / (1 + torch.exp(-k * (GRID.log() - star.log()) + math.log(top / TAU - 1)))


@pytest.mark.parametrize("rule", th.RULES)
def test_every_rule_finds_the_crossing_of_a_clean_monotone_curve(rule):
    star = torch.tensor([[0.3], [1.0], [3.0]], dtype=torch.float64)
    mean = sigmoid_curves(star, k=3.0)
    std = torch.zeros_like(mean)  # no noise: every rule reads the same crossing
    s, crossed = th.estimate_sigma_min(rule, mean, GRID, TAU, std=std, draws=4, span=1)
    want = torch.stack([GRID[GRID > float(x)][0] for x in star[:, 0]])
    assert crossed.all()
    if rule == "shrunk":  # three different curves, no noise: the weight on each own curve is 1
        assert torch.allclose(th.shrink(mean, std, 4)[1], torch.ones_like(mean))
    assert torch.equal(s, want)


def test_a_curve_that_dips_below_tau_after_crossing():
    """Above τ at 0.2 for one grid point (noise), below again, then above for good from 2.0: the first crossing
    takes the early blip, the last crossing the σ from which it stays above, the isotonic fit lands between."""
    curve = torch.full((1, len(GRID)), 0.2, dtype=torch.float64)
    blip = int((GRID - 0.2).abs().argmin())
    curve[0, blip] = 0.6
    late = int((GRID > 2.0).nonzero()[0])
    curve[0, late:] = 0.9
    first, _ = th.estimate_sigma_min("first", curve, GRID, TAU)
    last, crossed = th.estimate_sigma_min("last", curve, GRID, TAU)
    iso, _ = th.estimate_sigma_min("isotonic", curve, GRID, TAU)
    assert float(first) == float(GRID[blip]) and float(last) == float(GRID[late]) and crossed.all()
    assert float(GRID[blip]) <= float(iso) <= float(GRID[late])
    fit = th.isotonic(curve)
    assert (fit.diff(dim=1) >= -1e-12).all() and float(fit[0, blip]) < 0.6  # the blip pooled with its neighbours


def test_last_crossing_of_a_curve_that_ends_below_tau_is_not_crossed():
    curve = torch.linspace(0.0, 0.9, len(GRID), dtype=torch.float64)[None].clone()
    curve[0, -1] = 0.3
    s, crossed = th.last_crossing(curve, GRID, TAU)
    assert not bool(crossed[0]) and float(s) == float(GRID[-1])
    s, crossed = th.last_crossing(torch.full((1, len(GRID)), 0.8, dtype=torch.float64), GRID, TAU)
    assert bool(crossed[0]) and float(s) == float(GRID[0])


def test_smoothing_is_pandas_ewm_and_lags_a_step_upward():
    import pandas as pd

    x = torch.rand(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = pd.DataFrame(x.numpy().T).ewm(span=8).mean().to_numpy().T
    np.testing.assert_allclose(th.ewm(x, 8).numpy(), want, rtol=1e-12)
    step = (torch.arange(len(GRID)) >= 10).double()[None]  # 0 then 1 from grid point 10
    s, _ = th.estimate_sigma_min("smoothed", step, GRID, TAU, span=8)
    assert float(s) > float(GRID[10])  # the causal average crosses later than the step itself


def test_the_dense_lognormal_grid_follows_the_training_distribution():
    g = th.lognormal_grid(2048, p_mean=-1.2, p_std=1.2, seed=0)
    assert len(g) == 2048 and (g.diff() > 0).all()
    assert abs(float(g.log().mean()) + 1.2) < 0.1 and abs(float(g.log().std()) - 1.2) < 0.1


def noisy_draws(n: int, k: float, noise: float, spread: float, seed: int = 0):
    """n samples, each with its own known crossing (log-normal around 1), 4 noisy draws per grid point."""
    g = torch.Generator().manual_seed(seed)
    star = torch.exp(spread * torch.randn(n, 1, generator=g, dtype=torch.float64))
    draws = sigmoid_curves(star, k)[:, None] + noise * torch.randn(n, 4, len(GRID), generator=g, dtype=torch.float64)
    draws = draws.clamp(0, 1)
    return star[:, 0], draws.mean(1), draws.std(1)


def hit_rate(s: torch.Tensor, star: torch.Tensor) -> float:
    """Share of samples whose σ_min is within 1.5 grid steps (in log σ) of its true crossing."""
    step = math.log(float(GRID[1] / GRID[0]))
    return float(((s.log() - star.log()).abs() <= 1.5 * step).double().mean())


def test_confidence_and_shrinkage_land_on_noisy_crossings_more_often_than_the_first_crossing():
    """Curves that approach τ slowly (the regime where noise makes early crossings), 4 draws of noise sd 0.3.
    Measured with this seed (share within 1.5 grid steps): first crossing 0.33, confident (z = 1) 0.40, shrunk
    0.87, isotonic 0.56, last crossing 0.27, smoothed 0.0 (a span of 32 is meant for the authors' 2,048-point grid:
    on 24 points it lags far past the crossing). In a trial on steep curves (k = 3) the first crossing was rarely
    early and the confidence bound only added lag, doing worse than it: the bound is a remedy for flat approaches;
    shrinkage helped in both."""
    star, mean, std = noisy_draws(1000, k=0.7, noise=0.3, spread=0.2)
    rate = {r: hit_rate(th.estimate_sigma_min(r, mean, GRID, TAU, std=std, draws=4)[0], star) for r in th.RULES}
    print({r: round(v, 3) for r, v in rate.items()})
    assert rate["confident"] > rate["first"] + 0.05
    assert rate["shrunk"] > rate["first"] + 0.3
    # the first crossing's early bias: its σ_min sits below the true crossing on average here
    first = th.estimate_sigma_min("first", mean, GRID, TAU)[0]
    assert float((first.log() - star.log()).mean()) < 0


def test_rules_that_need_the_draws_refuse_without_them():
    mean = sigmoid_curves(torch.tensor([[1.0]], dtype=torch.float64), 3.0)
    for rule in ("confident", "shrunk"):
        with pytest.raises(ValueError, match="std over the noise draws"):
            th.estimate_sigma_min(rule, mean, GRID, TAU)
    with pytest.raises(ValueError, match="unknown rule"):
        th.estimate_sigma_min("median", mean, GRID, TAU)
