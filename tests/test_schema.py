"""Tensor columns (ambient_ray.data.schema): every standard kind round-trips bit for bit through Parquet,
locally, on S3 and through Ray Data, with dtype and shape restored from the file alone; rows with NaN,
infinite, out-of-range, wrong-shape, wrong-dtype or missing tensors are quarantined with their reasons,
on write and on read, and rows in = rows out + rows quarantined."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ambient_ray.data import schema as S
from ambient_ray.io import storage

N = 6
SPECS = {
    "latent": S.latent_spec(2, 4, 4),  # float32 (4, 4, 4): mean then std
    "caption_emb": S.caption_specs(5, 8)[0],  # float16 (5, 8)
    "caption_mask": S.caption_specs(5, 8)[1],  # bool (5,)
    "caption_mask_u8": S.TensorSpec("caption_mask_u8", "uint8", (5,)),
    "mask": S.mask_spec(4, 4),  # uint8 (1, 4, 4)
    "mask_bool": S.TensorSpec("mask_bool", "bool", (1, 4, 4)),
    "noisy": S.noisy_spec(3, 4, 4),  # float32 (3, 4, 4)
}


def _values(spec: S.TensorSpec, n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, *spec.shape)
    if spec.dtype == "bool":
        return rng.random(shape) < 0.5
    if spec.dtype == "uint8":
        return rng.integers(0, 2, shape, dtype=np.uint8)
    x = rng.standard_normal(shape).astype(spec.dtype)
    if spec.name == "noisy":  # y = x + sigma_n z: far outside [-1, 1], tiny and subnormal values too
        x.reshape(n, -1)[:, :4] = [37.5, -1234.25, 1e-40, -3.0e-7]
    return x


def _table(specs: dict[str, S.TensorSpec], n: int = N) -> tuple[list[dict], dict[str, np.ndarray]]:
    arrays = {name: _values(spec, n, seed=k) for k, (name, spec) in enumerate(specs.items())}
    rows = [{"id": f"r{i}", "label": i, **{name: a[i] for name, a in arrays.items()}} for i in range(n)]
    return rows, arrays


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _check_round_trip(uri: str, specs: dict[str, S.TensorSpec], arrays: dict[str, np.ndarray]) -> None:
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    assert S.specs_of(table.schema) == specs  # from the file's metadata alone
    for name, spec in specs.items():
        assert isinstance(table.schema.field(name).type, pa.FixedShapeTensorType)
        assert _bits_equal(S.to_numpy(table.column(name), spec), arrays[name]), name
    good, bad = S.read_table(uri)
    assert good.num_rows == N and bad.num_rows == 0
    assert good.column("id").to_pylist() == [f"r{i}" for i in range(N)]


def test_specs_are_normalised_and_standard_names_checked():
    s = S.TensorSpec("emb", np.float16, [77, 1024])
    assert (s.dtype, s.shape, s.size) == ("float16", (77, 1024), 77 * 1024)
    assert S.TensorSpec.from_json("emb", s.to_json()) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dtype = "float32"
    assert S.latent_spec(4, 32, 32).shape == (8, 32, 32)
    for bad, match in [
        (("latent", "float16", (8, 4, 4)), "float32"),
        (("latent", "float32", (3, 4, 4)), "mean and std"),
        (("caption_emb", "float16", (77,)), "2 dimensions"),
        (("mask", "uint8", (3, 4, 4)), r"\(1, H, W\)"),
        (("x", "complex64", (2,)), "not one of"),
        (("x", "float32", (2, 0)), "positive"),
        (("x", "float32", ()), "positive"),
        (("x", "nope", (2,)), "unknown dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            S.TensorSpec(*bad)


def test_split_latent_and_with_tensors():
    lat = np.arange(2 * 8 * 2 * 2, dtype=np.float32).reshape(2, 8, 2, 2)
    mean, std = S.split_latent(lat)
    assert mean.shape == std.shape == (2, 4, 2, 2) and mean[0, 0, 0, 0] == 0 and std[0, 0, 0, 0] == 16
    schema = S.with_tensors(S.DATA_SCHEMA, [SPECS["latent"]])
    assert schema.names == [*S.DATA_SCHEMA.names, "latent"]
    replaced = S.with_tensors(schema, [S.latent_spec(1, 4, 4)])
    assert replaced.names == schema.names and S.specs_of(replaced)["latent"].shape == (2, 4, 4)
    assert S.specs_of(S.DATA_SCHEMA) == {}


def test_corrupt_keeps_its_schema_names():
    from ambient_ray.stages import corrupt

    assert corrupt.DATA_SCHEMA is S.DATA_SCHEMA and corrupt.QUARANTINE_SCHEMA is S.QUARANTINE_SCHEMA


@pytest.mark.parametrize("name", list(SPECS))
def test_each_kind_round_trips_through_local_parquet(tmp_path, name):
    specs = {name: SPECS[name]}
    rows, arrays = _table(specs)
    good, bad = S.write_table(str(tmp_path / "t.parquet"), rows, specs.values())
    assert good.num_rows == N and bad.num_rows == 0
    _check_round_trip(str(tmp_path / "t.parquet"), specs, arrays)


def test_a_table_with_every_kind_round_trips_on_s3(s3_prefix):
    rows, arrays = _table(SPECS)
    uri = storage.join(s3_prefix, "data", "shard-00000.parquet")
    S.write_table(uri, rows, SPECS, quarantine_uri=storage.join(s3_prefix, "quarantine", "shard-00000.parquet"))
    assert not storage.exists(storage.join(s3_prefix, "quarantine", "shard-00000.parquet"))
    _check_round_trip(uri, SPECS, arrays)
    good, _ = S.read_table(storage.join(s3_prefix, "data"))  # a folder of shards
    assert good.num_rows == N


def test_ray_data_gives_shaped_numpy_batches(ray_cluster, s3_prefix):
    import ray.data

    specs = {k: SPECS[k] for k in ("latent", "caption_emb", "caption_mask", "noisy")}
    rows, arrays = _table(specs)
    for k, part in enumerate((rows[:4], rows[4:])):  # two files, so a batch spans blocks
        S.write_table(storage.join(s3_prefix, f"shard-{k:05d}.parquet"), part, specs)
    fs, path = storage.filesystem(s3_prefix)
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    batches = list(ds.iter_batches(batch_format="numpy", batch_size=5))
    got = {k: np.concatenate([b[k] for b in batches]) for k in [*specs, "id"]}
    order = np.argsort(got["id"])
    for name, spec in specs.items():
        want = arrays[name].astype(spec.storage_dtype)  # bool arrives as uint8 0/1
        assert _bits_equal(got[name][order], want), name
    assert S.specs_of(ds.schema().base_schema) == specs


def _planted_rows() -> tuple[list[dict], dict[str, str]]:
    specs = {k: SPECS[k] for k in ("latent", "caption_emb", "mask", "caption_mask")}
    rows, _ = _table(specs, n=12)
    for r in rows:
        r["image"] = f"png-{r['id']}".encode()
        r["source"] = "src"
    rows[1]["latent"][0, 0, :3] = np.nan
    rows[2]["latent"][1, 2, 3] = np.inf
    rows[2]["caption_emb"][0, 0] = -np.inf
    rows[3]["caption_emb"] = np.zeros((5, 4), np.float16)
    rows[4]["mask"] = rows[4]["mask"].astype(np.float32)
    rows[5]["caption_emb"] = rows[5]["caption_emb"].astype(np.float32) * 0 + 1e6  # beyond float16
    rows[6]["mask"] = np.full((1, 4, 4), 300, np.int64)
    rows[7]["latent"] = "not a tensor"
    rows[8]["caption_mask"] = None
    rows[9]["caption_mask"] = np.array([0, 1, 2, 1, 0])
    rows[10]["latent"] = rows[10]["latent"].astype(np.float64)  # cast to float32: kept
    rows[11]["caption_mask"] = np.array([0, 1, 1, 0, 1])  # 0/1 integers for bool: kept
    reasons = {
        "r1": "column 'latent': 3 NaN values",
        "r2": "column 'latent': 1 infinite value; column 'caption_emb': 1 infinite value",
        "r3": "column 'caption_emb': shape (5, 4), schema says (5, 8)",
        "r4": "column 'mask': dtype float32, schema says uint8 (floats are not rounded into uint8)",
        "r5": "column 'caption_emb': 40 values beyond the float16 range",
        "r6": "column 'mask': 16 values outside the uint8 range",
        "r7": "column 'latent': dtype <U12 is not a real number type",
        "r8": "column 'caption_mask': missing",
        "r9": "column 'caption_mask': 1 value other than 0 and 1",
    }
    return rows, reasons


def test_planted_rows_are_quarantined_on_write(tmp_path):
    rows, reasons = _planted_rows()
    specs = {k: SPECS[k] for k in ("latent", "caption_emb", "mask", "caption_mask")}
    data, quarantine = str(tmp_path / "data.parquet"), str(tmp_path / "quarantine.parquet")
    with pytest.raises(ValueError, match="9 rows fail the schema .*quarantine_uri"):
        S.write_table(data, rows, specs)
    assert not storage.exists(data)
    good, bad = S.write_table(data, rows, specs, quarantine_uri=quarantine)
    assert good.num_rows + bad.num_rows == len(rows) and bad.num_rows == len(reasons)
    q = pq.read_table(quarantine)
    assert q.schema.equals(S.QUARANTINE_SCHEMA)
    assert dict(zip(q.column("id").to_pylist(), q.column("reason").to_pylist())) == reasons
    assert set(q.column("stage").to_pylist()) == {"schema"} and set(q.column("source").to_pylist()) == {"src"}
    assert q.column("image").to_pylist()[0] == b"png-r1"  # nothing lost
    assert q.column("locator").to_pylist()[0] == f"{data}#row=1"
    kept, none_bad = S.read_table(data)
    assert kept.column("id").to_pylist() == ["r0", "r10", "r11"] and none_bad.num_rows == 0
    assert _bits_equal(S.to_numpy(kept.column("latent"), specs["latent"])[1], rows[10]["latent"].astype(np.float32))
    assert S.to_numpy(kept.column("caption_mask"), specs["caption_mask"])[2].tolist() == [
        False,
        True,
        True,
        False,
        True,
    ]
    assert kept.column("label").to_pylist() == [0, 10, 11]


def test_a_bad_file_written_directly_is_quarantined_on_read(tmp_path):
    spec = S.TensorSpec("latent", "float32", (2, 2, 2))
    meta = {S.TENSOR_KEY: spec.to_json()}
    vals = [
        [float(i) for i in range(8)],  # good, flat storage of (2, 2, 2)
        [1.0, float("nan"), 2.0, 3.0, 4.0, 5.0, 6.0, float("nan")],
        [float("inf")] + [0.0] * 7,
        [0.0] * 7,  # 7 elements
        None,
        [0.0, None] + [0.0] * 6,
    ]
    field = pa.field("latent", pa.list_(pa.float64()), metadata=meta)  # float64 values: cast to float32
    emb = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((6, 5, 4), np.float16))
    emb_field = pa.field("caption_emb", emb.type, metadata={S.TENSOR_KEY: SPECS["caption_emb"].to_json()})
    table = pa.Table.from_arrays(
        [pa.array([f"r{i}" for i in range(6)]), pa.array(vals, field.type), emb],
        schema=pa.schema([pa.field("id", pa.string()), field, emb_field]),
    )
    pq.write_table(table.select(["id", "latent"]), tmp_path / "a.parquet")
    good, bad = S.read_table(str(tmp_path / "a.parquet"))
    assert good.num_rows + bad.num_rows == 6 and good.column("id").to_pylist() == ["r0"]
    assert (
        S.to_numpy(good.column("latent"), spec).tolist() == np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2).tolist()
    )
    assert bad.column("reason").to_pylist() == [
        "column 'latent': 2 NaN values",
        "column 'latent': 1 infinite value",
        "column 'latent': 7 elements, schema says (2, 2, 2) (8 elements)",
        "column 'latent': missing",
        "column 'latent': values are not all numbers (dtype object: None or objects inside)",
    ]
    # a fixed-shape column whose type disagrees with its metadata: every row refused, none dropped
    pq.write_table(table.select(["id", "caption_emb"]), tmp_path / "b.parquet")
    good, bad = S.read_table(str(tmp_path / "b.parquet"))
    assert good.num_rows == 0 and bad.num_rows == 6
    assert set(bad.column("reason").to_pylist()) == {"column 'caption_emb': shape (5, 4), schema says (5, 8)"}


def test_table_columns_of_the_wrong_kind_are_refused_row_by_row():
    mask = SPECS["mask"]
    floats = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((3, 1, 4, 4), np.float32))
    strings = pa.array([["a"] * 16] * 3, pa.list_(pa.string(), 16))
    for col, reason in [
        (floats, "dtype float32, schema says uint8 (floats are not rounded into uint8)"),
        (strings, "values of type string are not numeric"),
    ]:
        good, bad = S.validate(pa.table({"id": ["a", "b", "c"], "mask": col}), [mask])
        assert good.num_rows == 0 and bad.column("reason").to_pylist() == [f"column 'mask': {reason}"] * 3
    with pytest.raises(ValueError, match="no column 'mask'"):
        S.validate(pa.table({"id": ["a"]}), [mask])


def test_to_arrow_and_to_numpy_refuse_what_validate_would():
    spec = SPECS["noisy"]
    x = _values(spec, 2)
    col = S.to_arrow(spec, x.astype(np.float64))
    assert _bits_equal(S.to_numpy(pa.chunked_array([col[:1], col[1:]]), spec), x)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5\)"):
        S.to_arrow(spec, np.zeros((2, 3, 4, 5), np.float32))
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 2 rows refused .*1 NaN value"):
        S.to_arrow(spec, x)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4\), schema says \(3, 4, 2\)"):
        S.to_numpy(col, S.TensorSpec("noisy", "float32", (3, 4, 2)))
