"""Image bytes: PNG encoding and decoding, square resizing, and reading the images of a stage's output."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ambient_ray.data.metadata import parquet_files
from ambient_ray.io import storage


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize (bicubic) to ``size`` x ``size``."""
    h, w, c = arr.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    arr = arr[top : top + s, left : left + s]
    im = Image.fromarray(arr[..., 0] if c == 1 else arr).resize((size, size), Image.BICUBIC)
    return np.asarray(im).reshape(size, size, c)


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode stored image bytes to uint8 (H, W, C)."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def read_images(uri: str, ids: set[str] | None = None):
    """(ids, uint8 tensor (N, C, H, W)) of a stage output's rows (those in ``ids``, or all), in file order."""
    import pyarrow.parquet as pq
    import torch

    got, imgs = [], []
    for f in parquet_files(uri):
        fs, path = storage.filesystem(f)
        t = pq.read_table(path, filesystem=fs, columns=["id", "image"])
        for rid, img in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
            if ids is None or rid in ids:
                got.append(rid)
                imgs.append(decode_png(img).transpose(2, 0, 1))
    if not imgs:
        raise ValueError(f"no rows read from {uri}" + (f" among {len(ids)} ids asked for" if ids is not None else ""))
    return got, torch.from_numpy(np.stack(imgs))
