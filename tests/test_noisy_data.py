"""Noisy data is data (Denoising Score Distillation): ``noise:sigma=`` writes an unclipped, unquantised ``noisy``
column and ``sigma_n`` for every row of its dataset, users bring their own noisy data (Parquet, a folder of
``.npy`` arrays), bad noisy rows are quarantined with the reason, and :func:`ambient_ray.data.noisy.noisy_of` reads
the column back."""

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ambient_ray import corruptions as C
from ambient_ray.config import ConfigError, DataError
from ambient_ray.data import schema
from ambient_ray.data.images import decode_png
from ambient_ray.data.masks import masks_of
from ambient_ray.data.noisy import check_noisy, check_sigma_n, from_image, noisy_of, noisy_shape, preview
from ambient_ray.data.sources import SourceConfig, _builtin_arrays, make_source
from ambient_ray.io import storage
from ambient_ray.stages.corrupt import CorruptConfig, process_shard, run


def table_of(out):
    tables = []
    for f in storage.list_files(storage.join(out, "data"), (".parquet",)):
        fs, path = storage.filesystem(f)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


def quarantined(out):
    q = storage.join(out, "quarantine")
    rows = []
    for f in storage.list_files(q, (".parquet",)) if storage.exists(q) else []:
        fs, path = storage.filesystem(f)
        rows.extend(pq.read_table(path, filesystem=fs).to_pylist())
    return {r["id"]: r["reason"] for r in rows}


def noisy_by_id(t):
    spec = schema.specs_of(t.schema)["noisy"]
    y = schema.to_numpy(t.column("noisy"), spec)
    return {rid: (r, y[k]) for k, (rid, r) in enumerate(zip(t.column("id").to_pylist(), t.to_pylist()))}


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ------------------------------------------------------------------------------ the corruption, unit


def test_noise_outcome_keeps_the_unclipped_data_and_sigma_n():
    x = np.full((4, 16, 16, 1), 0.9, np.float32)
    o = C.parse("noise:sigma=0.5").outcome(x, [np.random.default_rng(i) for i in range(4)])
    assert o.mask is None and o.sigma_n.tolist() == [0.5] * 4
    assert o.noisy.dtype == np.float32 and o.noisy.max() > 1.0 and o.noisy.min() < 0.0  # unclipped (0.9 -> 0.8)
    np.testing.assert_allclose(o.image, np.clip((o.noisy + 1) / 2, 0, 1), atol=1e-6)  # the image: y clipped
    assert (o.image <= 1).all()
    # the image is the one a noise corruption always made (same seed, same bytes)
    img = C.parse("noise:sigma=0.5")(x, [np.random.default_rng(i) for i in range(4)])
    assert img.tobytes() == o.image.tobytes()
    assert C.parse("noise:sigma=0.1").noisy and not C.parse("blur:sigma=1").noisy
    assert C.apply_all(C.parse("blur:sigma=1"), [np.zeros((4, 4, 1), np.uint8)], [0]).noisy == [None]
    with pytest.raises(ValueError, match="masks=True and noisy=True"):
        C.register("both_test", masks=True, noisy=True)

    @C.register("bad_sigma_test", noisy=True)
    def _bad(x, rngs):
        return x, -1.0

    with pytest.raises(ValueError, match="finite and >= 0"):
        C.parse("bad_sigma_test").outcome(x, [np.random.default_rng(0)] * 4)


def test_check_noisy_and_sigma_n():
    y, problem = check_noisy(np.zeros((8, 8), np.float64))
    assert problem is None and y.shape == (1, 8, 8) and y.dtype == np.float32
    assert "store it channels first" in check_noisy(np.zeros((8, 8, 3), np.float32))[1]
    assert check_noisy(np.array([[[0.0, np.nan, np.inf]]]))[1] == "1 NaN value, 1 infinite value"
    assert "dtype int64" in check_noisy(np.zeros((1, 2, 2), np.int64))[1]
    assert "beyond the float32 range" in check_noisy(np.full((1, 1, 1), 1e300))[1]
    assert check_sigma_n(0.2) == (0.2, None) and check_sigma_n(0) == (0.0, None)
    assert [check_sigma_n(v)[1] for v in (None, float("nan"), -0.1, "x")] == [
        "missing",
        "NaN",
        "-0.1 is negative",
        "'x' is not a number",
    ]
    img = np.array([[[0], [255]], [[128], [3]]], np.uint8)
    assert (preview(from_image(img)) == img).all()  # a clean row's floats round-trip to its image


