"""The bounds of Ambient-o's theory (seed 000 App. A; main text Sec. 4 of 001/002) as functions of σ.

Symbols (1-D, as the paper's analysis):

- n₁: clean samples, from the target density p₀; λ₁: p₀'s Lipschitz constant.
- n₂: corrupted samples, from q₀; λ₂: q₀'s Lipschitz constant. N = n₁ + n₂.
- Algorithm 2 sees the mixture p̃₀ = (n₁/N)·p₀ + (n₂/N)·q₀, which is λ̄-Lipschitz with λ̄ = (n₁λ₁ + n₂λ₂)/N.
- d_TV = d_TV(p₀, q₀), the corruption's total variation before noise; D: the diameter of the supports
  (p₀ and q₀ live in [0, 1] in the paper, D = 1); δ: the bounds hold with probability ≥ 1 − δ over the samples.
- σ: the diffusion noise level (σ_t); p_σ = p ⊛ N(0, σ²).

**Theorem 4.1** (Gaussian KDE, :func:`kde_bound`), with probability ≥ 1 − δ:

- ``form="explicit"``, the proof's last line before "≲" (App. A.1), with L bins::

      d_TV(p_σ, p̂_σ) ≤ λ/(2L) + 1/(2Lσ²√(2πe)) + sqrt(log(2L/δ) / (4πσ²n)),   L = ⌈n·max(λ, 1)⌉

- ``form="rate"``, Eq. 4.2 with the ≲ constants set to 1::

      d_TV(p_σ, p̂_σ) ≲ 1/n + 1/(σ²n) + sqrt((log n + log(1 ∨ λ) + log(2/δ)) / (σ²n))

**Theorem 4.2** (contraction, :func:`contraction_bound`): d_TV(P ⊛ N(0, σ²I), Q ⊛ N(0, σ²I)) ≤ (D/(2σ))·d_TV(P, Q),
read with min(1, ·), since a TV is at most 1.

**Algorithms 1 and 2** (:func:`u1`, :func:`u2`): U₁(σ) is Theorem 4.1 at (n₁, λ₁) (Eq. 4.3); U₂(σ) is Theorem 4.1
at (N, λ̄) plus the bias min(1, D/(2σ))·(n₂/N)·d_TV(p₀, q₀) (the triangle inequality, Theorem 4.2, and
d_TV(p₀, p̃₀) = (n₂/N)·d_TV(p₀, q₀)). The crossover σ* (:func:`crossover`) is where U₂ falls below U₁ for good.

How the garbled or inconsistent extractions are read here (each also noted where it is used):

1. App. A.2 writes d_TV = ½∫₀¹|p_σ − p̂_σ| and then drops the ½ when it splits the integral into L bins, so the
   explicit bound bounds ∫|p_σ − p̂_σ| = 2·d_TV. We keep the proof's line as printed: it is still a valid bound
   on d_TV, loose by a factor of 2, and it is what the paper states.
2. A.18 reads |p̂_σ(l/L) − p_σ(x)|; A.14 and A.17 give |p̂_σ(l/L) − p_σ(l/L)|, which is what the sum needs.
3. The proof integrates over [0, 1] only; noised densities put mass outside it. The bound is used for the TV
   over the whole line (the simulation measures that one and checks it; the missing tails are where a
   violation would come from).
4. The main text's final display writes the bias as (n₂/(σN))·d_TV(p₀, q₀); the line before it, and Theorem 4.2
   with D = 1, give (1/(2σ))·(n₂/N)·d_TV(p₀, q₀). We take Theorem 4.2's D/(2σ) (the 2 lost in the display)
   and the min(1, ·) that any TV obeys.
5. The Lipschitz term of U₂, printed "log(1 ∨ (n₁/N)λ₁ + (n₂/N)λ₂)", is read as log(max(1, λ̄)).
6. Lemma A.5's constant 1/(σ²√(2πe)) is max|φ'|/σ² = e^{-1/2}/(√(2π)σ²), as derived there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import brentq

Form = Literal["explicit", "rate"]
FORMS: tuple[str, ...] = ("explicit", "rate")


@dataclass(frozen=True)
class Setting:
    """The inputs of the two bounds (symbols as in the module docstring)."""

    n1: int
    n2: int
    lambda1: float
    lambda2: float
    d_tv: float
    diameter: float = 1.0
    delta: float = 0.1

    def __post_init__(self):
        if self.n1 < 1 or self.n2 < 0:
            raise ValueError(f"need n1 >= 1 and n2 >= 0 (got n1={self.n1}, n2={self.n2})")
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ValueError(f"Lipschitz constants must be >= 0 (got {self.lambda1}, {self.lambda2})")
        if not 0.0 <= self.d_tv <= 1.0:
            raise ValueError(f"d_TV(p0, q0) must be in [0, 1] (got {self.d_tv})")
        if self.diameter <= 0:
            raise ValueError(f"the support's diameter D must be > 0 (got {self.diameter})")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"δ must be in (0, 1) (got {self.delta})")

    @property
    def n(self) -> int:
        """N = n₁ + n₂, the samples Algorithm 2 uses."""
        return self.n1 + self.n2

    @property
    def lambda_mix(self) -> float:
        """λ̄ = (n₁λ₁ + n₂λ₂)/N, the mixture p̃₀'s Lipschitz constant."""
        return (self.n1 * self.lambda1 + self.n2 * self.lambda2) / self.n

    @property
    def bias_weight(self) -> float:
        """(n₂/N)·d_TV(p₀, q₀) = d_TV(p₀, p̃₀), the mixture's TV from the target before noise."""
        return self.n2 / self.n * self.d_tv


