"""Row schemas: the image rows and quarantine rows of the stages, and fixed-shape tensor columns.

A row may carry float tensors besides its PNG ``image``; each tensor column is described by a
:class:`TensorSpec` (name, dtype, shape per row). The standard names:

    latent        float32 (2*C, h, w)  VAE latent mean (first C channels) and std (last C), as EDM2
                                       stores them, so that a fresh latent is drawn per use (split_latent)
    caption_emb   float16 (T, D)       caption embedding, one vector per token
    caption_mask  bool or uint8 (T,)   its token mask
    mask          uint8 or bool (1, H, W)  observed pixels (Ambient Diffusion)
    noisy         float32 (C, H, W)    noisy images, never clipped or quantised

The shapes are the dataset's (its Parquet schema says which); a standard name with another dtype or
number of dimensions is refused.

Arrow encoding: a tensor column is Arrow's canonical ``arrow.fixed_shape_tensor`` extension type
(storage ``fixed_size_list<value>[prod(shape)]``, row-major) and its field carries the spec as JSON
under ``b"ambient_ray.tensor"``. Why this and not a plain ``fixed_size_list`` with the shape only in
the metadata: both round-trip through ``pyarrow.parquet`` (pyarrow stores the Arrow schema, extension
types and field metadata included, in the file) and through S3 alike, but Ray Data (2.60) turns a plain
fixed-size list into an object array of flat 1-D arrays in ``iter_batches(batch_format="numpy")``
(the shape is lost, and ``iter_torch_batches`` cannot stack it), while it gives a fixed-shape tensor
column as one ``(N, *shape)`` array of its dtype, through shuffles, ``map_batches`` and
``write_parquet`` too. The shape is then in the type itself, so a column still reads right where a
tool drops the field metadata (:func:`specs_of` falls back to the type). One exception: Ray cannot
make a numpy tensor of Arrow booleans ("bool is not valid data type for a tensor"), so a ``bool`` spec
is stored as uint8 0/1; :func:`to_numpy` gives bool back, Ray batches give the uint8.

Validation (:func:`validate`, applied by :func:`write_table` and :func:`read_table`) sends a row to
quarantine, with a reason naming the column and the problem, when a tensor is missing, has another
shape or number of elements, is not numeric, cannot be cast exactly, or holds NaN or infinite values.
Casts: a float spec takes any float, integer or bool values (float64 to float32 rounds; a value beyond
the target's range, e.g. 1e5 for float16, is refused); an integer or bool spec takes only integer or
bool values, in range (and 0/1 for bool): floats are never rounded into integers. Rows in = rows out +
rows quarantined, always. Pure pyarrow and numpy: no Ray here.

The ``mask`` column's own helpers (the masking corruptions write it for every row of a dataset with masks;
users bring their own; :func:`ambient_ray.data.masks.masks_of` reads it as (N, 1, H, W), all ones where a row
or the dataset has none) are in :mod:`ambient_ray.data.masks`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ambient_ray.io import storage

DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("label", pa.int64()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("quality", pa.string()),
        ("corruption", pa.string()),
        ("seed", pa.int64()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("locator", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("image", pa.binary()),
    ]
)

TENSOR_KEY = b"ambient_ray.tensor"
STAGE = "schema"
DTYPES = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)
# standard name -> (allowed dtypes, number of dimensions)
STANDARD = {
    "latent": (("float32",), 3),
    "caption_emb": (("float16",), 2),
    "caption_mask": (("bool", "uint8"), 1),
    "mask": (("uint8", "bool"), 3),
    "noisy": (("float32",), 3),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor column: every row holds an array of ``shape`` and ``dtype`` (a numpy dtype name)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            dtype = np.dtype(self.dtype).name
        except TypeError:
            raise ValueError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}") from None
        if dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {dtype} is not one of {', '.join(DTYPES)}")
        shape = tuple(self.shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
            raise ValueError(f"tensor {self.name!r}: shape {shape} must be one or more positive integers")
        shape = tuple(int(d) for d in shape)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", shape)
        if self.name in STANDARD:
            dtypes, ndim = STANDARD[self.name]
            if dtype not in dtypes:
                raise ValueError(
                    f"tensor {self.name!r}: dtype {dtype}, the standard {self.name} is {' or '.join(dtypes)}"
                )
            if len(shape) != ndim:
                raise ValueError(f"tensor {self.name!r}: shape {shape}, the standard {self.name} has {ndim} dimensions")
            if self.name == "latent" and shape[0] % 2:
                raise ValueError(f"tensor 'latent': {shape[0]} channels, not mean and std (2*C)")
            if self.name == "mask" and shape[0] != 1:
                raise ValueError(f"tensor 'mask': shape {shape}, the standard mask is (1, H, W)")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype of the stored values: the spec's, but uint8 for bool (see the module docstring)."""
        return np.dtype("uint8") if self.dtype == "bool" else np.dtype(self.dtype)

    def to_json(self) -> bytes:
        return json.dumps({"dtype": self.dtype, "shape": list(self.shape)}).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes | str) -> TensorSpec:
        d = json.loads(raw)
        return cls(name, d["dtype"], tuple(d["shape"]))


