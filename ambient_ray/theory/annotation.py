"""From a dataset's annotation to the theory: d_TV(p_σ, q_σ) per σ read off the noise classifier's curves.

``annotate`` stores, per row, the noise classifier's mean probability c(σ) that the row is clean, on its σ grid
(``curves/*.parquet`` under the annotation's curves folder; the grid and τ in ``annotation.json``). For any
classifier f with values in [0, 1], E_p[f] − E_q[f] ≤ d_TV(p, q) (the variational form of the TV), with equality
for the Bayes-optimal hard classifier; with equal priors that classifier's accuracy is ½ + ½·d_TV(p_σ, q_σ). So

    TV̂(σ) = mean c(σ) over the clean rows − mean c(σ) over a corrupted set's rows

estimates d_TV(p_σ, q_σ), from below (a perfect classifier would make it exact). Without clean rows the estimate
is 1 − 2·mean c(σ) over the corrupted rows ("symmetric": assumes the classifier errs as often on clean rows).

Then, per corrupted set:

- the contraction fitted to TV̂ (Theorem 4.2's shape): TV̂(σ) ≈ min(d₀, C/σ), d₀ = max TV̂, C by least squares;
  the theorem's C is D·d_TV(p₀, q₀)/2, so 2C/d₀ is the support's *effective* diameter;
- a free power law TV̂(σ) ≈ K·σ^(−k) on the decay beyond the peak (0.02 < TV̂ < 0.9·peak; k = 1 is Theorem
  4.2's rate; a corruption that keeps the mean contracts faster);
- the σ where TV̂ falls to 1 − 2τ (the σ where an optimal classifier is fooled to τ: annotation's σ_min, Eq. 3.2
  with this set's mean curve), the same from the fitted contraction (C/(1 − 2τ)), against what annotation chose
  (the set's per-dataset crossing, and the mean and median of its rows' σ_min).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from scipy.optimize import minimize_scalar

from ambient_ray.diffusion import thresholds
from ambient_ray.io import storage
from ambient_ray.theory.simulation import sigma_at_tv

ROW_COLUMNS = ("id", "quality", "corruption", "sigma_min")
FIT_RANGE = (0.02, 0.98)  # the power law is fitted where TV̂ is above its floor (and below its plateau)


@dataclass
class SetTheory:
    """What the theory reads from one corrupted set's curves (see the module docstring)."""

    name: str
    rows: int
    tv: list[float]  # TV̂ per grid σ
    d0: float  # max TV̂: the classifier's estimate of d_TV(p₀, q₀) (from below)
    contraction: float  # C of min(d₀, C/σ); Theorem 4.2's C is D·d_TV(p₀, q₀)/2
    power: tuple[float, float] | None  # (K, k) of K·σ^(−k), None with fewer than 2 points in FIT_RANGE
    sigma_tv: float  # σ where TV̂ falls to 1 − 2τ
    sigma_fit: float  # C/(1 − 2τ), where min(d₀, C/σ) falls to 1 − 2τ (0 when d₀ is already below it)
    sigma_annotation: float  # the set's mean curve's first crossing of τ (annotate's per-dataset σ_min)
    sigma_min_mean: float  # the mean of the rows' σ_min as annotated
    sigma_min_median: float


@dataclass
class AnnotationTheory:
    dataset: str
    grid: list[float]
    tau: float
    estimator: str  # "clean rows" or "symmetric"
    clean_rows: int
    sets: list[SetTheory]

    def to_dict(self) -> dict:
        return asdict(self)


def tv_estimate(clean: np.ndarray | None, corrupted: np.ndarray) -> tuple[np.ndarray, str]:
    """TV̂ per σ from (rows, σ) curves of clean and corrupted rows, clipped to [0, 1]; and the estimator's name."""
    if clean is not None and len(clean):
        return np.clip(clean.mean(axis=0) - corrupted.mean(axis=0), 0.0, 1.0), "clean rows"
    return np.clip(1.0 - 2.0 * corrupted.mean(axis=0), 0.0, 1.0), "symmetric"


def fit_contraction(grid: np.ndarray, tv: np.ndarray) -> tuple[float, float]:
    """(d₀, C) of Theorem 4.2's shape TV̂(σ) ≈ min(d₀, C/σ): d₀ = max TV̂ (the estimate of d_TV(p₀, q₀) a classifier
    of this strength gives), C by least squares over the grid (bounded scalar search over log C)."""
    grid, tv = np.asarray(grid, dtype=np.float64), np.asarray(tv, dtype=np.float64)
    top = float(tv.max()) if tv.size else 0.0
    if not top > 0:
        return 0.0, 0.0
    loss = lambda lc: float(np.sum((tv - np.minimum(top, math.exp(lc) / grid)) ** 2))  # noqa: E731
    lo, hi = math.log(grid[0] * 1e-4), math.log(grid[-1] * 10)
    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    return top, float(math.exp(res.x))


