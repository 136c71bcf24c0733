"""Pixel masks as data (Ambient Diffusion, Daras et al. 2023): which pixels of a row are observed.

A dataset with masks stores them as the ``mask`` tensor column of :mod:`ambient_ray.data.schema`: uint8
(1, H, W), 1 = observed, one value per pixel shared by every channel; the hidden pixels of the row's
``image`` are stored as 0. The corrupt stage writes the column for every row of a dataset that has any
masked row (all ones for the rows that hide nothing).

Here, pure numpy and pyarrow (PIL for PNG masks; no Ray, no torch):

- :func:`masks_of`: the masks of a batch or table as one uint8 (N, 1, H, W) array, all ones for the rows
  without a mask and for data without a ``mask`` column; what the training side reads.
- :func:`check_mask`: a user's mask (PNG bytes, or an array) validated against its image's H x W.
- :func:`mask_cells`: the per-row values of a user's Parquet ``mask`` column (tensor, lists or PNG bytes).
- :func:`resize_mask`: a mask through the same centre crop and resize as its image.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

MASK = "mask"
MASK_SUFFIX = ".mask.png"  # an image folder's mask of NAME.png / NAME.jpg is NAME.mask.png beside it


def _is_bytes(v: Any) -> bool:
    return isinstance(v, (bytes, bytearray, memoryview))


def _png(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """A PNG (or other single-channel image) mask's pixels, or a problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            if im.mode not in ("1", "L"):
                return None, f"mask image mode {im.mode} ({len(im.getbands())} channels); expected one channel (L or 1)"
            return np.asarray(im), None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"undecodable mask image: {type(e).__name__}: {e}"


def _values(extra: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in extra[:5].tolist())
    return shown + (", ..." if len(extra) > 5 else "")


def check_mask(value: Any, hw: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """A user's mask as uint8 (H, W), 1 = observed, or ``(None, problem)``.

    ``value``: PNG bytes (mode L or 1; values 0/255 or 0/1, nonzero = observed), or an array of shape (H, W),
    (1, H, W) or (H, W, 1) with values 0/1 (bool or any number type). ``hw`` is the image's (H, W)."""
    h, w = hw
    if _is_bytes(value):
        arr, problem = _png(value)
        if problem:
            return None, problem
        if arr.dtype != bool:
            found = np.unique(arr)
            if not (np.isin(found, (0, 255)).all() or np.isin(found, (0, 1)).all()):
                bad = found[~np.isin(found, (0, 1, 255))]
                return None, f"values other than 0/255 or 0/1 ({_values(bad if len(bad) else found)})"
        if arr.shape != (h, w):
            return None, f"mask image is {arr.shape[0]}x{arr.shape[1]}, the image is {h}x{w}"
        return (arr != 0).astype(np.uint8), None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        return None, f"not an array ({type(e).__name__}: {e})"
    if arr.dtype.kind not in "biuf":
        return None, f"values of dtype {arr.dtype} are not numbers"
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != (h, w):
        return None, f"shape {tuple(np.asarray(value).shape)}, the image is {h}x{w} (expected (1, {h}, {w}))"
    if arr.dtype.kind != "b":
        off = (arr != 0) & (arr != 1)
        if off.any():
            return None, f"values other than 0 and 1 ({_values(np.unique(arr[off]))})"
    return (arr != 0).astype(np.uint8), None


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A (H, W) 0/1 mask through :func:`ambient_ray.data.images.resize_square`'s centre crop, resized to
    ``size`` x ``size``: a pixel is observed only where every source pixel under it is (box filter)."""
    from PIL import Image

    h, w = mask.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = mask[top : top + s, left : left + s].astype(np.float32)
    out = np.asarray(Image.fromarray(crop, mode="F").resize((size, size), Image.BOX))
    return (out >= 1.0 - 1e-4).astype(np.uint8)


def _fixed_rows(col: pa.Array) -> list | None:
    """Rows of a fixed-shape tensor or nested fixed-size-list column as arrays (None for null rows), or None
    for any other layout (:func:`ambient_ray.data.schema._fixed_layout` reads the layout)."""
    from ambient_ray.data.schema import _fixed_layout

    layout = _fixed_layout(col)
    if layout is None:
        return None
    shape, _, leaf = layout
    if not (pa.types.is_integer(leaf.type) or pa.types.is_floating(leaf.type) or pa.types.is_boolean(leaf.type)):
        return None
    n = len(col)
    values = leaf.to_numpy(zero_copy_only=False).reshape((n, *shape))
    nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(n, bool)
    return [None if nulls[i] else values[i] for i in range(n)]


def mask_cells(column: pa.Array | pa.ChunkedArray) -> list:
    """The per-row values of a ``mask`` column: arrays (a tensor or list column), bytes (a binary column of
    PNGs), or None (a null row: nothing hidden)."""
    col = column
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    rows = _fixed_rows(col)
    if rows is not None:
        return rows
    if isinstance(col, pa.ExtensionArray):  # other tensor extension types (Ray's own) convert themselves
        try:
            return [None if v is None else np.asarray(v) for v in col.to_numpy(zero_copy_only=False)]
        except (pa.ArrowException, TypeError, ValueError, NotImplementedError):
            col = col.storage
    return col.to_pylist()  # lists stay lists: check_mask says what is wrong with a ragged one


def _as_row(v: Any, where: str, hw: tuple[int, int] | None) -> np.ndarray | None:
    """One row's stored mask as (H, W) 0/1 uint8, or None for no mask; a flat row (pandas' view of a tensor
    column) is reshaped to ``hw``."""
    if v is None:
        return None
    if _is_bytes(v):
        if not len(v):
            return None
        arr, problem = _png(v)
        if problem:
            raise ValueError(f"{where}: {problem}")
        return (arr != 0).astype(np.uint8)
    a = np.asarray(v)
    if a.dtype == object:
        if a.ndim == 0 and a.item() is None:
            return None
        a = np.asarray(a.tolist())
    if a.ndim == 1 and hw is not None and a.size == hw[0] * hw[1]:
        a = a.reshape(hw)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.dtype.kind not in "biuf":
        raise ValueError(f"{where}: a mask of shape {a.shape} and dtype {a.dtype}; expected (1, H, W) numbers")
    return (a != 0).astype(np.uint8)


def _columns(data: Any) -> tuple[int, dict[str, Any]]:
    """(rows, {name: column}) of a table, record batch, dict of arrays (a Ray numpy batch) or DataFrame."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return data.num_rows, {name: data.column(name) for name in data.column_names}
    if isinstance(data, Mapping):
        cols = dict(data)
        n = len(next(iter(cols.values()))) if cols else 0
        return n, cols
    if hasattr(data, "columns") and hasattr(data, "__len__"):  # a pandas DataFrame
        return len(data), {name: data[name].to_numpy() for name in data.columns}
    raise TypeError(f"masks_of: expected a pyarrow Table or RecordBatch, a dict of arrays or a DataFrame, got {data!r}")