# ------------------------------------------------------------------------------ the corrupt stage


def test_noise_writes_unclipped_unquantised_noisy_data(ray_cluster, tmp_path):
    cfg = CorruptConfig(
        out=str(tmp_path / "noisy"),
        source=SourceConfig(dataset="digits", limit=240),
        corruptions=["noise:sigma=0.2", "blur:sigma=1", "mask:p=0.5"],
        clean_fraction=0.25,
        shard_size=120,
        preview=0,
    )
    res = run(cfg, progress=False)
    assert (res.rows_in, res.rows_out, res.rows_quarantined) == (240, 240, 0)
    t = table_of(res.out)
    assert schema.specs_of(t.schema)["noisy"] == schema.noisy_spec(1, 8, 8)
    assert t.schema.field("sigma_n").type == pa.float64() and "mask" in t.column_names
    rows = noisy_by_id(t)
    kinds = Counter((r["quality"], r["corruption"]) for r, _ in rows.values())
    assert kinds == {("clean", ""): 60, ("corrupted", "noise:sigma=0.2"): 60, ("corrupted", "blur:sigma=1"): 60,
                     ("corrupted", "mask:p=0.5"): 60}  # fmt: skip
    digits, _ = _builtin_arrays("digits", 1, 4)
    diffs = []
    for rid, (r, y) in rows.items():
        img = decode_png(r["image"])
        if r["corruption"] != "noise:sigma=0.2":  # every other row holds its own image as floats, σ_n 0
            assert r["sigma_n"] == 0.0
            np.testing.assert_allclose(y, img.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
            continue
        assert r["sigma_n"] == 0.2
        x01 = digits[int(rid.split("-")[1])].astype(np.float32) / 255.0
        diffs.append(y - (2 * x01 - 1).transpose(2, 0, 1))
        assert (preview(y) == img).all()  # the PNG is y clipped and quantised: a preview
        again = C.apply_all(C.parse("noise:sigma=0.2"), [digits[int(rid.split("-")[1])]], [r["seed"]])
        assert (again.noisy[0] == y).all() and (again.images[0] == img).all()  # the row's seed alone decides
    d = np.concatenate(diffs).ravel()
    assert d.size == 60 * 64
    # 3,840 draws of σ_n·z: the mean's standard error is 0.2/62 = 0.0032, the std's 0.2/88 = 0.0023 (5 of each)
    assert abs(d.mean()) < 0.016 and d.std() == pytest.approx(0.2, abs=0.012)
    ys = np.stack([y for r, y in rows.values() if r["sigma_n"] > 0])
    assert (ys < -1).mean() > 0.2 and (ys > 1).any()  # not clipped: the digits' many 0 pixels go below -1
    off_grid = np.abs(d * 127.5 - np.round(d * 127.5)) > 0.01
    assert off_grid.mean() > 0.9  # not quantised: a uint8 image's differences are multiples of 1/127.5
    # the mask rows: hidden pixels 0 in the image, -1 in the floats
    for (r, y), m in zip(rows.values(), masks_of(t)[:, 0]):
        if r["corruption"] == "mask:p=0.5":
            assert (y[0][m == 0] == -1).all()

    # noisy_of reads them back: all rows in shard order, or the ids asked for, in their order
    ids, y_all, s_all = noisy_of(res.out)
    assert ids == t.column("id").to_pylist() and y_all.shape == (240, 1, 8, 8) and y_all.dtype == np.float32
    assert all((y_all[k] == rows[rid][1]).all() and s_all[k] == rows[rid][0]["sigma_n"] for k, rid in enumerate(ids))
    pick = [ids[5], ids[0], ids[200]]
    got_ids, y3, s3 = noisy_of(res.out, ids=pick)
    assert got_ids == pick and (y3 == y_all[[5, 0, 200]]).all() and (s3 == s_all[[5, 0, 200]]).all()
    assert noisy_shape(res.out) == (1, 8, 8)
    with pytest.raises(KeyError, match="not-there"):
        noisy_of(res.out, ids=["not-there"])


def test_data_without_noise_has_no_noisy_column(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": [png(np.zeros((4, 4), np.uint8))]}), plain)
    assert noisy_shape(str(plain)) is None
    with pytest.raises(DataError, match="has no 'noisy' column"):
        noisy_of(str(plain))


def test_noise_on_rows_with_their_own_masks(tmp_path):
    """process_shard as a plain function (no Ray): noise on an image whose own mask hides pixels."""
    root = str(tmp_path / "imgs")
    img = np.random.default_rng(0).integers(1, 256, (8, 8), dtype=np.uint8)
    m = np.ones((8, 8), np.uint8)
    m[:, :3] = 0
    storage.write_bytes(storage.join(root, "a.png"), png(img))
    storage.write_bytes(storage.join(root, "a.mask.png"), png(m * 255))
    src_cfg = SourceConfig(dataset=root)
    source = make_source(src_cfg)
    items = source.list_items()
    payload = {"ids": ["a.png"], "locs": [items[0][1]], "roles": ["c0"], "seeds": [7]}
    batch = {"shard": np.array([0]), "payload": np.array([json.dumps(payload)])}
    out = str(tmp_path / "out")
    spec = C.parse("noise:sigma=0.3")
    process_shard(batch, source=source, source_cfg=src_cfg, specs=[spec], out=out, mask_hw=(8, 8), noisy_chw=(1, 8, 8))
    t = table_of(out)
    (r, y), = noisy_by_id(t).values()  # fmt: skip
    assert (r["corruption"], r["sigma_n"]) == ("noise:sigma=0.3+user_mask", 0.3)
    assert (masks_of(t)[0, 0] == m).all()
    assert (y[0][m == 0] == -1).all() and (decode_png(r["image"])[..., 0][m == 0] == 0).all()
    expect = C.apply_all(spec, [img[..., None]], [7]).noisy[0][0]
    assert (y[0][m == 1] == expect[m == 1]).all()  # observed pixels: the noisy data, unclipped


# ------------------------------------------------------------------------------ users' noisy data


def tensor_column(values):
    """A float32 fixed-shape tensor column (1, 8, 8) that may hold NaN and inf (schema.to_arrow refuses them)."""
    flat = pa.array(np.asarray(values, np.float32).ravel())
    storage_arr = pa.FixedSizeListArray.from_arrays(flat, 64)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [1, 8, 8]), storage_arr)


