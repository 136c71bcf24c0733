"""Noisy data as data (Denoising Score Distillation, seed paper 004): rows observed only as y = x + σ_n·z.

A dataset with noisy data stores each row's observation in the ``noisy`` tensor column of
:mod:`ambient_ray.data.schema` (float32 (C, H, W), the [-1, 1] data scale, never clipped or quantised) and its
noise level in the float ``sigma_n`` column (the standard deviation of z's multiplier in the same [-1, 1] scale,
the paper's σ_n; 0 for a clean row). The PNG ``image`` of such a row is a preview only: y clipped to [-1, 1] and
quantised. The corrupt stage writes both columns for every row of a dataset that has any noisy row (the
``noise:sigma=`` corruption, or a user's noisy data): a row without noise holds its image as floats and σ_n = 0.

Here, pure numpy and pyarrow (no Ray, no torch):

- :func:`noisy_of`: the ids, noisy data and σ_n of a stage output (local or ``s3://``), what training reads.
- :func:`noisy_shape`: the (C, H, W) of a dataset's ``noisy`` column, or None when it has none.
- :func:`check_noisy`, :func:`check_sigma_n`, :func:`check_range`: a user's noisy array and σ_n, validated.
- :func:`preview` and :func:`from_image`: between the float data and the uint8 (H, W, C) image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NOISY = "noisy"
SIGMA_N = "sigma_n"
# a value beyond ±(1 + RANGE_SIGMAS·σ_n) is no [-1, 1] data with Gaussian noise of σ_n (probability < 1e-15 a value)
RANGE_SIGMAS = 8.0
RANGE_SLACK = 1e-3
NOISY_CHANNELS = (1, 3)


def _values(extra: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in extra[:3].tolist())
    return shown + (", ..." if len(extra) > 3 else "")


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def check_noisy(value: Any) -> tuple[np.ndarray | None, str | None]:
    """A user's noisy image as float32 (C, H, W), or ``(None, problem)``.

    ``value``: an array (or nested lists) of floats, shape (C, H, W) with C = 1 or 3, or (H, W) for one channel;
    channels first, so an (H, W, C) array is refused (a (3, 3, 3) array would be ambiguous). Every value finite,
    within the float32 range. Values outside [-1, 1] are expected (noise); see :func:`check_range`."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        return None, f"not an array ({type(e).__name__}: {e})"
    if arr.dtype.kind != "f":
        what = "not numbers" if arr.dtype.kind in "OUSV" else f"dtype {arr.dtype}"
        return None, f"values are {what}; expected floats in the [-1, 1] data scale"
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in NOISY_CHANNELS or 0 in arr.shape:
        hint = ""
        if arr.ndim == 3 and arr.shape[-1] in NOISY_CHANNELS:
            hint = " (an (H, W, C) array: store it channels first, a.transpose(2, 0, 1))"
        return None, f"shape {tuple(np.shape(value))}; expected (C, H, W) with C = 1 or 3{hint}"
    nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if nan or inf:
        found = [_count(k, noun) for k, noun in ((nan, "NaN value"), (inf, "infinite value")) if k]
        return None, ", ".join(found)
    with np.errstate(over="ignore"):
        y = arr.astype(np.float32)
    beyond = int(np.isinf(y).sum())
    if beyond:
        return None, _count(beyond, "value") + " beyond the float32 range"
    return np.ascontiguousarray(y), None


def check_sigma_n(value: Any) -> tuple[float | None, str | None]:
    """A σ_n as a float >= 0, or ``(None, problem)``; None (absent) is a problem too."""
    if value is None:
        return None, "missing"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None, f"{value!r} is not a number"
    s = float(value)
    if math.isnan(s):
        return None, "NaN"
    if math.isinf(s):
        return None, f"{s} is not finite"
    if s < 0:
        return None, f"{s:g} is negative"
    return s, None


def check_range(y: np.ndarray, sigma_n: float) -> str | None:
    """A problem if ``y`` holds values beyond ±(1 + 8·σ_n): not [-1, 1] data with Gaussian noise of σ_n (images in
    [0, 255], or a σ_n far too small)."""
    bound = 1.0 + RANGE_SIGMAS * sigma_n + RANGE_SLACK
    far = np.abs(y) > bound
    if not far.any():
        return None
    return (
        f"{_count(int(far.sum()), 'value')} beyond ±{bound:.3g} ({_values(_farthest(y[far]))}): not [-1, 1] "
        f"data with noise σ_n={sigma_n:g} (values beyond ±(1 + {RANGE_SIGMAS:g}·σ_n) are refused)"
    )


def _farthest(v: np.ndarray) -> np.ndarray:
    v = np.unique(v)
    return v[np.argsort(-np.abs(v), kind="stable")]