def latent_spec(channels: int, height: int, width: int) -> TensorSpec:
    """The ``latent`` column of a VAE with ``channels`` latent channels: mean and std stacked."""
    return TensorSpec("latent", "float32", (2 * channels, height, width))


def caption_specs(tokens: int, dim: int, mask_dtype: str = "bool") -> tuple[TensorSpec, TensorSpec]:
    """The ``caption_emb`` (float16 (T, D)) and ``caption_mask`` ((T,)) columns."""
    return TensorSpec("caption_emb", "float16", (tokens, dim)), TensorSpec("caption_mask", mask_dtype, (tokens,))


def mask_spec(height: int, width: int, dtype: str = "uint8") -> TensorSpec:
    return TensorSpec("mask", dtype, (1, height, width))


def noisy_spec(channels: int, height: int, width: int) -> TensorSpec:
    return TensorSpec("noisy", "float32", (channels, height, width))


def split_latent(latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of stored latents (..., 2*C, h, w); a latent is then ``mean + std * noise``."""
    c = latent.shape[-3] // 2
    return latent[..., :c, :, :], latent[..., c:, :, :]


def tensor_field(spec: TensorSpec) -> pa.Field:
    """The Arrow field of a tensor column: fixed-shape tensor type, the spec in the field metadata."""
    typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(spec.storage_dtype), list(spec.shape))
    return pa.field(spec.name, typ, metadata={TENSOR_KEY: spec.to_json()})


def specs_of(schema: pa.Schema) -> dict[str, TensorSpec]:
    """The tensor specs of an Arrow (or Parquet-read) schema: from the field metadata, or else from a
    fixed-shape tensor type alone."""
    out = {}
    for f in schema:
        meta = f.metadata or {}
        if TENSOR_KEY in meta:
            out[f.name] = TensorSpec.from_json(f.name, meta[TENSOR_KEY])
        elif isinstance(f.type, pa.FixedShapeTensorType):
            out[f.name] = TensorSpec(f.name, np.dtype(f.type.value_type.to_pandas_dtype()).name, tuple(f.type.shape))
    return out


def _as_specs(specs: Mapping[str, TensorSpec] | Iterable[TensorSpec]) -> dict[str, TensorSpec]:
    items = specs.values() if isinstance(specs, Mapping) else specs
    out = {}
    for s in items:
        if not isinstance(s, TensorSpec):
            raise TypeError(f"expected TensorSpec, got {type(s).__name__}")
        out[s.name] = s
    return out


def with_tensors(schema: pa.Schema, specs: Mapping[str, TensorSpec] | Iterable[TensorSpec]) -> pa.Schema:
    """``schema`` with the tensor fields replaced in place, or appended; its own metadata kept."""
    fields = list(schema)
    names = [f.name for f in fields]
    for spec in _as_specs(specs).values():
        f = tensor_field(spec)
        if spec.name in names:
            fields[names.index(spec.name)] = f
        else:
            fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def _plural(k: int, noun: str) -> str:
    """``k`` and a noun phrase about values: "1 NaN value", "3 NaN values", "2 values beyond ..."."""
    return f"{k} {noun}" if k == 1 else f"{k} {noun.replace('value', 'values', 1)}"


def _shape_problem(shape: tuple[int, ...], spec: TensorSpec) -> str:
    if len(shape) == 1 and len(spec.shape) > 1:
        return f"{shape[0]} elements, schema says {spec.shape} ({spec.size} elements)"
    return f"shape {shape}, schema says {spec.shape}"


def _dtype_problem(dtype: np.dtype, spec: TensorSpec) -> str | None:
    if dtype.kind == "O":
        return "values are not all numbers (dtype object: None or objects inside)"
    if dtype.kind not in "biuf":
        return f"dtype {dtype} is not a real number type"
    if np.dtype(spec.dtype).kind != "f" and dtype.kind == "f":
        return f"dtype {dtype}, schema says {spec.dtype} (floats are not rounded into {spec.dtype})"
    return None


def _encode(values: np.ndarray, spec: TensorSpec) -> pa.Array:
    flat = np.ascontiguousarray(values, dtype=spec.storage_dtype).reshape(-1)
    storage_arr = pa.FixedSizeListArray.from_arrays(pa.array(flat), spec.size)
    return pa.ExtensionArray.from_storage(tensor_field(spec).type, storage_arr)


def _fixed_layout(col: pa.Array) -> tuple[tuple[int, ...], bool, pa.Array] | None:
    """(shape per row, whether the type states it, leaf values of every slot, null rows' included) of a
    fixed-shape tensor or (nested) fixed-size list column; None for any other layout."""
    shape: tuple[int, ...] | None = None
    if isinstance(col.type, pa.FixedShapeTensorType):
        perm = col.type.permutation
        if perm is not None and list(perm) != sorted(perm):
            return None
        shape = tuple(col.type.shape)
        col = col.storage
    if not pa.types.is_fixed_size_list(col.type):
        return None
    dims = []
    while pa.types.is_fixed_size_list(col.type):
        size = col.type.list_size
        dims.append(size)
        col = col.values.slice(col.offset * size, len(col) * size)
    return (shape if shape is not None else tuple(dims)), shape is not None, col


def _row_values(values: list, spec: TensorSpec) -> tuple[np.ndarray, list[str | None]]:
    """Rows given one by one (dicts, variable lists, other extension types): each checked alone."""
    n = len(values)
    reasons: list[str | None] = [None] * n
    good: dict[int, np.ndarray] = {}
    for i, v in enumerate(values):
        if v is None:
            reasons[i] = "missing"
            continue
        try:
            a = np.asarray(v)
        except (ValueError, TypeError) as e:
            reasons[i] = f"not a tensor ({type(e).__name__}: {e})"
            continue
        problem = _dtype_problem(a.dtype, spec)
        if problem is None and a.shape != spec.shape:
            if a.ndim == 1 and a.size == spec.size:  # flat storage of a row-major tensor
                a = a.reshape(spec.shape)
            else:
                problem = _shape_problem(a.shape, spec)
        if problem:
            reasons[i] = problem
        else:
            good[i] = a
    dtype = np.result_type(*{a.dtype for a in good.values()}) if good else np.dtype(spec.dtype)
    x = np.zeros((n, *spec.shape), dtype=dtype)
    for i, a in good.items():
        x[i] = a
    return x, reasons


def _decode(col: Any, spec: TensorSpec) -> tuple[np.ndarray | None, list[str | None]]:
    """The column's values as (N, *spec.shape) in their own dtype (None if no row can be read), and
    per row the problem found, if any (rows with a problem hold zeros)."""
    if not isinstance(col, (pa.Array, pa.ChunkedArray)):
        return _row_values(list(col), spec)
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    n = len(col)
    layout = _fixed_layout(col)
    if layout is None:
        if isinstance(col, pa.ExtensionArray):
            try:  # other tensor extension types (Ray's own) convert themselves
                return _row_values(list(col.to_numpy(zero_copy_only=False)), spec)
            except (pa.ArrowException, TypeError, ValueError, NotImplementedError):
                col = col.storage
        return _row_values(col.to_pylist(), spec)
    shape, explicit, leaf = layout
    missing = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(n, bool)
    reasons: list[str | None] = ["missing" if m else None for m in missing]
    if shape != spec.shape and (explicit or shape != (spec.size,)):  # a plain list may be flat storage
        return None, [r or _shape_problem(shape, spec) for r in reasons]
    if not (pa.types.is_integer(leaf.type) or pa.types.is_floating(leaf.type) or pa.types.is_boolean(leaf.type)):
        return None, [r or f"values of type {leaf.type} are not numeric" for r in reasons]
    if leaf.null_count:
        nulls = leaf.is_null().to_numpy(zero_copy_only=False).reshape(n, spec.size).sum(1)
        reasons = [r or (_plural(int(k), "missing value") if k else None) for r, k in zip(reasons, nulls)]
        leaf = leaf.fill_null(0)
    return leaf.to_numpy(zero_copy_only=False).reshape((n, *spec.shape)), reasons


def _check(x: np.ndarray | None, spec: TensorSpec) -> tuple[np.ndarray | None, list[str | None]]:
    """``x`` cast to the spec's dtype and, per row, the values refused (NaN, infinite, out of range)."""
    if x is None:
        return None, []
    n = len(x)
    problem = _dtype_problem(x.dtype, spec)
    if problem:
        return np.zeros((n, *spec.shape), spec.dtype), [problem] * n
    flat = x.reshape(n, spec.size)
    target = np.dtype(spec.dtype)
    found: list[list[str]] = [[] for _ in range(n)]

    def note(counts: np.ndarray, noun: str) -> None:
        for i in np.flatnonzero(counts):
            found[i].append(_plural(int(counts[i]), noun))

    if target.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            y = flat.astype(target)
        if flat.dtype.kind == "f":
            nan, inf = np.isnan(flat).sum(1), np.isinf(flat).sum(1)
            note(nan, "NaN value")
            note(inf, "infinite value")
        else:
            inf = 0
        note(np.isinf(y).sum(1) - inf, f"value beyond the {target} range")
    elif target.kind in "iu":
        if flat.dtype.kind != "b":
            info = np.iinfo(target)
            note(((flat < info.min) | (flat > info.max)).sum(1), f"value outside the {target} range")
        y = flat.astype(target)
    else:  # bool
        if flat.dtype.kind != "b":
            note(((flat != 0) & (flat != 1)).sum(1), "value other than 0 and 1")
        y = flat != 0
    return y.reshape((n, *spec.shape)), [", ".join(f) or None for f in found]


def to_arrow(spec: TensorSpec, array: Any) -> pa.Array:
    """An (N, *shape) array as a tensor column; raises ValueError where :func:`validate` would refuse a row."""
    x = np.asarray(array)
    if x.ndim < 1 or x.shape[1:] != spec.shape:
        raise ValueError(f"tensor {spec.name!r}: array of shape {x.shape}, schema says (N, *{spec.shape})")
    y, reasons = _check(x, spec)
    bad = [r for r in reasons if r]
    if bad:
        raise ValueError(f"tensor {spec.name!r}: {len(bad)} of {len(x)} rows refused (first: {bad[0]})")
    return _encode(y, spec)


def to_numpy(column: pa.Array | pa.ChunkedArray, spec: TensorSpec) -> np.ndarray:
    """A tensor column as one (N, *shape) array of the spec's dtype; raises ValueError on a missing row,
    another shape or a dtype the spec does not take (no NaN check: that is :func:`validate`'s)."""
    x, reasons = _decode(column, spec)
    bad = [r for r in reasons if r]
    if bad:
        raise ValueError(f"column {spec.name!r}: {len(bad)} of {len(reasons)} rows unreadable (first: {bad[0]})")
    problem = _dtype_problem(x.dtype, spec)
    if problem:
        raise ValueError(f"column {spec.name!r}: {problem}")
    return x != 0 if spec.dtype == "bool" else x.astype(spec.dtype, copy=False)


def validate(
    data: pa.Table | pa.RecordBatch | Iterable[Mapping[str, Any]],
    specs: Mapping[str, TensorSpec] | Iterable[TensorSpec],
    schema: pa.Schema | None = None,
    where: str = "",
) -> tuple[pa.Table, pa.Table]:
    """Split rows (a table, or dicts whose tensors are arrays) into (good, bad).

    good: the good rows, the tensor columns encoded by their specs (schema: ``schema``, or the data's
    own, :func:`with_tensors`); bad: QUARANTINE_SCHEMA rows (id, source, locator ``WHERE#row=I``, stage
    "schema", reason naming each column and problem, image bytes if the row had any). A tensor column
    absent from a table is a ValueError (a whole-table fault); absent from a dict, a quarantined row."""
    specs = _as_specs(specs)
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        absent = [name for name in specs if name not in data.column_names]
        if absent:
            raise ValueError(
                f"{where or 'table'}: no column {', '.join(map(repr, absent))} (tensor specs: {list(specs)})"
            )
        n = data.num_rows
        cols: dict[str, Any] = {name: data.column(name) for name in specs}
        base = data.drop_columns(list(specs))
        out_schema = with_tensors(schema if schema is not None else data.schema, specs)
        base_schema = pa.schema([f for f in out_schema if f.name not in specs])
        base = base.select(base_schema.names).cast(base_schema)
    else:
        rows = list(data)
        n = len(rows)
        cols = {name: [r.get(name) for r in rows] for name in specs}
        base_rows = [{k: v for k, v in r.items() if k not in specs} for r in rows]
        if schema is not None:
            base = pa.Table.from_pylist(base_rows, schema=pa.schema([f for f in schema if f.name not in specs]))
        else:
            base = pa.Table.from_pylist(base_rows)
        out_schema = with_tensors(schema if schema is not None else base.schema, specs)

    reasons: list[list[str]] = [[] for _ in range(n)]
    values = {}
    for name, spec in specs.items():
        x, decode_reasons = _decode(cols[name], spec)
        y, check_reasons = _check(x, spec)
        for i, r in enumerate(decode_reasons):
            r = r or (check_reasons[i] if check_reasons else None)
            if r:
                reasons[i].append(f"column {name!r}: {r}")
        values[name] = y

    ok = np.array([not r for r in reasons], dtype=bool)
    good_idx, bad_idx = np.flatnonzero(ok), np.flatnonzero(~ok)
    good_base = base.take(pa.array(good_idx, pa.int64()))
    arrays = []
    for f in out_schema:
        if f.name in specs:
            y = values[f.name]
            arrays.append(_encode(y[good_idx] if y is not None else np.zeros((0, *specs[f.name].shape)), specs[f.name]))
        else:
            arrays.append(good_base.column(f.name))
    good = pa.Table.from_arrays(arrays, schema=out_schema)

    bad_base = base.take(pa.array(bad_idx, pa.int64()))

    def col(name: str) -> list:
        return bad_base.column(name).to_pylist() if name in bad_base.column_names else [None] * len(bad_idx)

    ids, sources, images = col("id"), col("source"), col("image")
    bad = pa.Table.from_pylist(
        [
            {
                "id": None if ids[k] is None else str(ids[k]),
                "source": sources[k] if isinstance(sources[k], str) else "",
                "locator": f"{where}#row={i}" if where else f"row={i}",
                "stage": STAGE,
                "reason": "; ".join(reasons[i]),
                "image": images[k] if isinstance(images[k], bytes) else None,
            }
            for k, i in enumerate(bad_idx.tolist())
        ],
        schema=QUARANTINE_SCHEMA,
    )
    if good.num_rows + bad.num_rows != n:
        raise RuntimeError(f"row count mismatch: {n} in, {good.num_rows} out, {bad.num_rows} quarantined")
    return good, bad


def write_table(
    uri: str,
    data: pa.Table | Iterable[Mapping[str, Any]],
    specs: Mapping[str, TensorSpec] | Iterable[TensorSpec],
    quarantine_uri: str | None = None,
    schema: pa.Schema | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Validate ``data`` and write its good rows as one Parquet file at ``uri`` (always, even if empty)
    and its bad rows at ``quarantine_uri`` (if any; without a ``quarantine_uri`` bad rows are a
    ValueError, never dropped). Returns (good, bad) as :func:`validate`."""
    good, bad = validate(data, specs, schema=schema, where=uri)
    if bad.num_rows:
        if quarantine_uri is None:
            first = bad.column("reason")[0].as_py()
            raise ValueError(f"{uri}: {bad.num_rows} rows fail the schema (first: {first}); give a quarantine_uri")
        storage.write_parquet(quarantine_uri, bad)
    storage.write_parquet(uri, good)
    return good, bad


def read_table(
    uri: str, specs: Mapping[str, TensorSpec] | Iterable[TensorSpec] | None = None
) -> tuple[pa.Table, pa.Table]:
    """Read a Parquet file (or every ``.parquet`` file under a folder) and validate it against
    ``specs``, by default each file's own (:func:`specs_of`). Returns (good, bad) as :func:`validate`."""
    files = storage.list_files(uri, suffixes=(".parquet",)) if storage.is_dir(uri) else [storage.normalize(uri)]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    goods, bads = [], []
    for f in files:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(f)))
        good, bad = validate(table, specs_of(table.schema) if specs is None else specs, where=f)
        goods.append(good)
        bads.append(bad)
    return pa.concat_tables(goods), pa.concat_tables(bads)
