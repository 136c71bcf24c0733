"""The 1-D simulation that checks the theory (pure numpy/scipy): real TVs where the bounds give upper bounds.

- :func:`simulate`: Algorithms 1 and 2 as kernel density estimates (Eq. 4.1) from n₁ samples of p₀, and from those
  plus n₂ samples of q₀, over many seeds; their TVs to the noised target p_σ over the whole line, the mixture's
  bias d_TV(p̃_σ, p_σ) and the corruption's d_TV(p_σ, q_σ) per σ.
- :func:`observed_crossover`: the σ above which Algorithm 2's mean TV stays below Algorithm 1's.
- :func:`contraction_check`: Theorem 4.2 on random atomic P, Q (shared atoms, random weights).
- :func:`lipschitz_checks`: Lemma A.5 (p̂_σ is 1/(σ²√(2πe))-Lipschitz) and Lemma A.6 (p_σ is as Lipschitz as p).
- :func:`bayes_accuracy`: the Bayes-optimal clean-vs-corrupted classifier's accuracy, ½ + ½·d_TV(p_σ, q_σ) with
  equal priors, so the σ where that classifier falls to chance level τ is where d_TV(p_σ, q_σ) = 1 − 2τ
  (:func:`sigma_at_tv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ambient_ray.theory import densities
from ambient_ray.theory.densities import Density, Grid


@dataclass
class Simulation:
    """Per σ (columns) and seed (rows): the TVs of Algorithms 1 and 2 to p_σ; per σ: the bias and the corruption."""

    sigmas: np.ndarray
    tv1: np.ndarray  # (seeds, σ): d_TV(p_σ, p̂⁽¹⁾_σ), KDE of n₁ samples of p₀
    tv2: np.ndarray  # (seeds, σ): d_TV(p_σ, p̂⁽²⁾_σ), KDE of n₁ of p₀ + n₂ of q₀
    bias: np.ndarray  # (σ,): d_TV(p̃_σ, p_σ), the mixture's distance from the target
    tv_pq: np.ndarray  # (σ,): d_TV(p_σ, q_σ), what an optimal classifier measures
    n1: int
    n2: int

    @property
    def mean1(self) -> np.ndarray:
        return self.tv1.mean(axis=0)

    @property
    def mean2(self) -> np.ndarray:
        return self.tv2.mean(axis=0)

    @property
    def wins2(self) -> np.ndarray:
        """Per σ: the fraction of seeds where Algorithm 2's estimate is closer to p_σ."""
        return (self.tv2 < self.tv1).mean(axis=0)


