"""Built-in datasets and user data (folders, WebDataset tars, Parquet), decoding and Ray Data reading."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ambient_ray.data import sources as D


def png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def jpg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rgb(seed, size=12):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "name, n, shape", [("digits", 1797, (8, 8, 1)), ("faces", 200, (25, 25, 1)), ("photos", 50, (32, 32, 3))]
)
def test_builtins(name, n, shape):
    cfg = D.SourceConfig(dataset=name, photos_count=50)
    src = D.make_source(cfg)
    items = D.list_items(src, cfg)
    assert len(items) == n and len({i for i, _ in items}) == n
    recs = src.load([loc for _, loc in items[:5]])
    arr, err = D.decode(recs[0], cfg)
    assert err is None and arr.shape == shape and arr.dtype == np.uint8
    if name == "digits":
        assert [r["label"] for r in recs] == [0, 1, 2, 3, 4]
        assert recs[3]["caption"] == "a handwritten digit three"
        assert {r["caption"] for r in src.load([loc for _, loc in items])} == {
            f"a handwritten digit {w}" for w in D.DIGIT_WORDS
        }
    if name == "faces":
        assert {r["caption"] for r in recs} == {"a photo of a face"}
        assert max(r["image"].max() for r in src.load([loc for _, loc in items])) == 255  # 0..16 scaled to 0..255
    if name == "photos":  # crops of several photographs, not one repeated patch
        assert len({r["image"].tobytes() for r in src.load([loc for _, loc in items[:20]])}) == 20


def test_repeat_limit_resize_and_channels():
    cfg = D.SourceConfig(dataset="digits", repeat=3, limit=4000, image_size=16, channels=3)
    src = D.make_source(cfg)
    items = D.list_items(src, cfg)
    assert len(items) == 4000 and len({i for i, _ in items}) == 4000
    arr, _ = D.decode(src.load([items[-1][1]])[0], cfg)
    assert arr.shape == (16, 16, 3) and (arr[..., 0] == arr[..., 1]).all()


def test_decode_refuses_bad_images_with_reasons():
    cfg = D.SourceConfig()
    cases = {
        b"": "empty image bytes",
        b"not an image at all": "undecodable image",
        png(rgb(0))[:60]: "undecodable image",
        png(np.dstack([rgb(1), np.full((12, 12, 1), 255, np.uint8)])): "unsupported image mode RGBA",
        png(np.zeros((4, 4, 2), np.uint8)): "unsupported image mode LA",
    }
    for data, reason in cases.items():
        arr, err = D.decode({"image": data}, cfg)
        assert arr is None and reason in err, (reason, err)
    arr, err = D.decode({"image": np.zeros((0, 5, 1), np.uint8)}, cfg)
    assert arr is None and "zero-size" in err
    arr, err = D.decode({"image": png(rgb(2))}, D.SourceConfig(channels=1))
    assert err is None and arr.shape == (12, 12, 1)


def test_folder_source_with_classes(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(png(rgb(0)))
    (tmp_path / "cats" / "b.jpg").write_bytes(jpg(rgb(1)))
    (tmp_path / "dogs" / "c.png").write_bytes(png(rgb(2)))
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    cfg = D.SourceConfig(dataset=str(tmp_path))
    src = D.make_source(cfg)
    assert isinstance(src, D.FolderSource)
    items = D.list_items(src, cfg)
    assert [i for i, _ in items] == ["cats/a.png", "cats/b.jpg", "dogs/c.png"]
    recs = src.load([loc for _, loc in items])
    assert [r["label"] for r in recs] == [0, 0, 1]
    assert (D.decode(recs[0], cfg)[0] == rgb(0)).all()


def make_tar(path, entries):
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_source(tmp_path):
    make_tar(
        tmp_path / "shard-0.tar",
        [
            ("k1.png", png(rgb(0))),
            ("k1.cls", b"3"),
            ("k1.txt", b"a cat"),
            ("k2.jpg", jpg(rgb(1))),
            ("k3.txt", b"no image"),
        ],
    )
    make_tar(tmp_path / "shard-1.tar", [("sub/k4.png", png(rgb(4)))])
    cfg = D.SourceConfig(dataset=str(tmp_path))
    src = D.make_source(cfg)
    assert isinstance(src, D.WebDatasetSource)
    items = D.list_items(src, cfg)
    assert [i for i, _ in items] == ["shard-0.tar:k1", "shard-0.tar:k2", "shard-0.tar:k3", "shard-1.tar:sub/k4"]
    recs = src.load([loc for _, loc in items])
    assert recs[0]["label"] == 3 and recs[0]["caption"] == "a cat"
    assert "no .png/.jpg/.jpeg member" in D.decode(recs[2], cfg)[1]
    assert (D.decode(recs[3], cfg)[0] == rgb(4)).all()


def test_parquet_source_and_missing_image_column(tmp_path):
    t = pa.table({"id": ["x", "y"], "image": [png(rgb(0)), png(rgb(1))], "label": [1, 2]})
    pq.write_table(t, tmp_path / "part.parquet")
    cfg = D.SourceConfig(dataset=str(tmp_path))
    src = D.make_source(cfg)
    items = D.list_items(src, cfg)
    assert [i for i, _ in items] == ["x", "y"]
    assert src.load([items[1][1]])[0]["label"] == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"id": ["z"], "pixels": [b"1"]}), bad / "p.parquet")
    with pytest.raises(ValueError, match="missing column 'image'"):
        D.list_items(D.make_source(D.SourceConfig(dataset=str(bad))), D.SourceConfig(dataset=str(bad)))


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        D.make_source(D.SourceConfig(dataset=str(tmp_path / "nothing-here")))


def test_read_with_ray_data(ray_cluster, tmp_path):
    (tmp_path / "a.png").write_bytes(png(rgb(0)))
    (tmp_path / "b.png").write_bytes(b"garbage")
    rows = sorted(D.read(str(tmp_path)).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["error"] == "" and rows[0]["height"] == 12 and rows[0]["channels"] == 3
    assert "undecodable" in rows[1]["error"] and rows[1]["image"] == b"garbage"
    assert D.read("digits").count() == 1797