def users_parquet(uri):
    rng = np.random.default_rng(3)
    y = (rng.uniform(-1, 1, (6, 1, 8, 8)) + 0.1 * rng.standard_normal((6, 1, 8, 8))).astype(np.float32)
    y[1] = np.clip(y[1], -1, 1)  # σ_n 0: clean data as floats
    y[2, 0, 1, 1] = np.nan
    y[3, 0, 4, 4] = np.inf
    a = pa.table(
        {
            "id": ["good", "zero", "nan", "inf", "no-sigma", "neg-sigma"],
            "noisy": tensor_column(y),
            "sigma_n": pa.array([0.1, 0.0, 0.1, 0.1, None, -0.2], pa.float64()),
            "label": [1, 2, 3, 4, 5, 6],
        }
    )
    lists = rng.uniform(-1.2, 1.2, (3, 8, 8))  # float64 lists, one (H, W) row
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    b = pa.table(
        {
            "id": ["list", "nan-sigma", "from-image", "pixels"],
            "image": [None, None, png(grey), None],
            "noisy": [lists[0][None].tolist(), lists[1][None].tolist(), None, grey[None].astype(float).tolist()],
            "sigma_n": [0.25, float("nan"), None, 0.1],
        }
    )
    for name, t in (("a.parquet", a), ("b.parquet", b)):
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join(uri, name), buf.getvalue().to_pybytes())
    return y, lists, grey