def fit_power(grid: np.ndarray, tv: np.ndarray) -> tuple[float, float] | None:
    """(K, k) of TV̂ ≈ K·σ^(−k) by least squares in log-log on the decay: the points beyond TV̂'s peak with
    FIT_RANGE[0] < TV̂ < 0.9·peak (not the plateau, not the floor)."""
    grid, tv = np.asarray(grid, dtype=np.float64), np.asarray(tv, dtype=np.float64)
    if not tv.size or not tv.max() > 0:
        return None
    sel = (np.arange(len(tv)) > int(np.argmax(tv))) & (tv > FIT_RANGE[0]) & (tv < 0.9 * tv.max())
    if sel.sum() < 2:
        return None
    slope, icpt = np.polyfit(np.log(grid[sel]), np.log(tv[sel]), 1)
    return float(math.exp(icpt)), float(-slope)


def annotation_crossing(grid: np.ndarray, curve: np.ndarray, tau: float) -> float:
    """Annotate's per-dataset σ_min for one mean curve (:func:`ambient_ray.diffusion.thresholds.first_crossing`,
    Eq. 3.2); inf where the curve never exceeds τ (annotate gives those the top of the grid, marked not crossed)."""
    sigma, crossed = thresholds.first_crossing(torch.from_numpy(curve)[None], torch.from_numpy(grid), tau)
    return float(sigma[0]) if bool(crossed[0]) else math.inf


def read(dataset: str) -> AnnotationTheory:
    """The theory of an annotated dataset (``annotate``'s OUT, local or S3)."""
    root = storage.normalize(dataset)
    marker = storage.join(root, "annotation.json")
    if not storage.exists(marker):
        raise FileNotFoundError(f"{root}: no annotation.json: not the output folder of `ambient-ray annotate`")
    prov = json.loads(storage.read_bytes(marker))["provenance"]
    if not prov.get("classifier"):
        raise ValueError(f"{root}: annotated without a noise classifier, so it has no curves to read")
    grid, tau = np.asarray(prov["grid"], dtype=np.float64), float(prov["tau"])
    curves = _table(storage.join(prov["curves"], "curves"), ["id", "noise_curve", "error"])
    rows = _table(storage.join(root, "data"), None)
    curves = curves.filter(pc.equal(curves.column("error"), ""))
    pos = {rid: i for i, rid in enumerate(curves.column("id").to_pylist())}
    c = np.stack(curves.column("noise_curve").to_numpy(zero_copy_only=False))
    ids = rows.column("id").to_pylist()
    keep = np.array([i in pos for i in ids])
    cols = rows.column_names
    quality = np.array(rows.column("quality").to_pylist() if "quality" in cols else ["unknown"] * len(ids), object)
    corruption = np.array(
        [v or "" for v in rows.column("corruption").to_pylist()] if "corruption" in cols else [""] * len(ids), object
    )
    smin = rows.column("sigma_min").to_numpy(zero_copy_only=False).astype(np.float64)
    clean = keep & (quality == "clean")
    bad = keep & ~clean
    group = np.where(corruption != "", corruption, "corrupted")
    curve_of = lambda sel: c[[pos[i] for i in np.asarray(ids, object)[sel]]]  # noqa: E731
    clean_curves = curve_of(clean) if clean.any() else None
    sets, estimator = [], "symmetric"
    for name in dict.fromkeys(group[bad]):
        sel = bad & (group == name)
        cur = curve_of(sel)
        tv, estimator = tv_estimate(clean_curves, cur)
        d0, cfit = fit_contraction(grid, tv)
        level = 1.0 - 2.0 * tau
        sets.append(
            SetTheory(
                name=str(name),
                rows=int(sel.sum()),
                tv=[float(v) for v in tv],
                d0=d0,
                contraction=cfit,
                power=fit_power(grid, tv),
                sigma_tv=sigma_at_tv(grid, tv, level),
                sigma_fit=cfit / level if 0 < level < d0 else 0.0,  # the fit is below 1 − 2τ everywhere otherwise
                sigma_annotation=annotation_crossing(grid, cur.mean(axis=0), tau),
                sigma_min_mean=float(np.mean(smin[sel])),
                sigma_min_median=float(np.median(smin[sel])),
            )
        )
    if not sets:
        raise ValueError(f"{root}: no corrupted rows with curves: nothing to compare with the clean ones")
    return AnnotationTheory(root, [float(g) for g in grid], tau, estimator, int(clean.sum()), sets)


def _table(folder: str, columns: list[str] | None) -> pa.Table:
    files = storage.list_files(folder, (".parquet",))
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet shards")
    tables = []
    for f in files:
        fs, path = storage.filesystem(f)
        if columns is None:  # the annotated rows: only what the theory reads (not the images)
            names = pq.read_schema(path, filesystem=fs).names
            t = pq.read_table(path, filesystem=fs, columns=[k for k in ROW_COLUMNS if k in names])
        else:
            t = pq.read_table(path, filesystem=fs, columns=columns)
        tables.append(t.replace_schema_metadata(None))
    return pa.concat_tables(tables, promote_options="default")
