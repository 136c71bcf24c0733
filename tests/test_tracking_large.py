"""MLflow for large runs: a short real training run (2 CPU workers, ZeRO-2) against the test MLflow server holds
the run's size as params, throughput and memory as metrics, each node's system metrics, fixed-label sample grids,
checkpoints referenced by URI and the exported weights registered as a model version; and the pure-torch counts
(parameters, FLOPs per image, device peaks) they rest on."""

from __future__ import annotations

import dataclasses
import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_ray.io import storage, tracking
from ambient_ray.train import perf


def test_peak_table_by_device_name():
    assert perf.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert perf.peak_tflops("NVIDIA H100 PCIe") == 756.0  # before the SXM part's "H100"
    assert perf.peak_tflops("NVIDIA H200") == 989.0
    assert perf.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert perf.peak_tflops("NVIDIA L40S") == 362.0 and perf.peak_tflops("NVIDIA L4") == 121.0
    assert perf.peak_tflops("cpu") is None


def test_flop_count_of_an_mlp_is_exact():
    """2 FLOPs per multiply-add; the training step adds the weight gradients of both layers and the input gradient
    of the second (the data takes none)."""
    d_in, hidden, d_out = 12, 32, 5

    def build():
        return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, d_out))

    c = perf.count(build, lambda b: (torch.zeros(b, d_in),), batch=3)
    assert c.parameters == d_in * hidden + hidden + hidden * d_out + d_out
    assert c.flops_forward == 2 * (d_in * hidden + hidden * d_out)
    assert c.flops_train == 2 * (2 * d_in * hidden + 3 * hidden * d_out)
    got = perf.achieved(c, images=1e6, seconds=2.0, devices=4, peak=10.0)
    assert got["tflop_per_s"] == pytest.approx(c.flops_train * 1e6 / 2 / 1e12)
    assert got["mfu"] == pytest.approx(got["tflop_per_s"] / 40.0)
    assert "mfu" not in perf.achieved(c, images=1.0, seconds=1.0, devices=1, peak=None)


def test_edm2_xs_counts_match_the_paper():
    """EDM2 Table 2, XS on 64x64x4 latents with 1000 classes: 125M parameters, 46 Gflops per image (EDM2 counts a
    multiply-add as one flop, the MFU convention here as two)."""
    from ambient_ray.train.tasks.denoiser_data import denoiser_costs

    model = {"arch": "edm2", "preset": "edm2-xs", "img_resolution": 64, "in_channels": 4, "label_dim": 1000}
    c = denoiser_costs({"kind": "denoiser", "arch": "edm2", "model": model, "sigma_data": 0.5})
    assert c is not None
    assert abs(c.parameters - 125e6) / 125e6 < 0.01
    assert abs(c.flops_forward / 2 - 46e9) / 46e9 < 0.05
    assert 2.9 < c.flops_train / c.flops_forward < 3.1


def test_a_server_refuses_a_local_path_as_model_source(mlflow_server, tmp_path, capsys):
    mcfg = tracking.MlflowConfig(tracking_uri=mlflow_server.url, experiment=f"reg-{os.getpid()}-{time.time_ns()}")
    run_id, uri = tracking.start_run(mcfg, str(tmp_path / "job"), {})
    assert tracking.register_model(run_id, uri, "local-path-model", str(tmp_path / "model")) is None
    assert "takes no local path as a model source" in capsys.readouterr().err
    tracking.finish(run_id, uri)


