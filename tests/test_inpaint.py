"""The inpaint stage (Ambient Diffusion restoration): a tiny random masked DDPM++ saved as a model folder, run on
Parquet with a mask column and on an image folder with NAME.mask.png files, local and on S3. Observed pixels are
kept in the sampled restoration, every row is restored or quarantined with its reason, a model without a mask
input and data without masks are refused in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ambient_ray.config import ConfigError, DataError, build
from ambient_ray.data import schema
from ambient_ray.data.images import decode_png, encode_png
from ambient_ray.io import storage
from ambient_ray.stages import registry
from ambient_ray.stages.inpaint import InpaintConfig, png_name, run

CLI = os.path.join(os.path.dirname(sys.executable), "ambient-ray")
R = 8  # image side
OFF = dict(enabled=False)


def _save_model(folder, *, mask_input: bool = True, label_dim: int = 0) -> str:
    """A random-init tiny masked ddpmpp in the layout the train stage exports (OUT/model: model.json + weights)."""
    from safetensors.torch import save_file

    from ambient_ray.models import registry as models

    model = dict(
        arch="ddpmpp",
        img_resolution=R,
        in_channels=1,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        label_dim=label_dim,
        mask_input=mask_input,
    )
    meta = {"kind": "denoiser", "arch": "ddpmpp", "model": model, "sigma_data": 0.5}
    torch.manual_seed(0)
    net = models.build(meta)
    with torch.no_grad():  # random weights everywhere (F is zero at init), small enough to stay finite
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    d = folder / "model"
    d.mkdir(parents=True)
    state = {n: p.detach().contiguous() for n, p in net.named_parameters()}
    save_file(state, str(d / "ema.safetensors"))
    save_file(state, str(d / "model.safetensors"))
    (d / "model.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run faster on one thread than on several (and much faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("masked-model"))


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n grey images uint8 (n, R, R, 1) and masks uint8 (n, 1, R, R) hiding about half the pixels (never all)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, R, R, 1), dtype=np.uint8)
    masks = (rng.random((n, 1, R, R)) < 0.5).astype(np.uint8)
    masks[:, 0, 0, 0] = 1
    return imgs, masks


def _write_parquet(path: str, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a uint8 (1, R, R) mask column (the schema's standard), hidden pixels stored as 0; row 3 has a
    mask value 2, row 4 a 16x16 image (its 8x8 mask does not fit it)."""
    imgs, masks = _images(n)
    rows = []
    for i in range(n):
        img = imgs[i] * masks[i, 0][..., None]
        png = encode_png(np.zeros((16, 16, 1), np.uint8)) if i == 4 else encode_png(img)
        m = masks[i].copy()
        if i == 3:
            m[0, 1, 1] = 2
        rows.append({"id": f"r{i}", "image": png, "label": i % 3, "mask": m})
    base = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])
    good, _ = schema.validate(rows, [schema.mask_spec(R, R)], schema=base)
    storage.write_parquet(path, good)
    return imgs, masks


def _read_out(out: str) -> pa.Table:
    files = storage.list_files(storage.join(out, "data"), (".parquet",))
    return pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(f))) for f in files])


def _quarantine(out: str) -> dict[str, str]:
    files = storage.list_files(storage.join(out, "quarantine"), (".parquet",))
    if not files:
        return {}
    t = pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(f))) for f in files])
    return dict(zip(t.column("id").to_pylist(), t.column("reason").to_pylist()))