def preview(y: np.ndarray) -> np.ndarray:
    """The uint8 (H, W, C) image of noisy data (C, H, W): clipped to [-1, 1] and quantised."""
    x01 = (np.clip(y, -1.0, 1.0) + 1.0) * 0.5
    return np.round(x01 * 255.0).astype(np.uint8).transpose(1, 2, 0).copy()


def from_image(img: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, C) image as float32 (C, H, W) in the [-1, 1] data scale (2·x/255 − 1)."""
    return (img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(2, 0, 1).copy()


# ------------------------------------------------------------------------------ the reader


def noisy_shape(data: str) -> tuple[int, int, int] | None:
    """The (C, H, W) of the ``noisy`` tensor column of a dataset (a stage output, a folder of Parquet shards or
    one Parquet file, local or ``s3://``), or None when it has no ``noisy`` column. Only the files' schemas are
    read. A DataError if some shards have the column and others not, or if it is no float32 (C, H, W) tensor."""
    import pyarrow.parquet as pq

    from ambient_ray.config import DataError
    from ambient_ray.data import schema
    from ambient_ray.data.metadata import parquet_files
    from ambient_ray.io import storage

    shapes: dict[str, tuple[int, ...] | None] = {}
    for f in parquet_files(data):
        fs, path = storage.filesystem(f)
        s = pq.read_schema(path, filesystem=fs)
        if NOISY not in s.names:
            shapes[f] = None
            continue
        try:
            spec = schema.specs_of(s).get(NOISY)
        except ValueError as e:
            raise DataError(f"{f}: column '{NOISY}': {e}") from None
        if spec is None:
            raise DataError(
                f"{f}: column '{NOISY}' is not a tensor column (float32 (C, H, W)); run the data through corrupt "
                "(docs/stages/corrupt.md, 'Noisy data')"
            )
        shapes[f] = spec.shape
    found = set(shapes.values())
    if found == {None}:
        return None
    if None in found:
        without = [f for f, v in shapes.items() if v is None]
        raise DataError(f"{data}: {len(without)} shards have no '{NOISY}' column (first: {without[0]}), others do")
    if len(found) > 1:
        raise DataError(f"{data}: '{NOISY}' columns of several shapes: {sorted(found)}")
    return tuple(found.pop())  # type: ignore[return-value]


def noisy_of(data: str, ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, float32 (N, C, H, W) noisy data in the [-1, 1] data scale, float64 (N,) σ_n) of a dataset's rows.

    ``data``: a stage output, a folder of Parquet shards or one Parquet file, local or ``s3://``. All rows in
    shard order, or those of ``ids`` in that order (a KeyError names ids the data does not hold). A DataError when
    the data has no ``noisy`` column (:func:`noisy_shape`) or no ``sigma_n`` column, or a row's σ_n is missing,
    NaN or negative. ``torch.from_numpy`` takes the arrays as they are."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ambient_ray.config import DataError
    from ambient_ray.data import schema
    from ambient_ray.data.metadata import parquet_files, read_schema_names
    from ambient_ray.io import storage

    shape = noisy_shape(data)
    if shape is None:
        raise DataError(
            f"{data} has no '{NOISY}' column: corrupt with --corruption noise:sigma=S, or bring noisy data "
            "(docs/stages/corrupt.md, 'Noisy data')"
        )
    spec = schema.noisy_spec(*shape)
    wanted = None if ids is None else pa.array(list(dict.fromkeys(ids)), pa.string())
    got_ids: list[str] = []
    ys: list[np.ndarray] = []
    sigmas: list[np.ndarray] = []
    for f in parquet_files(data):
        read_schema_names(f, ("id", NOISY, SIGMA_N))
        fs, path = storage.filesystem(f)
        t = pq.read_table(path, filesystem=fs, columns=["id", NOISY, SIGMA_N])
        if wanted is not None:
            t = t.filter(pc.is_in(t.column("id"), value_set=wanted))
        if not t.num_rows:
            continue
        s = t.column(SIGMA_N).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(s) | (s < 0)
        if bad.any():
            rows = [t.column("id")[int(i)].as_py() for i in np.flatnonzero(bad)[:5]]
            raise DataError(f"{f}: '{SIGMA_N}' missing, not finite or negative in rows {rows}")
        got_ids.extend(t.column("id").to_pylist())
        ys.append(schema.to_numpy(t.column(NOISY), spec))
        sigmas.append(s)
    y = np.concatenate(ys) if ys else np.zeros((0, *shape), np.float32)
    s = np.concatenate(sigmas) if sigmas else np.zeros(0, np.float64)
    if ids is None:
        return got_ids, y, s
    where = {rid: k for k, rid in enumerate(got_ids)}
    missing = [rid for rid in ids if rid not in where]
    if missing:
        raise KeyError(f"noisy_of: {len(missing)} ids not in {data} (first: {missing[:5]})")
    order = np.array([where[rid] for rid in ids], np.int64)
    return list(ids), y[order], s[order]