def test_users_parquet_noisy_data_on_s3(ray_cluster, s3_prefix):
    y, lists, grey = users_parquet(f"{s3_prefix}/in")
    cfg = CorruptConfig(
        out=f"{s3_prefix}/out", source=SourceConfig(dataset=f"{s3_prefix}/in"), clean_fraction=1.0, preview=0
    )
    res = run(cfg, progress=False)
    assert (res.rows_in, res.rows_out, res.rows_quarantined) == (10, 4, 6)
    assert quarantined(res.out) == {
        "nan": "noisy (column 'noisy', row 2 of a.parquet): 1 NaN value",
        "inf": "noisy (column 'noisy', row 3 of a.parquet): 1 infinite value",
        "no-sigma": "sigma_n of the noisy data (column 'noisy', row 4 of a.parquet): missing (set source.sigma_n, "
        "or give each row's: a Parquet 'sigma_n' column, a .npy folder's sigma_n.json)",
        "neg-sigma": "sigma_n (column 'sigma_n', row 5 of a.parquet): -0.2 is negative",
        "nan-sigma": "sigma_n (column 'sigma_n', row 1 of b.parquet): NaN",
        "pixels": f"noisy (column 'noisy', row 3 of b.parquet): {(grey > 1).sum()} values beyond ±1.8 ({grey.max()}, "
        f"{np.unique(grey)[-2]}, {np.unique(grey)[-3]}, ...): not [-1, 1] data with noise σ_n=0.1 (values beyond "
        "±(1 + 8·σ_n) are refused)",
    }
    rows = noisy_by_id(table_of(res.out))
    assert set(rows) == {"good", "zero", "list", "from-image"}
    expect = {
        "good": (y[0], 0.1, "corrupted", "user_noise"),
        "zero": (y[1], 0.0, "clean", ""),
        "list": (lists[0][None].astype(np.float32), 0.25, "corrupted", "user_noise"),
        "from-image": (grey[None] / np.float32(127.5) - 1, 0.0, "clean", ""),
    }
    for rid, (want, sigma, quality, corruption) in expect.items():
        r, got = rows[rid]
        assert got.shape == (1, 8, 8) and (got == want).all(), rid  # exact: never clipped or quantised
        assert (r["sigma_n"], r["quality"], r["corruption"]) == (sigma, quality, corruption)
        assert (decode_png(r["image"]) == preview(got)).all()
    assert rows["good"][0]["label"] == 1
    # noisy_of on S3
    ids, got, s = noisy_of(res.out, ids=["list", "good"])
    assert (got[1] == y[0]).all() and s.tolist() == [0.25, 0.1]


def test_users_npy_folder(ray_cluster, tmp_path):
    root = str(tmp_path / "npy")
    rng = np.random.default_rng(5)
    a = rng.uniform(-1.3, 1.3, (1, 8, 8)).astype(np.float32)
    b = rng.uniform(-1, 1, (8, 8))  # (H, W) float64: one channel
    bad_inf = a.copy()
    bad_inf[0, 0, 0] = -np.inf
    files = {
        "a.npy": npy(a),
        "b.npy": npy(b),
        "hwc.npy": npy(np.zeros((8, 8, 3), np.float32)),
        "inf.npy": npy(bad_inf),
        "rgb.npy": npy(np.zeros((3, 8, 8), np.float32)),
        "junk.npy": b"not an array",
        "neg.npy": npy(a),
        "sigma_n.json": json.dumps({"b.npy": 0.3, "neg.npy": -0.5}).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data)
    src = SourceConfig(dataset=root, sigma_n=0.1)
    assert make_source(src).__class__.__name__ == "NpySource"
    with pytest.raises(ConfigError, match="clean-fraction 1"):
        run(CorruptConfig(out=str(tmp_path / "refused"), source=src, clean_fraction=0.5), progress=False)
    with pytest.raises(ConfigError, match="'source.sigma_n': digits has no noisy data"):
        run(CorruptConfig(out=str(tmp_path / "refused"), source=SourceConfig(sigma_n=0.1)), progress=False)
    res = run(CorruptConfig(out=str(tmp_path / "out"), source=src, clean_fraction=1.0, preview=0), progress=False)
    assert (res.rows_in, res.rows_out + res.rows_quarantined) == (7, 7)
    reasons = quarantined(res.out)
    assert reasons == {
        "hwc.npy": "noisy (file hwc.npy): shape (8, 8, 3); expected (C, H, W) with C = 1 or 3 (an (H, W, C) array: "
        "store it channels first, a.transpose(2, 0, 1))",
        "inf.npy": "noisy (file inf.npy): 1 infinite value",
        "rgb.npy": "noisy data is 3x8x8 (CxHxW), the dataset's noisy data is 1x8x8 (a dataset with noisy data has "
        "one shape: set source.image_size and source.channels)",
        "junk.npy": reasons["junk.npy"],
        "neg.npy": "sigma_n (sigma_n.json, file neg.npy): -0.5 is negative",
    }
    assert reasons["junk.npy"].startswith("noisy (file junk.npy): not a .npy array")
    rows = noisy_by_id(table_of(res.out))
    assert (rows["a.npy"][1] == a).all() and rows["a.npy"][0]["sigma_n"] == 0.1  # source.sigma_n
    assert (rows["b.npy"][1] == b[None].astype(np.float32)).all() and rows["b.npy"][0]["sigma_n"] == 0.3
    assert noisy_shape(res.out) == (1, 8, 8)
