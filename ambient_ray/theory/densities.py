"""1-D densities for the theory's simulation, and everything measured on them by quadrature over the whole line.

A :class:`Density` is a pdf on a bounded support [lo, hi], tabulated on a fine grid (its exact formula where it has
one); it samples by the inverse CDF. Noising (p_σ = p ⊛ N(0, σ²)), kernel density estimates (the empirical
density noised, Eq. 4.1 / A.1) and total variations are computed on a grid over [lo − 8σ, hi + 8σ], so the mass
that noise puts outside the support is counted (the paper's proof integrates over [0, 1] only).

How a noised density is evaluated: masses (the density's, or 1/n per sample) are spread onto an equally spaced
grid of spacing σ/400 ≤ h ≤ σ/20 by linear binning (each mass split between its two neighbouring nodes, which keeps the
total and the mean exactly) and convolved with the Gaussian kernel (FFT). The same discretisation serves p_σ and
p̂_σ, so their difference, and the TV, carry an error O(h²/σ²) ≈ 0.25 % of the kernel's curvature scale.

Specs (``--p0``, ``--q0`` of ``ambient-ray theory``): ``triangle:lo=0,peak=0.5,hi=1``,
``mixture:means=0.3/0.7,stds=0.05/0.1,weights=0.5/0.5`` (truncated to lo..hi, default [0, 1], and renormalised),
``uniform:lo=0,hi=1``, and for q₀ also ``blurred:width=W`` (p₀ ⊛ N(0, W²), truncated to p₀'s support and
renormalised: a blurred version of the target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import ndtr

FINE = 20_000  # points of a density's table on its support
REACH = 8.0  # the noised grid reaches REACH·σ beyond the support (Gaussian tail mass there < 1e-15)
PER_SIGMA = 20  # grid points per σ of the kernel at least
MAX_PER_SIGMA = 400  # and at most (a coarser grid is exact enough where σ dwarfs the support)


@dataclass(frozen=True)
class Density:
    """A density on [lo, hi], tabulated at ``x`` (FINE + 1 points, ``pdf`` integrating to 1 by the trapezoid rule)."""

    name: str
    lo: float
    hi: float
    x: np.ndarray
    pdf: np.ndarray

    @property
    def diameter(self) -> float:
        return self.hi - self.lo

    @property
    def dx(self) -> float:
        return (self.hi - self.lo) / (len(self.x) - 1)

    @property
    def lipschitz(self) -> float:
        """max |p'| measured on the table (finite differences; exact for piecewise-linear p such as a triangle)."""
        return float(np.max(np.abs(np.diff(self.pdf))) / self.dx)

    @property
    def mean(self) -> float:
        return float(np.trapezoid(self.x * self.pdf, self.x))

    def masses(self) -> tuple[np.ndarray, np.ndarray]:
        """(points, masses): the trapezoid rule's weights of the table, summing to 1."""
        w = np.full(len(self.x), self.dx)
        w[[0, -1]] *= 0.5
        m = self.pdf * w
        return self.x, m / m.sum()

    def sample(self, shape, rng: np.random.Generator) -> np.ndarray:
        """Samples by the inverse of the piecewise-linear CDF of the table."""
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (self.pdf[1:] + self.pdf[:-1]) * self.dx)])
        cdf /= cdf[-1]
        keep = np.concatenate([[True], np.diff(cdf) > 0])  # flat stretches (zero density) make no samples
        return np.interp(rng.random(shape), cdf[keep], self.x[keep])


def _table(name: str, lo: float, hi: float, fn) -> Density:
    if not hi > lo:
        raise ValueError(f"{name}: need lo < hi (got lo={lo}, hi={hi})")
    x = np.linspace(lo, hi, FINE + 1)
    pdf = np.clip(np.asarray(fn(x), dtype=np.float64), 0.0, None)
    total = np.trapezoid(pdf, x)
    if not total > 0:
        raise ValueError(f"{name}: the density has no mass on [{lo}, {hi}]")
    return Density(name, lo, hi, x, pdf / total)