@pytest.fixture(scope="module")
def digits(blurred_digits):
    return blurred_digits


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_large_run_logs_size_throughput_system_grids_checkpoints_and_a_model_version(
    digits, mlflow_server, s3_prefix, tmp_path
):
    from mlflow.tracking import MlflowClient

    from ambient_ray.io import plots
    from ambient_ray.io.checkpoint import latest_checkpoint
    from ambient_ray.models import weights
    from ambient_ray.sampling import SamplerConfig
    from ambient_ray.sampling.draw import draw
    from ambient_ray.stages.train import TrainConfig, run

    tag = f"{os.getpid()}-{time.time_ns()}"
    out = f"{s3_prefix}/train"  # on S3: a tracking server registers only a source it could read itself
    cfg = TrainConfig(
        data=digits,
        out=out,
        steps=10,
        batch_size=16,
        num_workers=2,
        zero_stage=2,
        log_every=5,
        checkpoint_every=5,
        grid_every=5,
        grid_images=4,
        grid_sampler_steps=3,
        sample_grid=0,
        peak_tflops=0.5,
        model=dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2], label_dim=10),
        optim=dict(lr=2e-3, warmup_steps=2),
        ambient=dict(corrupted_sigma_min=1.0),
        mlflow=dict(experiment=f"large-{tag}", system_metrics_interval=0.5, registered_model=f"digits-{tag}"),
    )
    summary = run(cfg)
    client = MlflowClient(mlflow_server.url)
    run_id = summary["mlflow_run_id"]
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"

    # params: the run's size, the parameter count that of the exported network
    p = got.data.params
    net = weights.load(out, "denoiser")
    assert int(p["parameters"]) == sum(t.numel() for t in net.parameters())
    assert p["world_size"] == "2" and p["global_batch"] == "32"
    fwd, step = int(p["flops_per_image_forward"]), int(p["flops_per_image_train"])
    assert fwd > 0 and 2.9 < step / fwd < 3.1

    # metrics: throughput as model FLOPs over the same interval as images/s, MFU against the configured peak
    m = got.data.metrics
    assert m["tflop_per_s"] == pytest.approx(m["images_per_s"] * step / 1e12, rel=1e-6)
    assert m["mfu"] == pytest.approx(m["tflop_per_s"] / (0.5 * 2), rel=1e-6)
    assert 0.1 < m["peak_rss_gib"] < 64 and "peak_gpu_memory_gib" not in m  # CPU: peak RSS, the largest rank's
    assert [x.step for x in client.get_metric_history(run_id, "mfu")] == [5, 10]

    # system metrics of the one node, from its first worker
    system = [k for k in m if k.startswith("system/")]
    assert "system/node_0/cpu_utilization_percentage" in system, system
    assert "system/node_0/system_memory_usage_megabytes" in system

    # grids of the EMA weights every grid_every steps; the last one is the exported EMA's, same seed and labels
    assert [a.path for a in client.list_artifacts(run_id, "grids")] == [
        "grids/grid_0000005.png",
        "grids/grid_0000010.png",
    ]
    last = _png(open(client.download_artifacts(run_id, "grids/grid_0000010.png", str(tmp_path)), "rb").read())
    first = _png(open(client.download_artifacts(run_id, "grids/grid_0000005.png", str(tmp_path)), "rb").read())
    assert last.shape == first.shape and not np.array_equal(last, first)
    again = _png(plots.image_grid_png(draw(net, 4, SamplerConfig(steps=3), seed=cfg.seed)))
    assert last.shape == again.shape
    assert np.mean(np.abs(last.astype(int) - again.astype(int)) > 1) < 0.01  # float noise of thread counts at most

    # checkpoints by URI, never uploaded; the tag followed each checkpoint
    ckpt = latest_checkpoint(out)
    assert got.data.tags["checkpoint"] == ckpt and ckpt.startswith(out + "/ray/train/checkpoint_")
    assert got.data.tags["checkpoint_step"] == "10"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top <= {"config.yaml", "coverage.png", "coverage.json", "grids"}, top
    assert storage.exists(storage.join(ckpt, "ema.safetensors"))

    # the exported weights as a registered model version: referenced by URI, linked to the run and checkpoint
    name = f"digits-{tag}"
    version = client.get_model_version(name, "1")
    assert version.source == storage.join(out, "model") and version.run_id == run_id
    assert version.tags["checkpoint"] == ckpt
    assert got.data.tags["registered_model"] == f"{name}/1"


def test_a_masked_dits_costs_count_the_flops_run_active_parameters_and_tokens():
    """What a large text-to-image run logs (perf.count_denoiser, the train stage's mask ratio passed in): the FLOPs
    of the patch-masked step (MFU is counted on those), the active parameters, and the kept tokens per image and
    per optimizer step."""
    from ambient_ray.train import planner

    meta = planner.preset_meta("dit-tiny")
    full, masked = perf.count_denoiser(meta), perf.count_denoiser(meta, mask_ratio=0.75)
    net = planner.meta_model(meta)
    assert masked.parameters == full.parameters == sum(p.numel() for p in net.parameters())
    assert masked.active_parameters == net.active_parameters() < masked.parameters
    assert (full.tokens_per_image, masked.tokens_per_image) == (256, 64)
    assert masked.flops_forward == planner.flops_per_image(meta, 0.75) < 0.7 * full.flops_forward
    assert 2.9 < masked.flops_train / masked.flops_forward < 3.1
    p = masked.params(global_batch=32)
    assert (p["active_parameters"], p["tokens_per_image"], p["tokens_per_step"]) == (net.active_parameters(), 64, 2048)
    assert perf.Costs(**dataclasses.asdict(masked)) == masked  # as the engine's workers get it
    got = perf.achieved(masked, images=100, seconds=2.0, devices=2, peak=1.0)
    assert got["tokens_per_s"] == 64 * 50
    assert got["mfu"] == pytest.approx(masked.flops_train * 50 / 1e12 / 2)
    # no tokens for a U-Net, and no patch masking either
    edm2 = planner.preset_meta("edm2-tiny", img_resolution=16, label_dim=10)
    unet = perf.count_denoiser(edm2)
    assert unet.tokens_per_image is None and unet.active_parameters is None and "tokens_per_step" not in unet.params(64)
    with pytest.raises(Exception, match="mask_ratio"):
        perf.count_denoiser(edm2, mask_ratio=0.5)