def simulate(
    p0: Density,
    q0: Density,
    n1: int,
    n2: int,
    sigmas,
    seeds: int = 100,
    seed: int = 0,
    resolution: float | None = None,
) -> Simulation:
    """Algorithms 1 and 2 on ``seeds`` independent data sets (one per seed, reused at every σ)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if np.any(sigmas <= 0) or seeds < 1 or n1 < 1 or n2 < 0:
        raise ValueError("simulate: need σ > 0, seeds >= 1, n1 >= 1, n2 >= 0")
    rng = np.random.default_rng(seed)
    x1 = p0.sample((seeds, n1), rng)
    x2 = np.concatenate([x1, q0.sample((seeds, n2), rng)], axis=1)
    lo, hi = min(p0.lo, q0.lo), max(p0.hi, q0.hi)
    resolution = resolution or (hi - lo) / 200
    out = {k: np.zeros((seeds, len(sigmas))) for k in ("tv1", "tv2")}
    bias, tv_pq = np.zeros(len(sigmas)), np.zeros(len(sigmas))
    w = n2 / (n1 + n2)
    for j, s in enumerate(sigmas):
        g = Grid.around(lo, hi, float(s), resolution)
        p_s, q_s = densities.noised(p0, g), densities.noised(q0, g)
        out["tv1"][:, j] = g.tv(p_s, densities.kde(x1, g))
        out["tv2"][:, j] = g.tv(p_s, densities.kde(x2, g))
        bias[j] = g.tv(p_s, (1 - w) * p_s + w * q_s)
        tv_pq[j] = g.tv(p_s, q_s)
    return Simulation(sigmas, out["tv1"], out["tv2"], bias, tv_pq, n1, n2)


def observed_crossover(sigmas, mean1, mean2) -> float:
    """The σ above which ``mean2 < mean1`` at every simulated σ, interpolated (in log σ) between the last grid σ
    where it is not and the next; ``sigmas[0]`` if it holds everywhere; ``inf`` if not at the largest σ."""
    sigmas, d = np.asarray(sigmas, dtype=np.float64), np.asarray(mean1) - np.asarray(mean2)
    if d[-1] <= 0:
        return math.inf
    bad = np.flatnonzero(d <= 0)
    if bad.size == 0:
        return float(sigmas[0])
    k = int(bad[-1])
    t = -d[k] / (d[k + 1] - d[k])  # d[k] <= 0 < d[k+1]
    return float(np.exp(np.log(sigmas[k]) + t * (np.log(sigmas[k + 1]) - np.log(sigmas[k]))))


def sigma_at_tv(sigmas, tv, level: float) -> float:
    """The first σ at which ``tv`` falls to ``level`` or below (interpolated in log σ); inf if it never does."""
    sigmas, tv = np.asarray(sigmas, dtype=np.float64), np.asarray(tv, dtype=np.float64)
    below = np.flatnonzero(tv <= level)
    if below.size == 0:
        return math.inf
    k = int(below[0])
    if k == 0:
        return float(sigmas[0])
    t = (tv[k - 1] - level) / (tv[k - 1] - tv[k])
    return float(np.exp(np.log(sigmas[k - 1]) + t * (np.log(sigmas[k]) - np.log(sigmas[k - 1]))))


# ------------------------------------------------------------------------------ checks of the lemmas and theorems


def atomic_tv(atoms: np.ndarray, p: np.ndarray, q: np.ndarray, sigma: float) -> float:
    """d_TV(P ⊛ N(0, σ²), Q ⊛ N(0, σ²)) for P, Q with weights p, q on the same 1-D atoms, by quadrature."""
    lo, hi = float(atoms.min()), float(atoms.max())
    g = Grid.around(lo, hi, sigma, max(hi - lo, 1e-9) / 2000)
    diff = g.noise(g.bin(atoms[None, :], (p - q)[None, :]))
    return 0.5 * float(np.abs(diff).sum() * g.h)


def contraction_check(trials: int = 50, atoms: int = 6, diameter: float = 1.0, sigmas=(0.1, 0.3, 1.0, 3.0), seed=0):
    """Theorem 4.2 on ``trials`` random atomic pairs (shared atoms in [0, D], Dirichlet weights): rows of
    (σ, d_TV(P, Q), the noised TV, the bound min(1, D/(2σ))·d_TV(P, Q))."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(trials):
        x = np.sort(rng.random(atoms)) * diameter
        x[0], x[-1] = 0.0, diameter  # the support's diameter is exactly D
        p, q = rng.dirichlet(np.ones(atoms)), rng.dirichlet(np.ones(atoms))
        d0 = 0.5 * float(np.abs(p - q).sum())
        for s in sigmas:
            rows.append((s, d0, atomic_tv(x, p, q, s), min(1.0, diameter / (2 * s)) * d0))
    return np.array(rows)


def lipschitz_checks(p: Density, samples: np.ndarray, sigma: float) -> dict[str, float]:
    """Measured Lipschitz constants against the lemmas' at one σ: p̂_σ (Lemma A.5), p and p_σ (Lemma A.6)."""
    g = Grid.around(p.lo, p.hi, sigma, p.diameter / 2000)
    slope = lambda f: float(np.max(np.abs(np.diff(f))) / g.h)  # noqa: E731
    return {
        "kde": slope(densities.kde(samples[None, :], g)[0]),
        "kde_lemma": 1.0 / (sigma**2 * math.sqrt(2 * math.pi * math.e)),
        "noised": slope(densities.noised(p, g)),
        "density": p.lipschitz,
    }


def bayes_accuracy(p: Density, q: Density, sigma: float) -> float:
    """The Bayes-optimal classifier's accuracy between p_σ and q_σ with equal priors: ½∫max(p_σ, q_σ)."""
    g = Grid.around(min(p.lo, q.lo), max(p.hi, q.hi), sigma, max(p.diameter, q.diameter) / 2000)
    ps, qs = densities.noised(p, g), densities.noised(q, g)
    return 0.5 * float(np.maximum(ps, qs).sum() * g.h)
