"""A dataset's rows without their images: the stage-output folder, the metadata columns, one image shape,
and row filters ``FIELD=V1[,V2]``."""

from __future__ import annotations

import json

import numpy as np

from ambient_ray.config import DataError
from ambient_ray.io import storage


def data_dir(uri: str) -> str:
    """The Parquet folder of a stage's output (``URI/data``), or ``uri`` itself if it has no ``data/``."""
    uri = storage.normalize(uri)
    sub = storage.join(uri, "data")
    return sub if storage.is_dir(sub) else uri


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a dataset: a folder's shards (under ``data/`` for a stage output) or one ``.parquet``
    file. A DataError says which: the path does not exist, is some other file, or holds no Parquet shards."""
    uri = storage.normalize(uri)
    if not storage.exists(uri):
        raise DataError(f"no such file or folder: {uri}")
    if not storage.is_dir(uri):
        if uri.lower().endswith(".parquet"):
            return [uri]
        raise DataError(f"{uri} is a file, not a Parquet file or a folder of Parquet shards")
    files = storage.list_files(data_dir(uri), (".parquet",))
    if not files:
        raise DataError(f"no Parquet shards under {uri}")
    return files


def read_schema_names(f: str, required: tuple[str, ...] = ()) -> list[str]:
    """The column names of Parquet file ``f``; a DataError naming the file if it is no Parquet file or lacks one
    of the ``required`` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(f)
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except (pa.ArrowInvalid, OSError) as e:  # pyarrow: ArrowInvalid for no Parquet magic, OSError for a bad footer
        first = str(e).splitlines()[0]
        if storage.is_s3(f) and not isinstance(e, pa.ArrowInvalid):  # or S3 trouble: denied, unreachable
            raise storage.StorageError(
                f"S3 error for {f} (endpoint {storage.endpoint() or 'AWS default'}): {first}"
            ) from None
        raise DataError(f"{f}: not a readable Parquet file ({first})") from None
    for column in required:
        if column not in names:
            raise DataError(f"{f}: missing column '{column}' (columns: {', '.join(names)})")
    return names


def check_dataset(uri: str, columns: tuple[str, ...] = ("id", "image")) -> None:
    """A quick look before a stage starts: ``uri`` is a folder of Parquet shards or one Parquet file, and its
    first file has ``columns`` (every file is checked again when the stage reads the metadata); else a DataError."""
    read_schema_names(parquet_files(uri)[0], columns)


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
    ``data`` is a folder of Parquet shards, a stage output or one Parquet file. Raises DataError naming files
    and rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in parquet_files(data):
        fs, path = storage.filesystem(f)
        names = read_schema_names(f, ("id", "image", *extra))
        want = [c for c in META_COLUMNS if c in names] + [c for c in extra if c not in META_COLUMNS]
        tables.append(pq.read_table(path, filesystem=fs, columns=want))
    meta = pa.concat_tables(tables, promote_options="default").to_pandas()
    if meta["id"].duplicated().any():
        raise DataError(f"duplicate ids in {data}: {meta['id'][meta['id'].duplicated()].head(5).tolist()}")
    return meta


def one_shape(meta, data: str) -> tuple[int, int]:
    """The dataset's one square (resolution, channels); clear errors for mixed or non-square images."""
    if not {"height", "width", "channels"} <= set(meta.columns):
        raise DataError(f"{data} lacks height/width/channels columns; write it with the corrupt stage")
    shapes = meta.groupby(["height", "width", "channels"]).size()
    if len(shapes) > 1:
        listing = ", ".join(f"{h}x{w}x{c}: {k} rows" for (h, w, c), k in shapes.items())
        raise DataError(f"images of mixed shapes in {data} ({listing}); corrupt with --image-size to resize")
    (h, w, c) = shapes.index[0]
    if h != w:
        raise DataError(f"images are {h}x{w} in {data}; training needs square images (corrupt with --image-size)")
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
