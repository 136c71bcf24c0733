"""The corrupt stage's preview: originals above their corrupted versions, one pair of rows per corruption."""

from __future__ import annotations

import pyarrow.parquet as pq

from ambient_ray.data.images import decode_png
from ambient_ray.data.sources import decode
from ambient_ray.io import storage
from ambient_ray.io.plots import image_rows


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