def _check_kept(t: pa.Table, imgs: np.ndarray, masks: np.ndarray, ids: list[str]) -> None:
    """The sampled restoration holds every observed pixel of its row exactly (PNG is lossless); the posterior mean
    and the sample are images of the model's shape."""
    index = {f"r{i}": i for i in range(len(imgs))} | {f"img{i}.png": i for i in range(len(imgs))}
    got = t.to_pydict()
    mask_spec = schema.specs_of(t.schema)["mask"]
    stored = schema.to_numpy(t.column("mask"), mask_spec)
    for k, rid in enumerate(got["id"]):
        i = index[rid]
        m = masks[i, 0].astype(bool)
        assert (stored[k, 0] != 0).tolist() == m.tolist()
        sample = decode_png(got["sample"][k])
        mean = decode_png(got["mean"][k])
        assert sample.shape == mean.shape == (R, R, 1)
        np.testing.assert_array_equal(sample[m], imgs[i][m])
    assert sorted(got["id"]) == sorted(ids)


def test_parquet_rows_are_restored_or_quarantined_with_their_reason(model, tmp_path):
    data = str(tmp_path / "rows.parquet")
    imgs, masks = _write_parquet(data)
    out = str(tmp_path / "out")
    s = run(InpaintConfig(data=data, model=model, out=out, steps=3, batch_size=2, mlflow=OFF), progress=False)
    assert (s["rows_in"], s["rows_out"], s["rows_quarantined"]) == (5, 3, 2)
    t = _read_out(out)
    _check_kept(t, imgs, masks, ["r0", "r1", "r2"])
    assert t.column("label").to_pylist() == [0, 1, 2]
    bad = _quarantine(out)
    assert set(bad) == {"r3", "r4"}
    assert "values other than 0 and 1" in bad["r3"]
    assert "the image is 16x16" in bad["r4"]
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "preview.png")))) as im:
        assert im.width > 3 * R and im.height > 3 * R
    assert json.loads(storage.read_bytes(storage.join(out, "summary.json")))["rows_out"] == 3

    # one mode alone, and per-row PNG files
    only = str(tmp_path / "only")
    s = run(
        InpaintConfig(data=data, model=model, out=only, mode="mean", pngs=True, limit=2, mlflow=OFF), progress=False
    )
    got = _read_out(only)
    assert s["rows_in"] == 2 and "sample" not in got.column_names and "mean" in got.column_names
    assert storage.list_files(storage.join(only, "images")) == [
        storage.join(only, "images", "mean", f"r{i}.png") for i in (0, 1)
    ]
    # the same seed and batches give the same noise, whatever else the run makes
    again = str(tmp_path / "again")
    cfg = InpaintConfig(data=data, model=model, out=again, mode="sample", steps=3, batch_size=2, limit=2, mlflow=OFF)
    run(cfg, progress=False)
    assert _read_out(again).column("sample").to_pylist() == t.column("sample").to_pylist()[:2]


