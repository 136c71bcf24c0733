"""The mask is data (Ambient Diffusion): masking corruptions write a ``mask`` column, every row of a dataset
with masks carries one, users bring their own masks (image folders, Parquet), bad masks are quarantined, and
:func:`ambient_ray.data.masks.masks_of` reads them back."""

import io
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from ambient_ray import corruptions as C
from ambient_ray.data import schema
from ambient_ray.data.images import decode_png
from ambient_ray.data.masks import check_mask, masks_of, resize_mask
from ambient_ray.data.sources import SourceConfig, _builtin_arrays, decode, decode_masked
from ambient_ray.io import storage
from ambient_ray.stages.corrupt import CorruptConfig, run


def png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def grey(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(1, 256, (h, w), dtype=np.uint8)  # no pixel is 0 by chance


def table_of(out):
    files = storage.list_files(storage.join(out, "data"), (".parquet",))
    tables = []
    for f in files:
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


# ------------------------------------------------------------------------------ the corruptions


def test_mask_writes_which_pixels_are_observed():
    x = np.ones((20, 64, 64, 3), np.float32)
    out, mask = C.parse("mask:p=0.3").run(x, [np.random.default_rng(i) for i in range(20)])
    assert mask.shape == (20, 64, 64) and mask.dtype == bool
    # 81,920 Bernoulli(0.7) draws: the observed fraction is 0.7 within a few standard deviations (0.0016)
    assert mask.mean() == pytest.approx(0.7, abs=0.01)
    assert (out[~mask] == 0).all() and (out[mask] == 1).all()  # hidden in every channel, observed untouched
    # through apply: uint8 (H, W) 0/1 masks, the stored image 0 exactly where hidden, the same draw per seed
    digits, _ = _builtin_arrays("digits", 1, 4)
    imgs, masks = C.apply_with_masks(C.parse("mask:p=0.5"), list(digits[:30]), list(range(30)))
    assert all(m.dtype == np.uint8 and m.shape == (8, 8) and set(np.unique(m)) <= {0, 1} for m in masks)
    assert all((im[m == 0] == 0).all() for im, m in zip(imgs, masks))
    assert imgs[0].tobytes() == C.apply(C.parse("mask:p=0.5"), [digits[0]], [0])[0].tobytes()
    again = C.apply_with_masks(C.parse("mask:p=0.5"), [digits[3]], [3])[1][0]
    assert (again == masks[3]).all()


def test_box_mask_hides_one_box():
    x = np.ones((6, 16, 16, 1), np.float32)
    out, mask = C.parse("box_mask:size=0.5").run(x, [np.random.default_rng(i) for i in range(6)])
    tops = set()
    for img, m in zip(out[..., 0], mask):
        rows, cols = np.nonzero(~m)
        assert len(rows) == 64 and np.ptp(rows) == 7 and np.ptp(cols) == 7  # one 8x8 box: a quarter of the image
        assert (img[~m] == 0).all() and (img[m] == 1).all()
        tops.add((rows.min(), cols.min()))
    assert len(tops) > 1  # placed by each row's seed
    _, m = C.parse("box_mask:size=0.3").run(np.ones((1, 10, 20, 3), np.float32), [np.random.default_rng(0)])
    rows, cols = np.nonzero(~m[0])
    assert (np.ptp(rows) + 1, np.ptp(cols) + 1, len(rows)) == (3, 6, 18)
    assert C.parse("box_mask").spec == "box_mask:size=0.5"
    with pytest.raises(C.CorruptionError, match="out of range"):
        C.parse("box_mask:size=0")


def test_registry_masks_flag():
    assert C.parse("mask:p=0.1").masks and C.parse("block_mask:size=2").masks and C.parse("box_mask").masks
    assert not C.parse("blur:sigma=1").masks
    _, masks = C.apply_with_masks(C.parse("jpeg:quality=50"), [np.zeros((5, 7, 3), np.uint8)], [0])
    assert masks[0].shape == (5, 7) and (masks[0] == 1).all()

    @C.register("left_half_test", masks=True)
    def _left(x, rngs):
        keep = np.ones(x.shape[:3], bool)
        keep[:, :, : x.shape[2] // 2] = False
        return x, keep[:, None]  # (N, 1, H, W) is taken too

    img, m = C.apply_with_masks(C.parse("left_half_test"), [np.full((4, 4, 1), 200, np.uint8)], [0])
    assert (m[0][:, :2] == 0).all() and (m[0][:, 2:] == 1).all() and (img[0][:, :2] == 0).all()

    @C.register("forgot_mask_test", masks=True)
    def _forgot(x, rngs):
        return x

    with pytest.raises(ValueError, match="must return"):
        C.parse("forgot_mask_test")(np.zeros((1, 2, 2, 1), np.float32), [np.random.default_rng(0)])


def test_listing_and_help_import_no_torch_or_scipy():
    code = (
        "import sys, contextlib, io\n"
        "from ambient_ray import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert cli.main(['corrupt', '--list-corruptions']) == 0\n"
        "    try:\n"
        "        cli.main(['corrupt', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'box_mask' in out.getvalue()\n"
        "bad = [m for m in ('torch', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------ users' masks, unit


def test_check_mask_values_and_shapes():
    ok = np.array([[0, 255], [255, 255]], np.uint8)
    assert (check_mask(png(ok), (2, 2))[0] == [[0, 1], [1, 1]]).all()
    assert (check_mask(png(ok // 255), (2, 2))[0] == [[0, 1], [1, 1]]).all()  # 0/1 PNG
    assert (check_mask(png(ok.astype(bool)), (2, 2))[0] == [[0, 1], [1, 1]]).all()  # mode 1
    assert "values other than 0/255 or 0/1 (128)" in check_mask(png(np.array([[0, 128]], np.uint8)), (1, 2))[1]
    assert "mask image is 1x2, the image is 2x2" in check_mask(png(np.array([[0, 255]], np.uint8)), (2, 2))[1]
    assert "mode RGB" in check_mask(png(np.zeros((2, 2, 3), np.uint8)), (2, 2))[1]
    assert "undecodable" in check_mask(b"not a png", (2, 2))[1]
    assert (check_mask(np.ones((1, 2, 2), np.uint8), (2, 2))[0] == 1).all()
    assert "values other than 0 and 1 (2)" in check_mask(np.array([[0, 2], [1, 1]]), (2, 2))[1]
    assert "shape (1, 3, 2), the image is 2x2" in check_mask(np.ones((1, 3, 2)), (2, 2))[1]
    assert "values other than 0 and 1 (nan)" in check_mask(np.array([[0.0, np.nan]]), (1, 2))[1]


def test_decode_masked_resizes_with_the_image():
    img, m = np.full((12, 16, 3), 200, np.uint8), np.ones((12, 16), np.uint8)
    m[:6, :] = 0
    rec = {"image": png(img), "mask": png(m * 255), "mask_where": "file x.mask.png"}
    arr, mask, err = decode_masked(rec, SourceConfig(image_size=6))
    assert err is None and arr.shape == (6, 6, 3) and mask.shape == (6, 6)
    assert (mask[:3] == 0).all() and (mask[3:] == 1).all()  # the crop keeps all 12 rows: the top half hidden
    assert (arr[mask == 0] == 0).all()
    assert (resize_mask(np.ones((4, 4), np.uint8), 9) == 1).all()
    # without a mask it is decode's image; a bad mask is a reason naming where it came from
    assert (
        decode_masked({"image": png(img)}, SourceConfig())[0] == decode({"image": png(img)}, SourceConfig())[0]
    ).all()
    _, _, err = decode_masked({**rec, "mask": png(np.full((12, 16), 7, np.uint8))}, SourceConfig())
    assert err == "mask (file x.mask.png): values other than 0/255 or 0/1 (7)"


def test_masks_of_gives_all_ones_where_there_is_no_mask():
    base = {"id": ["a", "b", "c"], "height": [2, 2, 2], "width": [3, 3, 3]}
    ones = masks_of(pa.table(base))
    assert ones.shape == (3, 1, 2, 3) and ones.dtype == np.uint8 and (ones == 1).all()
    m = np.zeros((3, 1, 2, 3), np.uint8)
    m[1, 0, 0, 0] = 1
    t = pa.table({**base, "mask": schema.to_arrow(schema.mask_spec(2, 3), m)})
    assert (masks_of(t) == m).all()
    assert (masks_of(t.to_batches()[0]) == m).all()
    assert (masks_of({"mask": m, "id": np.array(base["id"])}) == m).all()  # a Ray numpy batch
    assert (masks_of(t.to_pandas()) == m).all()  # pandas holds each row flat: height and width reshape it
    # a null row (a table concatenated with one without masks) reads as all ones
    nulls = pa.concat_tables([t, pa.table({**base, "mask": pa.nulls(3, t.schema.field("mask").type)})])
    got = masks_of(nulls)
    assert (got[:3] == m).all() and (got[3:] == 1).all()
    assert masks_of(pa.table({"image": [png(np.zeros((5, 4), np.uint8))]})).shape == (1, 1, 5, 4)
    assert masks_of({"id": np.array(["x"])}, shape=(4, 4)).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="no mask"):
        masks_of({"id": np.array(["x"])})


# ------------------------------------------------------------------------------ the corrupt stage


def test_mixed_dataset_every_row_has_a_mask(ray_cluster, tmp_path):
    cfg = CorruptConfig(
        out=str(tmp_path / "mixed"),
        source=SourceConfig(dataset="digits", limit=160),
        corruptions=["mask:p=0.5", "blur:sigma=1", "box_mask:size=0.5"],
        clean_fraction=0.25,
        shard_size=80,
        preview=0,
    )
    res = run(cfg, progress=False)
    assert (res.rows_in, res.rows_out, res.rows_quarantined) == (160, 160, 0)
    t = table_of(res.out)
    assert schema.specs_of(t.schema)["mask"] == schema.mask_spec(8, 8)
    rows = t.to_pylist()
    masks = masks_of(t)
    kinds = Counter((r["quality"], r["corruption"]) for r in rows)
    assert kinds == {("clean", ""): 40, ("corrupted", "mask:p=0.5"): 40, ("corrupted", "blur:sigma=1"): 40,
                     ("corrupted", "box_mask:size=0.5"): 40}  # fmt: skip
    digits, _ = _builtin_arrays("digits", 1, 4)
    observed = []
    for r, m in zip(rows, masks[:, 0]):
        img = decode_png(r["image"])[..., 0]
        if r["corruption"] in ("", "blur:sigma=1"):
            assert (m == 1).all()
            continue
        assert (img[m == 0] == 0).all()
        orig = digits[int(r["id"].split("-")[1])]
        expect_img, expect_mask = C.apply_with_masks(C.parse(r["corruption"]), [orig], [r["seed"]])
        assert (expect_mask[0] == m).all() and (expect_img[0][..., 0] == img).all()
        if r["corruption"] == "box_mask:size=0.5":
            assert (m == 0).sum() == 16
        else:
            observed.append(m.mean())
    assert np.mean(observed) == pytest.approx(0.5, abs=0.06)  # 2,560 draws: standard deviation 0.01
    # Ray Data gives the column as one (N, 1, H, W) uint8 array
    fs, path = storage.filesystem(storage.join(res.out, "data"))
    batch = next(iter(ray.data.read_parquet(path, filesystem=fs).iter_batches(batch_size=160, batch_format="numpy")))
    assert batch["mask"].shape == (160, 1, 8, 8) and batch["mask"].dtype == np.uint8
    assert masks_of(batch).sum() == masks.sum()


def write_folder(root):
    """An image folder with masks beside its images: two good, one without a mask, two bad."""
    m = np.ones((8, 8), np.uint8)
    m[2:5, 1:6] = 0
    files = {
        "a.png": png(grey(1)),
        "a.mask.png": png(m * 255),  # 0/255
        "b.jpg": png(grey(2)),  # a PNG named .jpg decodes all the same
        "b.mask.png": png(m, mode="L"),  # 0/1
        "c.png": png(grey(3)),  # no mask: all observed
        "d.png": png(grey(4)),
        "d.mask.png": png(np.full((8, 9), 255, np.uint8)),  # wrong shape
        "e.png": png(grey(5)),
        "e.mask.png": png(np.where(m == 1, 255, 128).astype(np.uint8)),  # 128
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data)
    return m


def check_folder_run(res, m):
    assert (res.rows_in, res.rows_out, res.rows_quarantined) == (5, 3, 2)
    reasons = quarantined(res.out)
    assert set(reasons) == {"d.png", "e.png"}
    assert reasons["d.png"] == "mask (file d.mask.png): mask image is 8x9, the image is 8x8"
    assert reasons["e.png"] == "mask (file e.mask.png): values other than 0/255 or 0/1 (128)"
    t = table_of(res.out)
    by_id = {r["id"]: (r, mk[0]) for r, mk in zip(t.to_pylist(), masks_of(t))}
    assert set(by_id) == {"a.png", "b.jpg", "c.png"}
    for rid in ("a.png", "b.jpg"):
        r, mk = by_id[rid]
        assert (mk == m).all() and (r["quality"], r["corruption"]) == ("corrupted", "user_mask")
        img = decode_png(r["image"])[..., 0]
        assert (img[m == 0] == 0).all() and (img[m == 1] == grey(1 if rid == "a.png" else 2)[m == 1]).all()
    r, mk = by_id["c.png"]
    assert (mk == 1).all() and (r["quality"], r["corruption"]) == ("clean", "")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_folder_masks(ray_cluster, tmp_path, s3_prefix, where):
    root = str(tmp_path) if where == "local" else s3_prefix
    m = write_folder(storage.join(root, "imgs"))
    cfg = CorruptConfig(
        out=storage.join(root, "out"),
        source=SourceConfig(dataset=storage.join(root, "imgs")),
        clean_fraction=1.0,
        preview=0,
    )
    check_folder_run(run(cfg, progress=False), m)


def write_parquet(uri):
    """Two Parquet files: a tensor mask column, and a PNG-bytes mask column."""
    m = np.ones((1, 8, 8), np.uint8)
    m[0, :, :3] = 0
    two = m.copy()
    two[0, 0, 5] = 2
    tensors = pa.table(
        {
            "id": ["t-good", "t-none", "t-two", "t-shape"],
            "image": [png(grey(i, 8, 9 if i == 13 else 8)) for i in (10, 11, 12, 13)],
            "label": [1, 2, 3, 4],
            # a uint8 tensor column holds any byte: 2 is refused when read; t-shape's image is 8x9; t-none's mask
            # is all ones (pyarrow 25 cannot read back a null in a fixed-size list column)
            "mask": schema.to_arrow(schema.mask_spec(8, 8), np.stack([m, np.ones_like(m), two, m])),
        }
    )
    pngs = pa.table(
        {
            "id": ["p-good", "p-128", "p-small", "p-none"],
            "image": [png(grey(i)) for i in (20, 21, 22, 23)],
            "mask": [png(m[0] * 255), png(np.where(m[0] == 1, 255, 128).astype(np.uint8)), png(m[0, :4] * 255), None],
        }
    )
    for name, t in (("a.parquet", tensors), ("b.parquet", pngs)):
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join(uri, name), buf.getvalue().to_pybytes())
    return m[0]


def test_parquet_masks_on_s3(ray_cluster, s3_prefix):
    m = write_parquet(f"{s3_prefix}/in")
    cfg = CorruptConfig(
        out=f"{s3_prefix}/out",
        source=SourceConfig(dataset=f"{s3_prefix}/in"),
        corruptions=["mask:p=0.5"],
        clean_fraction=0.5,
        preview=0,
    )
    res = run(cfg, progress=False)
    assert (res.rows_in, res.rows_out + res.rows_quarantined) == (8, 8)
    reasons = quarantined(res.out)
    assert reasons == {
        "t-two": "mask (column 'mask', row 2 of a.parquet): values other than 0 and 1 (2)",
        "t-shape": "mask (column 'mask', row 3 of a.parquet): shape (1, 8, 8), the image is 8x9 (expected (1, 8, 9))",
        "p-128": "mask (column 'mask', row 1 of b.parquet): values other than 0/255 or 0/1 (128)",
        "p-small": "mask (column 'mask', row 2 of b.parquet): mask image is 4x8, the image is 8x8",
    }
    t = table_of(res.out)
    assert res.rows_out == t.num_rows == 4
    kinds = {}
    for r, mk in zip(t.to_pylist(), masks_of(t)[:, 0]):
        kinds[r["id"]] = (r["quality"], r["corruption"])
        drawn = C.apply_with_masks(C.parse("mask:p=0.5"), [np.zeros((8, 8, 1), np.uint8)], [r["seed"]])[1][0]
        user = np.ones_like(m) if r["id"] in ("t-none", "p-none") else m
        expect = drawn & user if r["corruption"].startswith("mask:") else user
        assert (mk == expect).all()
        assert (decode_png(r["image"])[..., 0][mk == 0] == 0).all()
    # a row with its own mask is corrupted; the plan's clean rows keep the user's mask alone
    assert kinds["t-none"] in {("clean", ""), ("corrupted", "mask:p=0.5")}
    assert kinds["p-none"] in {("clean", ""), ("corrupted", "mask:p=0.5")}
    assert {kinds["t-good"], kinds["p-good"]} <= {("corrupted", "user_mask"), ("corrupted", "mask:p=0.5+user_mask")}