def _image_hw(cols: dict[str, Any], n: int) -> tuple[int, int] | None:
    """The one (H, W) of the rows, from the height and width columns or the first image's PNG."""
    if "height" in cols and "width" in cols and n:
        hs = {int(v) for v in _pylist(cols["height"])}
        ws = {int(v) for v in _pylist(cols["width"])}
        if len(hs) == 1 and len(ws) == 1:
            return hs.pop(), ws.pop()
        raise ValueError(f"masks_of: images of several shapes (heights {sorted(hs)[:4]}, widths {sorted(ws)[:4]})")
    if "image" in cols and n:
        first = _pylist(cols["image"])[0]
        if _is_bytes(first) and len(first):
            from PIL import Image

            with Image.open(io.BytesIO(bytes(first))) as im:
                return im.height, im.width
    return None


def _pylist(col: Any) -> list:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_pylist()
    return list(col)


def masks_of(data: Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The observed-pixel masks of ``data`` as one uint8 (N, 1, H, W) array, 1 = observed.

    ``data``: a pyarrow Table or RecordBatch, a dict of column arrays (a Ray Data numpy batch, whose ``mask``
    is already a (N, 1, H, W) array) or a pandas DataFrame. A row without a mask (a null) and data without a
    ``mask`` column give all ones. (H, W) is ``shape`` if given, else the masks' own, else the ``height`` and
    ``width`` columns, else the first ``image``'s PNG header; a ValueError if none says, or if rows differ."""
    n, cols = _columns(data)
    col = cols.get(MASK)
    if isinstance(col, np.ndarray) and col.dtype.kind in "biuf" and col.ndim in (3, 4):  # a Ray numpy batch
        x = col[:, None] if col.ndim == 3 else col
        if x.shape[1] != 1 and x.shape[-1] == 1:
            x = x.transpose(0, 3, 1, 2)
        if shape is not None and tuple(x.shape[2:]) != tuple(shape):
            raise ValueError(f"masks_of: masks of shape {x.shape[1:]}, expected (1, {shape[0]}, {shape[1]})")
        return (x != 0).astype(np.uint8)
    rows: list[np.ndarray | None] = [None] * n
    hw = tuple(shape) if shape is not None else None
    if col is not None:
        cells = mask_cells(col) if isinstance(col, (pa.Array, pa.ChunkedArray)) else list(col)
        flat = any(isinstance(v, np.ndarray) and v.ndim == 1 for v in cells)
        hint = hw or (_image_hw(cols, n) if flat else None)
        rows = [_as_row(v, f"column {MASK!r}, row {i}", hint) for i, v in enumerate(cells)]
    if hw is None:
        hw = next((r.shape for r in rows if r is not None), None) or _image_hw(cols, n)
    if hw is None:
        if n == 0:
            return np.ones((0, 1, 1, 1), np.uint8)
        raise ValueError("masks_of: no mask, no height/width columns and no PNG image to take the shape from")
    out = np.ones((n, 1, *hw), np.uint8)
    for i, r in enumerate(rows):
        if r is None:
            continue
        if r.shape != hw:
            raise ValueError(f"masks_of: column {MASK!r}, row {i}: shape {r.shape}, expected {hw}")
        out[i, 0] = r
    return out