def triangle(lo: float = 0.0, peak: float = 0.5, hi: float = 1.0) -> Density:
    """The triangular density on [lo, hi] with its mode at ``peak`` (Lipschitz 2/((hi − lo)·min side))."""
    if not lo <= peak <= hi:
        raise ValueError(f"triangle: need lo <= peak <= hi (got {lo}, {peak}, {hi})")

    def fn(x):
        up = (x - lo) / (peak - lo) if peak > lo else np.ones_like(x)
        down = (hi - x) / (hi - peak) if hi > peak else np.ones_like(x)
        return np.where(x <= peak, up, down)

    return _table(f"triangle(lo={lo:g}, peak={peak:g}, hi={hi:g})", lo, hi, fn)


def uniform(lo: float = 0.0, hi: float = 1.0) -> Density:
    return _table(f"uniform(lo={lo:g}, hi={hi:g})", lo, hi, lambda x: np.ones_like(x))


def mixture(means, stds, weights=None, lo: float = 0.0, hi: float = 1.0) -> Density:
    """A Gaussian mixture truncated to [lo, hi] and renormalised."""
    means, stds = np.atleast_1d(means).astype(float), np.atleast_1d(stds).astype(float)
    weights = np.ones_like(means) if weights is None else np.atleast_1d(weights).astype(float)
    if not len(means) == len(stds) == len(weights) or np.any(stds <= 0) or np.any(weights < 0):
        raise ValueError("mixture: means, stds and weights need one entry per component, stds > 0, weights >= 0")

    def fn(x):
        z = (x[:, None] - means) / stds
        return (weights * np.exp(-0.5 * z**2) / stds).sum(axis=1)

    name = "mixture(means=" + "/".join(f"{m:g}" for m in means) + ", stds=" + "/".join(f"{s:g}" for s in stds) + ")"
    return _table(name, lo, hi, fn)


def blurred(p: Density, width: float) -> Density:
    """p ⊛ N(0, width²), truncated to p's support and renormalised: a blurred version of p."""
    if width <= 0:
        raise ValueError(f"blurred: width must be > 0 (got {width})")
    pts, m = p.masses()
    k = int(math.ceil(REACH * width / p.dx))
    kernel = np.exp(-0.5 * (np.arange(-k, k + 1) * p.dx / width) ** 2)
    pdf = fftconvolve(m, kernel / kernel.sum(), mode="same") / p.dx
    return Density(f"blurred({p.name}, width={width:g})", p.lo, p.hi, pts, pdf / np.trapezoid(pdf, pts))


def parse(spec: str, base: Density | None = None) -> Density:
    """A density from its spec (module docstring); ``blurred:`` needs ``base`` (p₀)."""
    kind, _, rest = spec.partition(":")
    args: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"density spec {spec!r}: '{part}' is not key=value")
        args[key.strip()] = value.strip()

    def nums(key, default=None):
        if key not in args:
            if default is None:
                raise ValueError(f"density spec {spec!r}: missing '{key}='")
            return default
        return [float(v) for v in args.pop(key).split("/")]

    try:
        if kind == "triangle":
            out = triangle(nums("lo", [0.0])[0], nums("peak", [0.5])[0], nums("hi", [1.0])[0])
        elif kind == "uniform":
            out = uniform(nums("lo", [0.0])[0], nums("hi", [1.0])[0])
        elif kind == "mixture":
            means, stds = nums("means"), nums("stds")
            weights = nums("weights", [1.0] * len(means))
            out = mixture(means, stds, weights, nums("lo", [0.0])[0], nums("hi", [1.0])[0])
        elif kind == "blurred":
            if base is None:
                raise ValueError(f"density spec {spec!r}: 'blurred' blurs p0, so it is only a q0")
            out = blurred(base, nums("width")[0])
        else:
            raise ValueError(f"density spec {spec!r}: unknown kind '{kind}' (triangle, uniform, mixture, blurred)")
    except ValueError as e:
        raise ValueError(str(e) if spec in str(e) else f"density spec {spec!r}: {e}") from None
    if args:
        raise ValueError(f"density spec {spec!r}: unknown key(s) {sorted(args)}")
    return out


