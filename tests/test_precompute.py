"""The precompute stage (images -> VAE latents, captions -> text embeddings on a Ray Data actor pool) with small
random-initialised encoders of the real classes (diffusers AutoencoderKL, transformers CLIPTextModel) saved with
save_pretrained, and the latent path end to end: precompute -> annotate -> train on latents -> sample -> decode."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ambient_ray import cli
from ambient_ray.config import ConfigError
from ambient_ray.data import schema
from ambient_ray.data.sources import SourceConfig
from ambient_ray.io import storage
from ambient_ray.models import encoders
from ambient_ray.stages.corrupt import CorruptConfig
from ambient_ray.stages.corrupt import run as corrupt_run
from ambient_ray.stages.precompute import PrecomputeConfig, run
from ambient_ray.stages.results import StageFailed
from tests.encoders_fixtures import make_tiny_clip_text, make_tiny_vae, upload_folder


@pytest.fixture(scope="module")
def world(ray_cluster, mlflow_server, tmp_path_factory):
    """Digits upscaled to 32x32 (3 shards), a tiny f=4 VAE and a tiny CLIP text encoder, and one precompute."""
    root = tmp_path_factory.mktemp("precompute")
    data = str(root / "corrupt")
    corrupt_run(
        CorruptConfig(
            out=data,
            source=SourceConfig(dataset="digits", limit=120, image_size=32),
            corruptions=["blur:sigma=1.0"],
            clean_fraction=0.3,
            preview=0,
            shard_size=40,
        ),
        progress=False,
    )
    vae = make_tiny_vae(root / "vae", factor=4)
    clip = make_tiny_clip_text(root / "clip")
    out = str(root / "latents")
    summary = run(PrecomputeConfig(data=data, out=out, vae=vae, text_encoder=clip), progress=False)
    return {"root": root, "data": data, "vae": vae, "clip": clip, "out": out, "summary": summary}


def columns(out: str) -> pa.Table:
    good, bad = schema.read_table(storage.join(out, "data"))
    assert bad.num_rows == 0
    return good.sort_by("id")


def test_shapes_columns_and_provenance(world):
    s, out = world["summary"], world["out"]
    assert (s["rows_in"], s["rows_out"], s["rows_quarantined"], s["shards_run"]) == (120, 120, 0, 3)
    t = columns(out)
    specs = schema.specs_of(t.schema)
    assert specs["latent"].shape == (8, 8, 8) and specs["latent"].dtype == "float32"  # 4 channels: mean, std
    assert specs["caption_emb"].shape == (77, 32) and specs["caption_emb"].dtype == "float16"
    assert specs["caption_mask"].shape == (77,)
    src = pq.read_table(storage.join(world["data"], "data")).sort_by("id")
    for name in src.column_names:  # every original column kept, unchanged
        assert t.column(name).to_pylist() == src.column(name).to_pylist(), name
    lat = schema.to_numpy(t.column("latent"), specs["latent"])
    assert np.isfinite(lat).all() and (lat[:, 4:] > 0).all()  # std of a real VAE's posterior
    mask = schema.to_numpy(t.column("caption_mask"), specs["caption_mask"])
    # "a handwritten digit seven": start + 4 words + end (the tiny BPE spells each caption word as one token)
    assert set(mask.sum(1).tolist()) == {6}
    info = json.loads(storage.read_bytes(storage.join(out, "latents.json")))
    assert info["vae_fingerprint"] == encoders.load_image_encoder(world["vae"]).fingerprint
    assert info["text_fingerprint"] == encoders.load_text_encoder(world["clip"]).fingerprint
    assert info["latent_shape"] == [8, 8, 8] and info["factor"] == 4 and info["resolution"] == 32
    md = json.loads(
        pq.read_schema(storage.list_files(storage.join(out, "data"), (".parquet",))[0]).metadata[
            b"ambient_ray.precompute"
        ]
    )
    assert md["vae_fingerprint"] == info["vae_fingerprint"]
    from mlflow.tracking import MlflowClient

    r = MlflowClient().get_run(s["mlflow_run_id"])
    assert r.data.metrics["rows_out"] == 120 and r.data.tags["vae_fingerprint"] == info["vae_fingerprint"]
    # the measured normalisation: a drawn latent z = mean + std·ε, normalised, has per-channel mean 0, std 0.5
    m, sd = lat[:, :4].astype(np.float64), lat[:, 4:].astype(np.float64)
    shift, scale = np.array(info["shift"]), np.array(info["scale"])
    mean_x = ((m - shift[None, :, None, None]) * scale[None, :, None, None]).mean(axis=(0, 2, 3))
    ez2 = ((m**2 + sd**2) - 2 * m * shift[None, :, None, None] + shift[None, :, None, None] ** 2).mean(axis=(0, 2, 3))
    std_x = np.sqrt(ez2 * scale**2 - mean_x**2)
    np.testing.assert_allclose(mean_x, 0.0, atol=1e-6)
    np.testing.assert_allclose(std_x, 0.5, rtol=1e-5)


def test_same_outputs_across_runs_and_batch_sizes(world, tmp_path):
    other = str(tmp_path / "again")
    run(PrecomputeConfig(data=world["data"], out=other, vae=world["vae"], text_encoder=world["clip"], batch_size=7))
    a, b = columns(world["out"]), columns(other)
    spec = schema.specs_of(a.schema)
    for name in ("caption_emb", "caption_mask"):
        assert np.array_equal(schema.to_numpy(a.column(name), spec[name]), schema.to_numpy(b.column(name), spec[name]))
    np.testing.assert_allclose(
        schema.to_numpy(a.column("latent"), spec["latent"]),
        schema.to_numpy(b.column("latent"), spec["latent"]),
        atol=1e-5,
    )
    # the caption embedding depends on the caption alone: every "seven" row has the same one
    emb = schema.to_numpy(a.column("caption_emb"), spec["caption_emb"])
    caps = np.array(a.column("caption").to_pylist())
    sevens = np.flatnonzero(caps == "a handwritten digit seven")
    assert len(sevens) > 1 and all(np.array_equal(emb[sevens[0]], emb[i]) for i in sevens)
    assert not np.array_equal(emb[sevens[0]], emb[np.flatnonzero(caps != caps[sevens[0]])[0]])


def test_killed_run_resumes_without_duplicates(world, tmp_path):
    out = str(tmp_path / "killed")
    cfg = dict(data=world["data"], out=out, vae=world["vae"])
    with pytest.raises(StageFailed, match="2 of 3 shards complete"):
        run(PrecomputeConfig(**cfg, debug_fail_shard="shard-00001"), progress=False)
    s = run(PrecomputeConfig(**cfg), progress=False)
    assert (s["shards_run"], s["shards_skipped"], s["rows_out"]) == (1, 2, 120)
    ids = columns(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120
    again = run(PrecomputeConfig(**cfg), progress=False)  # an unchanged re-run does nothing
    assert again["shards_run"] == 0
    with pytest.raises(ConfigError, match="other encoders"):  # another encoder into the same out
        run(PrecomputeConfig(**cfg, vae_subfolder=None, text_encoder=world["clip"]), progress=False)


def test_wrong_folders_are_refused_by_name_before_any_work(world, tmp_path):
    out = tmp_path / "never"
    with pytest.raises((ConfigError, FileNotFoundError), match=str(world["clip"])):
        run(PrecomputeConfig(data=world["data"], out=str(out), vae=world["clip"]))  # a text encoder as --vae
    with pytest.raises((ConfigError, FileNotFoundError), match="nowhere"):
        run(
            PrecomputeConfig(data=world["data"], out=str(out), vae=world["vae"], text_encoder=str(tmp_path / "nowhere"))
        )
    assert not (out / "data").exists()
    code = cli.main(["precompute", "--data", world["data"], "--out", str(out), "--vae", str(tmp_path / "nowhere")])
    assert code == 2


def test_weights_and_outputs_on_s3(world, s3_prefix):
    vae = upload_folder(world["vae"], f"{s3_prefix}/weights/vae")
    clip = upload_folder(world["clip"], f"{s3_prefix}/weights/clip")
    s = run(
        PrecomputeConfig(data=world["data"], out=f"{s3_prefix}/latents", vae=vae, text_encoder=clip), progress=False
    )
    assert s["rows_out"] == 120
    a, b = columns(world["out"]), columns(f"{s3_prefix}/latents")
    assert a.column("latent").combine_chunks().equals(b.column("latent").combine_chunks())
    assert a.column("caption_emb").combine_chunks().equals(b.column("caption_emb").combine_chunks())
    # the same weights, so the same fingerprints, wherever they were read from
    local = json.loads(storage.read_bytes(storage.join(world["out"], "latents.json")))
    remote = json.loads(storage.read_bytes(f"{s3_prefix}/latents/latents.json"))
    assert local["vae_fingerprint"] == remote["vae_fingerprint"] and remote["vae"] == vae


def test_bad_images_are_quarantined_and_pixels_is_the_identity(world, tmp_path):
    src = pq.read_table(storage.list_files(storage.join(world["data"], "data"), (".parquet",))[0])
    images = src.column("image").to_pylist()
    images[3] = b"not a png"
    data = tmp_path / "broken" / "data"
    data.mkdir(parents=True)
    pq.write_table(src.set_column(src.column_names.index("image"), "image", pa.array(images)), data / "s.parquet")
    out = str(tmp_path / "pixels")
    s = run(PrecomputeConfig(data=str(tmp_path / "broken"), out=out, vae="pixels"), progress=False)
    assert (s["rows_in"], s["rows_out"], s["rows_quarantined"]) == (40, 39, 1)
    q = pq.read_table(storage.join(out, "quarantine", "s.parquet"))
    assert q.column("id").to_pylist() == [src.column("id")[3].as_py()]
    assert "cannot decode image" in q.column("reason")[0].as_py()
    assert s["latents"]["shift"] == [0.0] and s["latents"]["scale"] == [1.0]
    t = columns(out)
    lat = schema.to_numpy(t.column("latent"), schema.specs_of(t.schema)["latent"])
    from ambient_ray.data.images import decode_png

    img = decode_png(t.column("image")[0].as_py()).transpose(2, 0, 1) / 127.5 - 1.0
    np.testing.assert_allclose(lat[0, :1], img, atol=1e-6)
    assert (lat[:, 1:] == 0).all()


def test_latents_end_to_end(world, tmp_path):
    """digits 32x32 -> latents (tiny f=4 VAE) -> annotate (fixed σ_min for corrupted rows, in latent units) ->
    train on latents -> sample -> decode -> PNG grid."""
    from ambient_ray.stages.annotate import AnnotateConfig
    from ambient_ray.stages.annotate import run as annotate_run
    from ambient_ray.stages.sample import SampleConfig
    from ambient_ray.stages.sample import run as sample_run
    from ambient_ray.stages.train import TrainConfig
    from ambient_ray.stages.train import run as train_run

    ann = str(tmp_path / "annotated")
    annotate_run(AnnotateConfig(data=world["out"], out=ann, fixed_sigma_min=0.2), progress=False)
    assert storage.exists(storage.join(ann, "latents.json"))  # carried forward for train and sample
    model = str(tmp_path / "model")
    s = train_run(
        TrainConfig(
            data=ann,
            out=model,
            steps=12,
            batch_size=16,
            log_every=6,
            checkpoint_every=12,
            model={"preset": "tiny"},
            sample_grid=4,
            mlflow={"enabled": False},
        )
    )
    assert np.isfinite(s["metrics"]["loss"])
    meta = json.loads(storage.read_bytes(storage.join(model, "model", "model.json")))
    assert meta["model"]["in_channels"] == 4 and meta["model"]["img_resolution"] == 8
    assert meta["latents"]["vae"] == world["vae"] and meta["latents"]["latent_shape"] == [8, 8, 8]
    cov = json.loads(storage.read_bytes(storage.join(model, "coverage.json")))
    assert sum(r["draws"] for r in cov["donut"]) == 12 * 16
    out = str(tmp_path / "samples")
    sample_run(SampleConfig(checkpoint=model, out=out, num=6, sampler=dict(steps=3)), progress=False)
    imgs = np.load(storage.join(out, "samples.npy"))
    assert imgs.shape == (6, 32, 32, 1) and imgs.dtype == np.uint8 and imgs.std() > 0  # decoded, grey again
    assert storage.read_bytes(storage.join(out, "grid.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.read_bytes(storage.join(model, "samples.png"))[:8] == b"\x89PNG\r\n\x1a\n"