def bins(n: int, lam: float) -> int:
    """L = ⌈n·max(λ, 1)⌉, the proof's number of bins on [0, 1] (App. A.1, "Choosing L = n·max{λ, 1}")."""
    return int(math.ceil(n * max(lam, 1.0)))


def kde_terms(n: int, lam: float, delta: float, form: Form = "explicit") -> tuple[float, float, float]:
    """(a, b, c) with Theorem 4.1's bound = a + b/σ² + c/σ (both forms have this shape; see the module docstring)."""
    if form == "explicit":
        big_l = bins(n, lam)
        return (
            lam / (2 * big_l),
            1.0 / (2 * big_l * math.sqrt(2 * math.pi * math.e)),
            math.sqrt(math.log(2 * big_l / delta) / (4 * math.pi * n)),
        )
    if form == "rate":
        return 1.0 / n, 1.0 / n, math.sqrt((math.log(n) + math.log(max(1.0, lam)) + math.log(2.0 / delta)) / n)
    raise ValueError(f"form must be one of {FORMS} (got {form!r})")


def kde_bound(sigma, n: int, lam: float, delta: float, form: Form = "explicit") -> np.ndarray:
    """Theorem 4.1: the bound on d_TV(p_σ, p̂_σ) for a KDE from n samples of a λ-Lipschitz density."""
    a, b, c = kde_terms(n, lam, delta, form)
    s = _sigma(sigma)
    return a + b / s**2 + c / s


def contraction_bound(sigma, d_tv: float, diameter: float = 1.0) -> np.ndarray:
    """Theorem 4.2: d_TV(P ⊛ N(0, σ²), Q ⊛ N(0, σ²)) ≤ min(1, D/(2σ))·d_TV(P, Q)."""
    return np.minimum(1.0, diameter / (2.0 * _sigma(sigma))) * d_tv


def u1(sigma, s: Setting, form: Form = "explicit") -> np.ndarray:
    """U₁(σ), Algorithm 1's error bound (Eq. 4.3): Theorem 4.1 at (n₁, λ₁)."""
    return kde_bound(sigma, s.n1, s.lambda1, s.delta, form)


def u2(sigma, s: Setting, form: Form = "explicit", bias: Callable | None = None) -> np.ndarray:
    """U₂(σ), Algorithm 2's: Theorem 4.1 at (N, λ̄) plus the bias d_TV(p̃_σ, p_σ).

    The bias is Theorem 4.2's min(1, D/(2σ))·(n₂/N)·d_TV(p₀, q₀) unless ``bias(σ)`` gives another estimate of
    d_TV(p_σ, q_σ) (e.g. one measured from a classifier), which is then weighted by n₂/N."""
    kde = kde_bound(sigma, s.n, s.lambda_mix, s.delta, form)
    if bias is None:
        return kde + contraction_bound(sigma, s.bias_weight, s.diameter)
    return kde + s.n2 / s.n * np.asarray(bias(_sigma(sigma)), dtype=np.float64)


def vacuous(values) -> np.ndarray:
    """Where a TV bound says nothing: it is ≥ 1 (any TV is ≤ 1)."""
    return np.asarray(values) >= 1.0