def tv(p: Density, q: Density) -> float:
    """d_TV(p, q) = ½∫|p − q| by quadrature on the union of the supports."""
    lo, hi = min(p.lo, q.lo), max(p.hi, q.hi)
    x = np.linspace(lo, hi, 4 * FINE + 1)
    pp = np.interp(x, p.x, p.pdf, left=0.0, right=0.0)
    qq = np.interp(x, q.x, q.pdf, left=0.0, right=0.0)
    return 0.5 * float(np.trapezoid(np.abs(pp - qq), x))


# ------------------------------------------------------------------------------ noised densities on a grid


@dataclass(frozen=True)
class Grid:
    """The equally spaced grid on which everything at one σ is evaluated."""

    sigma: float
    x0: float
    h: float
    size: int

    @classmethod
    def around(cls, lo: float, hi: float, sigma: float, resolution: float) -> Grid:
        """Spacing min(σ/PER_SIGMA, ``resolution``) but at least σ/MAX_PER_SIGMA, reaching REACH·σ beyond [lo, hi]."""
        h = max(min(sigma / PER_SIGMA, resolution), sigma / MAX_PER_SIGMA)
        x0 = lo - REACH * sigma
        return cls(sigma, x0, h, int(math.ceil((hi + REACH * sigma - x0) / h)) + 1)

    @property
    def x(self) -> np.ndarray:
        return self.x0 + self.h * np.arange(self.size)

    def bin(self, points: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Linear binning of (rows of) points: (..., n) -> (..., size) masses; each row sums to its weights."""
        pts = np.atleast_2d(points)
        rows, n = pts.shape
        w = np.full(pts.shape, 1.0 / n) if weights is None else np.broadcast_to(weights, pts.shape)
        pos = (pts - self.x0) / self.h
        k = np.floor(pos).astype(np.int64)
        frac = pos - k
        if k.min() < 0 or k.max() + 1 >= self.size:
            raise ValueError("a point lies outside the grid")
        offset = (np.arange(rows) * self.size)[:, None]
        out = np.bincount((k + offset).ravel(), (w * (1 - frac)).ravel(), rows * self.size)
        out += np.bincount((k + 1 + offset).ravel(), (w * frac).ravel(), rows * self.size)
        return out.reshape(rows, self.size)

    def noise(self, masses: np.ndarray) -> np.ndarray:
        """Σ_k m_k·φ_σ(x − x_k) of binned masses, on the grid (rows of masses -> rows of densities; signed masses
        give the signed difference of two densities)."""
        k = int(math.ceil(REACH * self.sigma / self.h))
        t = np.arange(-k, k + 1) * self.h / self.sigma
        kernel = np.exp(-0.5 * t**2) / (self.sigma * math.sqrt(2 * math.pi))
        return fftconvolve(masses, kernel[None, :], mode="same", axes=1)

    def tv(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """½∫|p − q| over the grid (the last axis)."""
        return 0.5 * np.abs(p - q).sum(axis=-1) * self.h


def noised(p: Density, grid: Grid) -> np.ndarray:
    """p_σ = p ⊛ N(0, σ²) on ``grid`` (one row)."""
    pts, m = p.masses()
    return grid.noise(grid.bin(pts, m))[0]


def kde(samples: np.ndarray, grid: Grid) -> np.ndarray:
    """p̂_σ, the Gaussian KDE of each row of samples at bandwidth σ (Eq. 4.1): (rows, n) -> (rows, size)."""
    return grid.noise(grid.bin(samples))


def two_point_tv(distance: float, sigma) -> np.ndarray:
    """d_TV(N(x, σ²), N(y, σ²)) = 2Φ(‖x − y‖/(2σ)) − 1, exactly."""
    return 2.0 * ndtr(distance / (2.0 * np.asarray(sigma, dtype=np.float64))) - 1.0
