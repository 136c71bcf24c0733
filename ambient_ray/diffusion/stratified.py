"""The exact streaming σ-first sampler: σ first, then a stratum, then the next row of that stratum's stream.

:class:`ambient_ray.diffusion.ambient.SigmaSampler` pairs a drawn σ with a uniform row among those eligible
at σ, which needs random access to the rows. A streaming reader has none, but it can keep one stream per
*stratum*: rows grouped by their (full-use threshold t = buffer(σ_min, λ_max), crop bound σ_max) pair. All
rows of a stratum are eligible at exactly the same σ's, so "a uniform eligible row" factorises into "a
stratum with probability ∝ n_k·e_k(σ)" times "a uniform row of that stratum", and the second factor is
what a shuffled stream gives.

Pure torch, no Ray.

How a streaming reader uses it
------------------------------
1. Once, on the driver: ``ids, table = strata_of(sigma_min, sigma_max, lambda_max, edges)`` over the
   annotation columns (two float columns, cheap even for billions of rows), ``n = torch.bincount(ids,
   minlength=len(table))``, and ``StratifiedSigmaSampler(table[:, 0], table[:, 1], n, ...)``. Record
   ``edges`` with the run: the ids mean nothing under other edges.
2. Each reader routes every row it reads by ``strata_of`` on that row's own annotation (no global pass)
   into its stratum's stream: a per-stratum shuffle buffer over a repeating, reshuffled read of the
   stratum's rows (in memory, :class:`StratumStreams`). With few strata that is a few buffers; a stratum's
   rows may also be written to their own files once, so each stream is a plain shuffled file list.
3. Per batch: ``sigma, stratum, crop = sampler.sample(B, g)``, then row j of the batch is the next row of
   stream ``stratum[j]`` (``[next(k) for k in stratum]``), noised as :func:`ambient.ambient_batch` does
   (σ_n = 0 inside a crop).
4. Exactness needs the n_k of the rows the streams actually serve. A data-parallel worker that reads only
   its own shard must either sample with its shard's counts (then each worker is exact for its shard, and
   the union is exact for the dataset only when every shard holds each stratum in proportion n_k / W), or
   shard *within* each stratum (split every stratum's rows evenly across the W workers), which makes the
   global counts right for everyone up to rounding of n_k / W. The second is the recommended layout.
5. The (σ, stratum) law is exact whatever the order within a stream; the order only decides which row of
   the stratum comes next. A full shuffle per pass makes each draw marginally uniform over the stratum and
   serves every row exactly once per pass; a finite shuffle buffer keeps the per-pass counts exact and the
   per-draw uniformity approximate.
6. Checkpoint ``sampler.state_dict()`` (coverage counters), the streams' state (per stratum: pass, position
   and permutation seed; :meth:`StratumStreams.state_dict`) and the generator's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ambient_ray.diffusion.ambient import Coverage, CropTable, buffer_sigma
from ambient_ray.diffusion.edm import lognormal_sigma

# 64 log-spaced edges over [1e-3, 80]: EDM's σ range ([0.002, 80]) with a margin below; the training
# log-normal (P_mean = -1.2, P_std = 1.2) puts ~1e-6 of its mass below 1e-3 and ~2e-6 above 80. Neighbouring
# edges differ by a factor r = (8e4)^(1/63) ≈ 1.196, so rounding a continuous t up (or σ_max down) to an edge
# costs a row at most ln r / (P_std·sqrt(2π)) ≈ 6% of the log-normal's mass (at its mode; ~3% on average),
# about what λ_max = 4's own buffer (×1.155) already gives up, while keeping at most 66 t-levels × 65
# σ_max-levels (in practice few pairs occur, and grid annotations give far fewer: use :func:`grid_edges`).
DEFAULT_EDGES: list[float] = torch.logspace(math.log10(1e-3), math.log10(80.0), 64, dtype=torch.float64).tolist()


def grid_edges(sigma_min_values, sigma_max_values=(), lambda_max: float = 4.0) -> list[float]:
    """Edges that keep annotations on a known grid exact: buffer(σ_min values) ∪ σ_max values (positive ones).

    The buffers are computed exactly as :func:`strata_of` computes them (float32 :func:`buffer_sigma`), so
    a row annotated with one of these values lands on its own edge and is not rounded at all.
    """
    t = buffer_sigma(torch.as_tensor(sigma_min_values, dtype=torch.float32).flatten(), lambda_max)
    s = torch.as_tensor(sigma_max_values, dtype=torch.float32).flatten()
    vals = torch.cat([t, s])
    return sorted({float(v) for v in vals.tolist() if 0.0 < v < math.inf})


def _check_edges(edges) -> torch.Tensor:
    e = torch.as_tensor(list(edges), dtype=torch.float32).flatten()
    if e.numel() == 0 or not torch.isfinite(e).all() or (e <= 0).any() or (e[1:] <= e[:-1]).any():
        raise ValueError("edges must be a non-empty, strictly increasing list of finite positive σ's")
    return e


def strata_table(edges=None) -> torch.Tensor:
    """(K, 2) float32 table of every stratum's (t_k, σmax_k) under ``edges``: K = (E + 2)·(E + 1).

    t-levels are 0, the E edges and +inf (a row whose buffer lies above the top edge is never trained
    whole); σ_max-levels are 0 (no crops) and the E edges. Stratum id = i_t·(E + 1) + i_s.
    """
    e = _check_edges(DEFAULT_EDGES if edges is None else edges)
    t_levels = torch.cat([torch.zeros(1), e, torch.full((1,), math.inf)])
    s_levels = torch.cat([torch.zeros(1), e])
    tt, ss = torch.meshgrid(t_levels, s_levels, indexing="ij")
    return torch.stack([tt.flatten(), ss.flatten()], dim=1)


def strata_of(
    sigma_min: torch.Tensor | float,
    sigma_max: torch.Tensor | float | None = None,
    lambda_max: float = 4.0,
    edges=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's stratum id from its own annotation, and the (K, 2) table of (t_k, σmax_k) (:func:`strata_table`).

    t = buffer(σ_min, λ_max) is rounded *up* to the next level (0, an edge, or +inf): the row is never
    trained whole at or below its buffer. σ_max is rounded *down* to the previous level (an edge, or 0 =
    no crops): no crop is ever trained above its bound. Values already on a level are kept exactly. A
    data pipeline may call this on any subset of rows (even one row): the id depends on the row alone.
    """
    e = _check_edges(DEFAULT_EDGES if edges is None else edges)
    smin = torch.as_tensor(sigma_min, dtype=torch.float32).flatten()
    if not torch.isfinite(smin).all() or (smin < 0).any():
        raise ValueError("sigma_min must be finite and >= 0")
    smax = torch.zeros_like(smin) if sigma_max is None else torch.as_tensor(sigma_max, dtype=torch.float32).flatten()
    if smax.shape != smin.shape or not torch.isfinite(smax).all() or (smax < 0).any():
        raise ValueError("sigma_max must be finite, >= 0 and one per row")
    t = buffer_sigma(smin, lambda_max)
    # t-levels [0, e_1..e_E, inf]: the first level >= t
    i_t = torch.where(t == 0, torch.zeros_like(t, dtype=torch.long), torch.searchsorted(e, t, right=False) + 1)
    # σ_max-levels [0, e_1..e_E]: the last level <= σ_max
    i_s = torch.searchsorted(e, smax, right=True)
    return i_t * (e.numel() + 1) + i_s, strata_table(e.tolist())


