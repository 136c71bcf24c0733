"""Training on Ray Train + DeepSpeed (CPU, gloo), checkpoints and resume, MLflow, and sampling."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load as load_st

from ambient_ray.config import ConfigError
from ambient_ray.io import storage
from ambient_ray.stages.train import TrainConfig, run


@pytest.fixture(scope="module")
def digits(blurred_digits):
    return blurred_digits


def tcfg(data, out, **kw):
    base = dict(
        data=data,
        out=out,
        steps=12,
        batch_size=32,
        num_workers=1,
        zero_stage=2,
        log_every=2,
        checkpoint_every=4,
        sample_grid=0,
        model=dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2]),
        optim=dict(lr=2e-3, warmup_steps=2),
        ambient=dict(corrupted_sigma_min=1.0),
        mlflow=dict(enabled=False),
    )
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return TrainConfig(**base)


def weights(out, name="model.safetensors"):
    return load_st(storage.read_bytes(storage.join(out, "model", name)))


@pytest.fixture(scope="module")
def zero2_run(digits, mlflow_server, s3, tmp_path_factory):
    """Two workers, ZeRO-2, outputs in S3, tracked in the real MLflow server."""
    out = f"s3://ambient-test/train-{tmp_path_factory.mktemp('z2').name}"
    cfg = tcfg(
        digits,
        out,
        steps=30,
        num_workers=2,
        log_every=5,
        checkpoint_every=15,
        sample_grid=9,
        mlflow=dict(enabled=True, experiment="tests-train"),
    )
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def zero3_run(digits, mlflow_server, tmp_path_factory):
    """zero2_run's training (seed, data, steps) under ZeRO-3, outputs on local disk. A checkpoint every 10 steps
    (zero2_run: 15; checkpoints do not change the training), so that zero3_recovered below can die after one
    checkpoint and fail again after a later one."""
    cfg = tcfg(
        digits,
        str(tmp_path_factory.mktemp("z3") / "out"),
        steps=30,
        num_workers=2,
        zero_stage=3,
        log_every=5,
        checkpoint_every=10,
        mlflow=dict(enabled=True, experiment="tests-train"),
    )
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def zero3_recovered(zero3_run, tmp_path_factory):
    """zero3_run's training taking both recovery paths, in two Ray Train runs: it dies at step 11 (no restarts
    allowed), a plain re-run into its folder is refused, and it is resumed with --resume from the step-10
    checkpoint; the resumed run has a worker failure at step 21 and is restarted by FailureConfig from the step-20
    checkpoint it wrote itself (each rank loading its own ZeRO-3 EMA partitions both times).

    This one recovered folder serves the two tests that compare a recovered run with zero3_run (the failure/resume
    test and the ZeRO-3 restart test), which each made their own: four Ray Train runs (one uninterrupted
    reference, one restarted, one died, one resumed-and-restarted) are two. Returns (the config of a run into the
    recovered folder given its overrides, what happened: the first run's error, the marker after it, the refusal)."""
    cfg, _ = zero3_run
    out = tmp_path_factory.mktemp("z3-recovered") / "out"
    marker = out / "_debug_failed"

    def again(**kw):
        return TrainConfig.model_validate({**cfg.model_dump(), "out": str(out), "mlflow": {"enabled": False}, **kw})

    seen = {"died": None, "refused": None}
    try:  # a job that dies at step 11 (no restarts allowed) ...
        run(again(debug_fail_at_step=11, max_failures=0))
    except Exception as e:
        seen["died"] = e
    seen["marker"] = marker.exists()
    try:  # ... is refused without --resume ...
        run(again())
    except ConfigError as e:
        seen["refused"] = e
    # ... and resumed with --resume; its planted failure at step 21 is restarted by FailureConfig (one planted
    # failure per output folder: the marker is removed, so the resumed run fails once more)
    marker.unlink(missing_ok=True)
    run(again(resume=True, debug_fail_at_step=21, max_failures=1))
    return again, seen


def loss_history(run_id, key="loss"):
    hist = MlflowClient().get_metric_history(run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def denoising_loss(data, out=None, model=None, sigmas=(0.3, 0.6, 1.0, 2.0, 4.0), n=256):
    """EDM loss of a model on the dataset's clean rows at fixed σ's and noise (seeded): the trained
    raw weights in ``out``, or a fresh network of ``model`` (the initial weights of every run)."""
    import torch

    from ambient_ray.data.images import decode_png
    from ambient_ray.diffusion.edm import edm_loss
    from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser
    from ambient_ray.models.weights import load

    if out is not None:
        net = load(out, "denoiser", weights="raw")
    else:
        torch.manual_seed(0)
        net = build_denoiser(UNetConfig(**model)).eval()
    rows = [
        r
        for f in storage.list_files(storage.join(data, "data"), (".parquet",))
        for r in pq.read_table(f, columns=["image", "quality"]).to_pylist()
        if r["quality"] == "clean"
    ]
    y = torch.from_numpy(np.stack([decode_png(r["image"]).transpose(2, 0, 1) for r in rows[:n]])).float() / 127.5 - 1
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for s in sigmas:
            sig = torch.full((len(y),), s)
            x = y + s * torch.randn(y.shape, generator=g)
            total += float(edm_loss(net(x, sig), y, sig).mean())
    return total / len(sigmas)


def test_two_workers_zero2_loss_falls(zero2_run):
    cfg, summary = zero2_run
    losses = loss_history(summary["mlflow_run_id"])
    assert len(losses) == 6 and np.isfinite(losses).all()
    before, after = denoising_loss(cfg.data, model=cfg.model.model_dump()), denoising_loss(cfg.data, cfg.out)
    print(f"zero2 denoising loss: {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before, (before, after)


def test_two_workers_zero3_loss_falls(zero3_run, digits):
    cfg, summary = zero3_run
    losses = loss_history(summary["mlflow_run_id"])
    assert len(losses) == 6 and np.isfinite(losses).all()
    before, after = denoising_loss(digits, model=cfg.model.model_dump()), denoising_loss(digits, cfg.out)
    print(f"zero3 denoising loss: {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before, (before, after)
    w = weights(cfg.out)
    assert all(np.isfinite(v).all() for v in w.values()) and len(w) > 10  # ZeRO-3 shards were gathered


def max_diff(a, b):
    """The largest absolute difference over all tensors, and the largest absolute weight (the scale)."""
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a), max(float(np.abs(a[k]).max()) for k in a)


def test_zero3_ema_of_each_ranks_partitions_matches_zero2s_full_ema(zero2_run, zero3_run):
    """The same 30 steps on 2 workers: ZeRO-2 keeps the whole EMA on every rank, ZeRO-3 each rank's partition's,
    gathered at the checkpoint. The EMAs differ no more than the raw weights the two stages train."""
    from safetensors import safe_open

    (c2, _), (c3, s3) = zero2_run, zero3_run
    raw, scale = max_diff(weights(c2.out), weights(c3.out))
    ema, ema_scale = max_diff(weights(c2.out, "ema.safetensors"), weights(c3.out, "ema.safetensors"))
    print(
        f"ZeRO-2 vs ZeRO-3 after 30 steps: raw weights {raw:.2e} (scale {scale:.2f}), "
        f"EMA {ema:.2e} (scale {ema_scale:.2f})"
    )
    assert raw < 1e-4 * scale and ema <= max(2 * raw, 1e-5 * ema_scale), (raw, ema)  # measured: 2.3e-6, 2.2e-6
    # the checkpoint holds each rank's own partitions beside the gathered EMA: together, exactly the EMA
    full = weights(c3.out, "ema.safetensors")
    parts = []
    for r in range(2):
        with safe_open(f"{s3['checkpoint']}/ema-rank-{r:04d}.safetensors", framework="numpy") as f:
            assert f.metadata() == {"rank": str(r), "world": "2", "ema": "warmup"}
            parts.append({k: f.get_tensor(k) for k in f.keys()})
    assert parts[0].keys() == full.keys()
    for k, v in full.items():
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v.ravel(), err_msg=k)


def test_zero3_restart_restores_each_ranks_ema_partition(zero3_run, zero3_recovered):
    """A worker failure at step 21 under ZeRO-3, restarted from the step-20 checkpoint (each rank loads its
    own EMA partitions): the same final EMA and weights as zero3_run's uninterrupted run."""
    cfg, _ = zero3_run
    out = zero3_recovered[0]().out
    assert storage.exists(storage.join(out, "_debug_failed"))
    for name in ("ema.safetensors", "model.safetensors"):
        a, b = weights(cfg.out, name), weights(out, name)
        print(f"ZeRO-3 restarted vs uninterrupted, {name}: {max_diff(a, b)[0]:.2e}")
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")


def test_mlflow_run_has_params_metrics_and_artifacts(zero2_run, digits):
    cfg, summary = zero2_run
    client = MlflowClient()
    r = client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["ambient.lambda_max"] == "4.0" and r.data.params["zero_stage"] == "2"
    assert r.data.params["model.img_resolution"] == "8"
    for key in ("loss", "lr", "images_per_s", "draws_bucket_05", "eligible_bucket_05"):
        assert key in r.data.metrics, key
    assert any(k.startswith("loss_bucket_") for k in r.data.metrics)
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"coverage.png", "coverage.json", "samples.png", "config.yaml"} <= names
    # the artifacts live in SeaweedFS
    keys = [
        o["Key"]
        for o in storage.s3_client()
        .list_objects_v2(Bucket="ambient-test", Prefix="mlflow-artifacts/")
        .get("Contents", [])
    ]
    assert any(k.endswith(f"{r.info.run_id}/artifacts/coverage.png") for k in keys)
    # and the outputs in S3: inference weights, σ coverage with clean rows eligible at the lowest bucket
    assert storage.exists(storage.join(cfg.out, "model", "ema.safetensors"))
    cov = json.loads(storage.read_bytes(storage.join(cfg.out, "coverage.json")))
    assert cov["donut"][0]["eligible_full"] < cov["donut"][-1]["eligible_full"]
    # dataset-wide, over both workers: every row is eligible at the top, only the clean ones at the bottom
    shards = storage.list_files(storage.join(digits, "data"), (".parquet",))
    n_clean = sum(pq.read_table(f, columns=["quality"]).column("quality").to_pylist().count("clean") for f in shards)
    assert cov["rows"] == 1797 and cov["donut"][-1]["eligible_full"] == 1797
    assert cov["donut"][0]["eligible_full"] == n_clean == round(0.3 * 1797)
    assert sum(d["draws"] for d in cov["donut"]) == cfg.steps * cfg.batch_size * cfg.num_workers


def test_failure_restart_and_resume_match_an_uninterrupted_run(zero3_run, zero3_recovered):
    """One interrupted run takes both recovery paths (zero3_recovered: it dies at step 11 and is resumed with
    --resume from the step-10 checkpoint; the resumed run has a worker failure at step 21 and is restarted by
    FailureConfig from the step-20 checkpoint); it ends with the uninterrupted run's (zero3_run's) weights."""
    cfg, _ = zero3_run
    again, seen = zero3_recovered
    resumed = again().out
    # the job that died at step 11 (no restarts allowed) raised, and left its marker ...
    assert seen["died"] is not None and seen["marker"]
    # ... a plain re-run into its folder was refused, naming --resume ...
    assert isinstance(seen["refused"], ConfigError) and re.search("--resume", str(seen["refused"]))
    # ... and the resumed run failed once more (the marker was removed before it) and still finished
    assert storage.exists(storage.join(resumed, "_debug_failed"))
    a, b = weights(cfg.out), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(ConfigError, match="another model config.*model_channels"):
        run(again(resume=True, model=dict(cfg.model.model_dump(), model_channels=8)))


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_bad_data_is_refused_before_training(digits, tmp_path):
    rows = pq.read_table(storage.list_files(storage.join(digits, "data"))[0]).to_pylist()[:40]
    bad = tmp_path / "nan"
    bad.mkdir()
    write_rows(bad / "p.parquet", [dict(r, sigma_min=float("nan") if i == 3 else 0.5) for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match="sigma_min must be finite and >= 0.*1 rows"):
        run(tcfg(str(bad), str(tmp_path / "o1")))
    neg = tmp_path / "neg"
    neg.mkdir()
    write_rows(neg / "p.parquet", [dict(r, sigma_min=-1.0) for r in rows])
    with pytest.raises(ValueError, match="sigma_min must be finite"):
        run(tcfg(str(neg), str(tmp_path / "o2")))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_rows(mixed / "p.parquet", [dict(r, height=16, width=16) if i < 5 else r for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match="mixed shapes"):
        run(tcfg(str(mixed), str(tmp_path / "o3")))
    with pytest.raises(ConfigError, match="model.img_resolution"):
        run(tcfg(digits, str(tmp_path / "o4"), model=dict(img_resolution=16)))
    assert not storage.exists(str(tmp_path / "o1" / "ray"))


def test_sample_stage_from_a_trained_model(zero2_run, tmp_path):
    from ambient_ray.models.weights import load
    from ambient_ray.stages.sample import SampleConfig
    from ambient_ray.stages.sample import run as sample_run

    cfg, _ = zero2_run
    s = sample_run(
        SampleConfig(
            checkpoint=cfg.out, out=str(tmp_path / "s"), num=10, sampler=dict(steps=6), mlflow=dict(enabled=False)
        )
    )
    imgs = np.load(s["samples"])
    assert imgs.shape == (10, 8, 8, 1) and imgs.dtype == np.uint8 and imgs.std() > 0
    assert (tmp_path / "s" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    again = sample_run(
        SampleConfig(
            checkpoint=cfg.out, out=str(tmp_path / "s2"), num=10, sampler=dict(steps=6), mlflow=dict(enabled=False)
        )
    )
    assert (np.load(again["samples"]) == imgs).all()  # seeded
    # weights that do not fit the model.json are refused
    bad = tmp_path / "badmodel"
    bad.mkdir()
    meta = json.loads(storage.read_bytes(storage.join(cfg.out, "model", "model.json")))
    meta["model"]["model_channels"] = 8
    (bad / "model.json").write_text(json.dumps(meta))
    (bad / "ema.safetensors").write_bytes(storage.read_bytes(storage.join(cfg.out, "model", "ema.safetensors")))
    with pytest.raises(ValueError, match="do not fit"):
        load(str(bad), "denoiser")


def test_cli_train_with_zero_offload_then_sample(digits, tmp_path, capsys):
    """The CLI end to end (train, refusals, sample), on ZeRO-2 with the optimizer states offloaded to
    DeepSpeed's CPU Adam (built on first use): one Ray Train run serves both checks."""
    import torch

    from ambient_ray.cli import main
    from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser

    out = str(tmp_path / "cli")
    common = [
        "--set",
        "model.img_resolution=8",
        "--set",
        "model.model_channels=16",
        "--set",
        "batch_size=16",
        "--set",
        "mlflow.enabled=false",
        "--set",
        "sample_grid=0",
        "--set",
        "checkpoint_every=4",
        "--set",
        "zero_stage=2",
        "--set",
        "offload_optimizer=true",
        "--set",
        "optim.lr=2e-3",
        "--set",
        "optim.warmup_steps=2",
    ]
    # a misspelt key is refused with its name, before any work
    assert main(["train", "--data", digits, "--out", out, *common, "--set", "optim.lr_rate=1"]) == 2
    assert "optim.lr_rate" in capsys.readouterr().err
    assert not storage.exists(storage.join(out, "ray"))
    assert main(["train", "--data", digits, "--out", out, "--steps", "4", *common]) == 0
    printed = capsys.readouterr().out
    assert "every row treated as clean" in printed and "rows marked corrupted train as clean" in printed
    assert storage.exists(storage.join(out, "model", "ema.safetensors"))
    # ZeRO-Offload trained: (almost) every tensor moved from the initial weights (same seed, same model config)
    meta = json.loads(storage.read_bytes(storage.join(out, "model", "model.json")))
    assert meta["model"]["model_channels"] == 16
    torch.manual_seed(0)  # the default seed
    init = {k: v.detach().numpy() for k, v in build_denoiser(UNetConfig(**meta["model"])).named_parameters()}
    trained = weights(out)
    assert trained.keys() == init.keys() and all(np.isfinite(v).all() for v in trained.values())
    moved = sum(float(np.abs(trained[k] - init[k]).max()) > 1e-6 for k in init)
    assert moved > 0.8 * len(init), f"only {moved} of {len(init)} tensors changed"
    # running again into the same --out without --resume is refused (exit 2, names the flag)
    assert main(["train", "--data", digits, "--out", out, "--steps", "4", *common]) == 2
    assert "--resume" in capsys.readouterr().err
    samples = str(tmp_path / "samples")
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                out,
                "--num",
                "5",
                "--steps",
                "3",
                "--out",
                samples,
                "--set",
                "mlflow.enabled=false",
            ]
        )
        == 0
    )
    assert np.load(storage.join(samples, "samples.npy")).shape == (5, 8, 8, 1)


def test_zero_offload_needs_a_zero_stage(digits, tmp_path):
    """ZeRO-Offload without ZeRO is refused before any worker starts (the offloaded run itself: above)."""
    with pytest.raises(ConfigError, match="offload_optimizer"):
        run(tcfg(digits, str(tmp_path / "o0"), zero_stage=0, offload_optimizer=True))
    assert not storage.exists(str(tmp_path / "o0" / "ray"))
