"""A dataset's rows without their images: the stage-output folder, the metadata columns, one image shape,
and row filters ``FIELD=V1[,V2]``."""

from __future__ import annotations

import json

import numpy as np

from ambient_ray.io import storage


def data_dir(uri: str) -> str:
    """The Parquet folder of a stage's output (``URI/data``), or ``uri`` itself if it has no ``data/``."""
    uri = storage.normalize(uri)
    sub = storage.join(uri, "data")
    return sub if storage.is_dir(sub) else uri


FILTER_FIELDS = ("quality", "source", "label", "corruption")


def parse_filter(spec: str) -> tuple[str, set[str]]:
    """A row filter ``FIELD=V1[,V2...]``: ``label=0,1`` -> ('label', {'0', '1'})."""
    field, eq, values = spec.partition("=")
    field = field.strip()
    vals = {v.strip() for v in values.split(",") if v.strip()}
    if not eq or field not in FILTER_FIELDS or not vals:
        raise ValueError(f"row filter {spec!r}: expected FIELD=V1[,V2...] with FIELD one of {', '.join(FILTER_FIELDS)}")
    return field, vals


def match(meta, spec: str) -> np.ndarray:
    """Boolean mask of the rows of a metadata frame that a row filter selects."""
    field, vals = parse_filter(spec)
    if field not in meta:
        raise ValueError(f"row filter {spec!r}: the dataset has no '{field}' column")
    return meta[field].astype(str).isin(vals).to_numpy()


META_COLUMNS = (
    "id",
    "height",
    "width",
    "channels",
    "quality",
    "source",
    "label",
    "corruption",
    "sigma_min",
    "sigma_max",
)


def load_metadata(data: str, extra: tuple[str, ...] = ()):
    """The dataset's non-image columns (pandas), validated, with the ``extra`` columns (each must exist);
    raises ValueError naming files and rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = storage.list_files(data_dir(data), (".parquet",))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {data}")
    tables = []
    for f in files:
        fs, path = storage.filesystem(f)
        names = pq.read_schema(path, filesystem=fs).names
        for required in ("id", "image"):
            if required not in names:
                raise ValueError(f"{f}: missing column '{required}' (columns: {', '.join(names)})")
        for required in extra:
            if required not in names:
                raise ValueError(f"{f}: missing column '{required}' (columns: {', '.join(names)})")
        want = [c for c in META_COLUMNS if c in names] + [c for c in extra if c not in META_COLUMNS]
        tables.append(pq.read_table(path, filesystem=fs, columns=want))
    meta = pa.concat_tables(tables, promote_options="default").to_pandas()
    if meta["id"].duplicated().any():
        raise ValueError(f"duplicate ids in {data}: {meta['id'][meta['id'].duplicated()].head(5).tolist()}")
    return meta


def one_shape(meta, data: str) -> tuple[int, int]:
    """The dataset's one square (resolution, channels); clear errors for mixed or non-square images."""
    if not {"height", "width", "channels"} <= set(meta.columns):
        raise ValueError("dataset lacks height/width/channels columns; write it with the corrupt stage")
    shapes = meta.groupby(["height", "width", "channels"]).size()
    if len(shapes) > 1:
        listing = ", ".join(f"{h}x{w}x{c}: {k} rows" for (h, w, c), k in shapes.items())
        raise ValueError(f"images of mixed shapes in {data} ({listing}); corrupt with --image-size to resize")
    (h, w, c) = shapes.index[0]
    if h != w:
        raise ValueError(f"images are {h}x{w}; training needs square images (corrupt with --image-size)")
    return int(h), int(c)


def read_latents_info(data: str) -> dict | None:
    """``latents.json`` of a precompute output (or of the folder a later stage wrote from it), if any."""
    uri = storage.join(storage.normalize(data), "latents.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def read_locality_table(uri: str) -> dict:
    """A ``locality.json`` (the file, or a folder holding it), validated."""
    uri = storage.normalize(uri)
    path = uri if uri.endswith(".json") else storage.join(uri, "locality.json")
    t = json.loads(storage.read_bytes(path))
    if len(t.get("sigmas", [])) != len(t.get("crop", [])) or not t["sigmas"]:
        raise ValueError(f"{path}: not a locality table (needs equal-length 'sigmas' and 'crop')")
    return t