def _mix(*xs: int) -> int:
    """A splitmix64 hash of a few integers, as a non-negative 63-bit generator seed."""
    m = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & m)) & m
        h = (h + 0x9E3779B97F4A7C15) & m
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class StratifiedSigmaSampler:
    """σ-first sampling over strata: σ from the log-normal, then stratum k ∝ n_k·e_k(σ), crop(σ) if only via crop.

    e_k(σ) = 1 if σ > t_k (whole) or 0 < σ ≤ σmax_k (through a crop of size crop(σ), used only where the
    stratum is not eligible whole); σ's with no eligible stratum are redrawn from the log-normal restricted
    to the eligible range, counted in ``coverage.redraws`` (as :class:`~ambient_ray.diffusion.ambient.SigmaSampler`).

    Exactness. All rows i of stratum k share e_i = e_k, and N(σ) = Σ_j n_j·e_j(σ) is the number of eligible
    rows, so the eligible range and hence the redrawn σ law p̃ are those of SigmaSampler. With the next row
    of k's stream uniform over its n_k rows (a shuffled pass, independent of the σ's):
    P(σ, i) = p̃(σ) · n_k·e_k(σ)/N(σ) · 1/n_k = p̃(σ) · e_i(σ)/N(σ) = SigmaSampler's σ law × a uniform eligible row.
    (With rounded annotations this is exact for the rounded (t_k, σmax_k), which are conservative.)

    ``sample`` returns stratum ids into the full table (as :func:`strata_of` numbers them); strata with
    n_k = 0 are never drawn.
    """

    def __init__(
        self,
        t: torch.Tensor,
        sigma_max: torch.Tensor,
        n: torch.Tensor,
        *,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        crop: CropTable | None = None,
        bucket_edges: list[float] | None = None,
    ):
        t = torch.as_tensor(t, dtype=torch.float32).flatten()
        sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32).flatten()
        n = torch.as_tensor(n).flatten().long()
        if not (t.shape == sigma_max.shape == n.shape):
            raise ValueError("t, sigma_max and n must have one entry per stratum")
        if (n < 0).any() or int(n.sum()) == 0:
            raise ValueError("stratum counts must be >= 0 with at least one row")
        if torch.isnan(t).any() or (t < 0).any() or not torch.isfinite(sigma_max).all() or (sigma_max < 0).any():
            raise ValueError("t must be >= 0 (inf allowed) and sigma_max finite and >= 0")
        active = (n > 0).nonzero().flatten()
        self.n_strata = n.numel()
        self.active = active  # ids of strata with rows
        self.t, self.sigma_max, self.counts = t[active], sigma_max[active], n[active]
        self.n = int(n.sum())
        self.lo = float(self.t.min())  # any σ above it has a whole row
        self.hi = float(self.sigma_max.max())  # any σ in (0, hi] has a crop
        if math.isinf(self.lo) and self.hi == 0.0:
            raise ValueError("no stratum is eligible at any σ (every t is inf and none has crops)")
        if self.hi > 0 and crop is None:
            raise ValueError("strata have sigma_max > 0 (crops annotation) but no crop table was given")
        self.p_mean, self.p_std = p_mean, p_std
        self.crop = crop
        edges = bucket_edges or [0.002, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 80.0]
        self.coverage = Coverage(torch.tensor(edges, dtype=torch.float32))

    @classmethod
    def from_annotations(
        cls, sigma_min, sigma_max=None, *, lambda_max: float = 4.0, edges=None, **kw
    ) -> tuple[StratifiedSigmaSampler, torch.Tensor]:
        """The in-memory shortcut: strata of every row and their counts; returns (sampler, stratum id per row)."""
        ids, table = strata_of(sigma_min, sigma_max, lambda_max, edges)
        n = torch.bincount(ids, minlength=len(table))
        return cls(table[:, 0], table[:, 1], n, **kw), ids

    # eligibility at given σ's
    def _whole(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t[None, :] < sigma[:, None]  # (B, K_active)

    def _eligible(self, sigma: torch.Tensor) -> torch.Tensor:
        return self._whole(sigma) | ((sigma[:, None] > 0) & (sigma[:, None] <= self.sigma_max[None, :]))

    def full_count(self, sigma: torch.Tensor) -> torch.Tensor:
        """How many rows may train σ as a whole (t_k < σ)."""
        return (self._whole(sigma).long() * self.counts).sum(1)

    def crop_count(self, sigma: torch.Tensor) -> torch.Tensor:
        """How many rows may train σ through a crop (0 < σ ≤ σmax_k)."""
        ok = (sigma[:, None] > 0) & (sigma[:, None] <= self.sigma_max[None, :])
        return (ok.long() * self.counts).sum(1)

    def eligible(self, sigma: torch.Tensor) -> torch.Tensor:
        """How many distinct rows are eligible at σ (whole or through a crop): N(σ)."""
        return (self._eligible(sigma).long() * self.counts).sum(1)

    def stratum_probs(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B, K) P(stratum k | σ) over the full table (rows of zeros where nothing is eligible)."""
        w = self._eligible(sigma).double() * self.counts.double()
        tot = w.sum(1, keepdim=True)
        out = torch.zeros(len(sigma), self.n_strata, dtype=torch.float64)
        out[:, self.active] = torch.where(tot > 0, w / tot.clamp(min=1), torch.zeros_like(w))
        return out

    def _eligible_range_draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """σ from the log-normal restricted to where some stratum is eligible (rejection; log-uniform fallback)."""
        out = torch.empty(0)
        for _ in range(50):
            s = lognormal_sigma(4 * n + 16, self.p_mean, self.p_std, generator)
            s = s[(s > self.lo) | (s <= self.hi)]
            out = torch.cat([out, s])
            if len(out) >= n:
                return out[:n]
        # the eligible range has almost no log-normal mass: draw log-uniformly just above the lowest threshold
        u = torch.rand(n - len(out), generator=generator)
        return torch.cat([out, self.lo * (1.0 + 1e-6) * torch.exp(u * math.log(4.0))])

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch`` (σ, stratum id, crop size) triples; crop size 0 means the whole row."""
        sigma = lognormal_sigma(batch, self.p_mean, self.p_std, generator)
        w = self._eligible(sigma)
        none = ~w.any(1)
        if none.any():
            k = int(none.sum())
            sigma[none] = self._eligible_range_draw(k, generator)
            self.coverage.redraws += k
            w = self._eligible(sigma)
        cum = (w.double() * self.counts.double()).cumsum(1)
        total = cum[:, -1:].contiguous()
        u = torch.rand(batch, 1, generator=generator, dtype=torch.float64) * total
        j = torch.searchsorted(cum, u, right=True)  # first stratum whose cumulative weight exceeds u
        last = torch.searchsorted(cum, total, right=False)  # the last stratum with positive weight (u ≈ total)
        j = torch.minimum(j, last).squeeze(1)
        whole = self.t[j] < sigma
        crop_size = torch.zeros(batch, dtype=torch.long)
        if (~whole).any():
            crop_size[~whole] = self.crop(sigma[~whole])
        self.coverage.count(sigma, crop_size)
        return sigma, self.active[j], crop_size

    def donut(self) -> list[dict]:
        """Per bucket: its σ range, rows eligible whole / through crops at its lower edge, draws so far."""
        return self.coverage.donut(self.full_count, self.crop_count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The coverage counters, as tensors (the same keys as SigmaSampler's)."""
        return self.coverage.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.coverage.load_state_dict(state)


class StratumStreams:
    """One shuffled, repeating stream of row indices per stratum (the in-memory stand-in for a streaming reader).

    Pass p of stratum k is a permutation of its rows drawn from a generator seeded by hash(seed, k, p), so
    every row comes exactly once per pass and each pass is reshuffled. The state is, per stratum, the pass,
    the position in it and the pass's permutation seed.
    """

    def __init__(self, rows_by_stratum: Mapping[int, torch.Tensor], seed: int = 0):
        self.seed = int(seed)
        self.strata = sorted(int(k) for k in rows_by_stratum)
        self.rows = {k: torch.as_tensor(rows_by_stratum[k]).flatten().long() for k in self.strata}
        if any(r.numel() == 0 for r in self.rows.values()):
            raise ValueError("StratumStreams: every stratum needs at least one row")
        self.epoch = dict.fromkeys(self.strata, 0)
        self.pos = dict.fromkeys(self.strata, 0)
        self._perm: dict[int, torch.Tensor] = {}

    @classmethod
    def from_ids(cls, stratum_of_row: torch.Tensor, seed: int = 0) -> StratumStreams:
        """Group rows 0..N-1 by their stratum id (from :func:`strata_of`)."""
        ids = torch.as_tensor(stratum_of_row).flatten().long()
        order = torch.argsort(ids, stable=True)
        uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
        return cls(dict(zip(uniq.tolist(), torch.split(order, counts.tolist()))), seed)

    def perm_seed(self, k: int) -> int:
        return _mix(self.seed, k, self.epoch[k])

    def _current(self, k: int) -> torch.Tensor:
        if k not in self._perm:
            g = torch.Generator().manual_seed(self.perm_seed(k))
            self._perm[k] = self.rows[k][torch.randperm(len(self.rows[k]), generator=g)]
        return self._perm[k]

    def take(self, k: int, count: int) -> torch.Tensor:
        """The next ``count`` rows of stratum k's stream (crossing into reshuffled passes as needed)."""
        if k not in self.rows:
            raise KeyError(f"stratum {k} has no rows")
        out = []
        while count > 0:
            perm = self._current(k)
            got = perm[self.pos[k] : self.pos[k] + count]
            out.append(got)
            count -= len(got)
            self.pos[k] += len(got)
            if self.pos[k] == len(perm):
                self.epoch[k] += 1
                self.pos[k] = 0
                del self._perm[k]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def next(self, k: int) -> int:
        return int(self.take(k, 1)[0])

    def batch(self, strata: torch.Tensor) -> torch.Tensor:
        """Row indices for a batch of drawn strata: the same as ``[next(k) for k in strata]``, vectorised."""
        strata = torch.as_tensor(strata).flatten().long()
        out = torch.empty(len(strata), dtype=torch.long)
        for k in torch.unique(strata).tolist():  # each stratum's draws keep their order in the batch
            where = (strata == k).nonzero().flatten()
            out[where] = self.take(k, len(where))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        ks = self.strata
        return {
            "seed": torch.tensor(self.seed, dtype=torch.long),
            "strata": torch.tensor(ks, dtype=torch.long),
            "sizes": torch.tensor([len(self.rows[k]) for k in ks], dtype=torch.long),
            "epoch": torch.tensor([self.epoch[k] for k in ks], dtype=torch.long),
            "pos": torch.tensor([self.pos[k] for k in ks], dtype=torch.long),
            "perm_seed": torch.tensor([self.perm_seed(k) for k in ks], dtype=torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        ks = state["strata"].tolist()
        sizes = state["sizes"].tolist()
        if ks != self.strata or sizes != [len(self.rows[k]) for k in ks]:
            raise ValueError("StratumStreams state is for other strata (ids or sizes differ)")
        self.seed = int(state["seed"])
        self.epoch = dict(zip(ks, state["epoch"].tolist()))
        self.pos = dict(zip(ks, state["pos"].tolist()))
        if [self.perm_seed(k) for k in ks] != state["perm_seed"].tolist():
            raise ValueError("StratumStreams state: permutation seeds do not match (seed, stratum, pass)")
        self._perm.clear()