@dataclass(frozen=True)
class Crossover:
    """Where Algorithm 2's bound beats Algorithm 1's for good: U₂(σ) < U₁(σ) for every σ > ``sigma``.

    ``sigma`` is 0 when U₂ < U₁ everywhere and ``inf`` when U₂ ≥ U₁ at large σ (no crossover); ``method`` says how
    it was found ("closed form": the quadratic's roots; "bisection": a scan and Brent's method)."""

    sigma: float
    method: str
    roots: tuple[float, ...] = field(default=())

    @property
    def exists(self) -> bool:
        return math.isfinite(self.sigma)


def crossover(s: Setting, form: Form = "explicit", bias: Callable | None = None, **scan) -> Crossover:
    """σ*: U₂(σ) < U₁(σ) for all σ > σ*; in closed form for Theorem 4.2's bias, by bisection for another ``bias``.

    Closed form: both bounds are a + b/σ² + c/σ, and the bias is β on σ ≤ D/2 and β·D/(2σ) above (β = (n₂/N)·d_TV),
    so σ²·(U₁ − U₂) is a quadratic A·σ² + C·σ + B on each piece; its roots in the piece are where the sign can
    change (U₁ − U₂ is continuous at D/2)."""
    if bias is not None:
        return crossover_bisect(lambda x: u1(x, s, form) - u2(x, s, form, bias), **scan)
    a1, b1, c1 = kde_terms(s.n1, s.lambda1, s.delta, form)
    a2, b2, c2 = kde_terms(s.n, s.lambda_mix, s.delta, form)
    beta, half = s.bias_weight, s.diameter / 2.0
    pieces = (  # (A, C, B, lo, hi): σ²·(U₁ − U₂) = A σ² + C σ + B on lo < σ <= hi
        (a1 - a2 - beta, c1 - c2, b1 - b2, 0.0, half),
        (a1 - a2, c1 - c2 - beta * half, b1 - b2, half, math.inf),
    )
    roots = sorted({r for A, C, B, lo, hi in pieces for r in _quadratic_roots(A, C, B) if lo < r <= hi})
    diff = lambda x: float(u1(x, s, form) - u2(x, s, form))  # noqa: E731
    A, C, B = pieces[1][:3]
    at_infinity = A if A != 0 else (C if C != 0 else B)  # the sign of σ²(U₁ − U₂) as σ → ∞
    if at_infinity <= 0:
        return Crossover(math.inf, "closed form", tuple(roots))
    # the largest root where U₁ − U₂ turns positive (a root where it only touches 0 does not count)
    for r in reversed(roots):
        below = r * (1 - 1e-6)
        if diff(below) <= 0:
            return Crossover(r, "closed form", tuple(roots))
    return Crossover(0.0, "closed form", tuple(roots))


def crossover_bisect(
    diff: Callable, lo: float = 1e-4, hi: float = 1e4, points: int = 2000, xtol: float = 1e-12
) -> Crossover:
    """σ* for any continuous ``diff(σ) = U₁ − U₂``: a log-spaced scan of [lo, hi] for the last sign change to
    positive, refined by Brent's method. ``inf`` if diff ≤ 0 at ``hi``; ``lo`` if diff > 0 on the whole scan."""
    grid = np.geomspace(lo, hi, points)
    values = np.asarray(diff(grid), dtype=np.float64)
    if values[-1] <= 0:
        return Crossover(math.inf, "bisection")
    bad = np.flatnonzero(values <= 0)
    if bad.size == 0:
        return Crossover(float(lo), "bisection")
    k = int(bad[-1])
    root = brentq(lambda x: float(diff(np.array([x]))[0]), grid[k], grid[k + 1], xtol=xtol)
    return Crossover(float(root), "bisection")


def _quadratic_roots(a: float, b: float, c: float) -> list[float]:
    """The real, positive roots of a·x² + b·x + c (a linear or constant one handled)."""
    if a == 0:
        return [-c / b] if b != 0 and -c / b > 0 else []
    disc = b * b - 4 * a * c
    if disc < 0:
        return []
    sq = math.sqrt(disc)
    # the numerically stable pair: q = -(b + sign(b)·sq)/2, roots q/a and c/q
    q = -0.5 * (b + math.copysign(sq, b))
    out = [q / a] + ([c / q] if q != 0 else [])
    return [r for r in out if r > 0]


def _sigma(sigma) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"σ must be finite and > 0 (got {sigma})")
    return s