def _write_folder(root, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """img0..img3.png with img<i>.mask.png (0/255) beside them, but img2 without a mask (all observed) and img3's
    mask 4x4 (it does not fit its 8x8 image)."""
    imgs, masks = _images(n, seed=1)
    root.mkdir()
    masks[2] = 1
    for i in range(n):
        Image.fromarray(imgs[i, ..., 0]).save(root / f"img{i}.png")
        if i == 2:
            continue
        m = masks[i, 0] if i != 3 else np.ones((4, 4), np.uint8)
        Image.fromarray((m * 255).astype(np.uint8)).save(root / f"img{i}.mask.png")
    return imgs, masks


def test_an_image_folder_with_mask_files_logged_to_mlflow(model, tmp_path):
    from mlflow.tracking import MlflowClient

    imgs, masks = _write_folder(tmp_path / "folder")
    out = str(tmp_path / "out")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = dict(tracking_uri=uri, experiment="tests-inpaint")
    s = run(InpaintConfig(data=str(tmp_path / "folder"), model=model, out=out, steps=3, mlflow=mlflow), progress=False)
    assert (s["rows_in"], s["rows_out"], s["rows_quarantined"]) == (4, 3, 1)
    _check_kept(_read_out(out), imgs, masks, ["img0.png", "img1.png", "img2.png"])
    assert "the image is 8x8" in _quarantine(out)["img3.png"]
    client = MlflowClient(uri)
    got = client.get_run(s["mlflow_run_id"])
    assert got.data.metrics["rows_out"] == 3 and got.data.metrics["rows_quarantined"] == 1
    assert got.data.tags["stage"] == "inpaint"
    assert "preview.png" in [a.path for a in client.list_artifacts(s["mlflow_run_id"])]


def test_on_s3(model, s3_prefix, tmp_path):
    local = str(tmp_path / "rows.parquet")
    imgs, masks = _write_parquet(local, n=3)
    data = f"{s3_prefix}/in/rows.parquet"
    storage.write_bytes(data, open(local, "rb").read())
    out = f"{s3_prefix}/out"
    s = run(InpaintConfig(data=data, model=model, out=out, steps=3, pngs=True, mlflow=OFF), progress=False)
    assert (s["rows_in"], s["rows_out"]) == (3, 3)
    _check_kept(_read_out(out), imgs, masks, ["r0", "r1", "r2"])
    assert len(storage.list_files(storage.join(out, "images"))) == 6
    assert storage.exists(storage.join(out, "preview.png"))


def test_a_model_without_mask_input_and_data_without_masks_are_refused(model, tmp_path):
    plain = _save_model(tmp_path / "plain", mask_input=False)
    data = str(tmp_path / "rows.parquet")
    _write_parquet(data, n=2)
    with pytest.raises(ConfigError, match="built without model.mask_input"):
        run(InpaintConfig(data=data, model=plain, out=str(tmp_path / "o1"), mlflow=OFF), progress=False)

    bare = str(tmp_path / "bare.parquet")
    storage.write_parquet(bare, pa.table({"id": ["a"], "image": [encode_png(np.zeros((R, R, 1), np.uint8))]}))
    with pytest.raises(DataError, match="no masks: nothing is hidden"):
        run(InpaintConfig(data=bare, model=model, out=str(tmp_path / "o2"), mlflow=OFF), progress=False)

    labelled = _save_model(tmp_path / "labelled", label_dim=3)
    with pytest.raises(ConfigError, match="'class_label': 5, the model has 3 classes"):
        run(InpaintConfig(data=data, model=labelled, out=str(tmp_path / "o3"), class_label=5, mlflow=OFF))
    folder = tmp_path / "folder"
    _write_folder(folder)
    with pytest.raises(DataError, match="class-conditional: set class_label"):
        run(InpaintConfig(data=str(folder), model=labelled, out=str(tmp_path / "o4"), mlflow=OFF), progress=False)
    s = run(  # the Parquet rows' labels condition the model
        InpaintConfig(data=data, model=labelled, out=str(tmp_path / "o5"), steps=2, mlflow=OFF), progress=False
    )
    assert s["rows_out"] == 2


def test_the_command_line_refuses_a_plain_model_in_one_line_and_helps_without_torch(tmp_path):
    plain = _save_model(tmp_path / "plain", mask_input=False)
    data = str(tmp_path / "rows.parquet")
    _write_parquet(data, n=2)
    r = subprocess.run(
        [
            CLI,
            "inpaint",
            "--data",
            data,
            "--model",
            plain,
            "--out",
            str(tmp_path / "o"),
            "--set",
            "mlflow.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("ambient-ray inpaint: error: ") and "mask_input" in lines[0]

    code = (
        "import sys\n"
        "from ambient_ray.cli import main\n"
        "try:\n    main(['inpaint', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'inpaint --help imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--data", "--model", "--mode", "--sigma", "--steps", "--class-label"):
        assert flag in r.stdout


def test_the_stage_is_registered_and_its_config_is_checked():
    stage = registry.get("inpaint")
    assert stage.model() is InpaintConfig and stage.folder == "inpainted"
    with pytest.raises(ConfigError, match="sigma_min"):
        build(InpaintConfig, flags={"data": "d", "model": "m", "out": "o", "sigma_min": 100.0})
    assert png_name("a/../b c/x.png") == "a/b_c/x.png" and png_name("..") == "row.png"
