"""Pictures people would rather look at than read: image grids and previews (matplotlib, Agg)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq

from ambient_ray import storage
from ambient_ray.datasets import decode, decode_png


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def image_rows(rows: list[tuple[str, list[np.ndarray]]], title: str = "") -> bytes:
    """A PNG of labelled rows of uint8 (H, W, C) images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.1 * ncols + 1.5, 1.2 * len(rows) + 0.4), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(imgs):
                img = imgs[c]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _figure_png(fig)


def corruption_preview(out: str, source, cfg, items, roles, specs, per_spec: int = 8) -> str:
    """Write ``OUT/preview.png``: for each corruption, originals above their corrupted versions."""
    wanted = {f"c{i}": [] for i in range(len(specs))}
    for f in storage.list_files(storage.join(out, "data"), (".parquet",)):
        fs, path = storage.filesystem(f)
        t = pq.read_table(path, filesystem=fs, columns=["id", "image", "quality", "corruption"]).to_pylist()
        for row in t:
            if row["quality"] != "corrupted":
                continue
            key = next((k for k, s in zip(wanted, specs) if s.spec == row["corruption"]), None)
            if key and len(wanted[key]) < per_spec:
                wanted[key].append(row)
        if all(len(v) >= per_spec for v in wanted.values()):
            break
    loc_of = dict(items)
    rows = []
    for spec, key in zip(specs, wanted):
        picked = wanted[key]
        if not picked:
            continue
        records = source.load([loc_of[r["id"]] for r in picked])
        originals = [decode(rec, cfg.source)[0] for rec in records]
        rows.append(("original", [o for o in originals if o is not None]))
        rows.append((spec.spec, [decode_png(r["image"]) for r in picked]))
    uri = storage.join(out, "preview.png")
    if rows:
        storage.write_bytes(uri, image_rows(rows, title=f"clean vs corrupted ({cfg.source.dataset})"))
    return uri
