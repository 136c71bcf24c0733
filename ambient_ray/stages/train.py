"""The train stage: Ambient-o training on Ray Train (TorchTrainer) with DeepSpeed ZeRO, tracked in MLflow.

Driver: validate the dataset (columns, σ annotations, one image shape) before any worker starts,
open or reuse the MLflow run, read the Parquet shards with Ray Data (materialized before the workers
take their CPUs), and run a ``TorchTrainer`` whose storage is ``OUT/ray``.
Worker: iterate the dataset, keep this rank's rows (a stable hash of ``id``, so a
restarted worker gets the same rows), hold them as uint8, and train: draw σ first, pair it with an
eligible sample (:class:`ambient_ray.diffusion.ambient.SigmaSampler`), add the sample's own σ_n noise, and take
the ambient loss. Checkpoints hold the DeepSpeed state, the EMA weights and each rank's random state;
a restarted or ``--resume``d run continues exactly where its last checkpoint left it.

Outputs under OUT: ``ray/train/checkpoint_*`` (Ray Train checkpoints), ``model/ema.safetensors``,
``model/model.safetensors`` and ``model/model.json`` (inference weights and the config to rebuild
the network), ``coverage.json`` and ``coverage.png`` (the σ donut), ``samples.png``, ``config.yaml``,
``mlflow_run.json``.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
from pydantic import Field

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict
from ambient_ray.data.metadata import load_metadata
from ambient_ray.diffusion import ambient, edm
from ambient_ray.io import storage
from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser
from ambient_ray.train import engine
from ambient_ray.train.engine import EngineConfig


class AmbientConfig(Strict):
    lambda_max: float = Field(4.0, gt=1.0, description="buffer: σ > sqrt(1 + 1/(λ_max − 1))·σ_min (Eq. D.2)")
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    corrupted_sigma_min: float | None = Field(
        None, ge=0, description="σ_min for rows with quality=corrupted when the data has no sigma_min column"
    )
    crop_sigmas: list[float] = Field(default_factory=list, description="crop(σ) table: σ thresholds, ascending")
    crop_sizes: list[int] = Field(default_factory=list, description="crop(σ) table: crop size for σ ≤ each threshold")


class TrainConfig(EngineConfig):
    """Config of ``ambient-ray train`` (the engine's keys, plus the model and the ambient objective)."""

    model: UNetConfig = Field(default_factory=UNetConfig)
    ambient: AmbientConfig = Field(default_factory=AmbientConfig)
    sample_grid: int = Field(16, ge=0, description="samples drawn from the EMA model at the end (0: none)")
    rows: str | None = Field(
        None, description="train only on the rows this filter selects, FIELD=V1[,V2] (e.g. quality=clean)"
    )
    val_rows: int = Field(64, ge=1, description="with report_every: clean rows per worker for the validation loss")


# ------------------------------------------------------------------------------ data


def resolve_sigmas(meta, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """σ_min and σ_max per row, and where they came from."""
    n = len(meta)
    if "sigma_min" in meta:
        smin = meta["sigma_min"].to_numpy(dtype=np.float64, na_value=np.nan)
        origin = "sigma_min column"
    elif cfg.ambient.corrupted_sigma_min is not None and "quality" in meta:
        smin = np.where(meta["quality"].to_numpy() == "corrupted", cfg.ambient.corrupted_sigma_min, 0.0)
        origin = f"fixed sigma_min={cfg.ambient.corrupted_sigma_min} for quality=corrupted"
    else:
        smin = np.zeros(n)
        origin = "no sigma_min column: every row treated as clean (plain EDM)"
        n_bad = int((meta["quality"] == "corrupted").sum()) if "quality" in meta else 0
        if n_bad:
            origin += f"; warning: {n_bad} rows marked corrupted train as clean (annotate them, or set ambient.corrupted_sigma_min)"
    bad = ~np.isfinite(smin) | (smin < 0)
    if bad.any():
        rows = meta["id"][bad].head(5).tolist()
        raise ValueError(
            f"sigma_min must be finite and >= 0: {int(bad.sum())} rows are not, e.g. {rows} = {smin[bad][:5].tolist()}"
        )
    smax = meta["sigma_max"].to_numpy(dtype=np.float64, na_value=0.0) if "sigma_max" in meta else np.zeros(n)
    if (~np.isfinite(smax) | (smax < 0)).any():
        raise ValueError("sigma_max must be finite and >= 0")
    if (smax > 0).any() and not cfg.ambient.crop_sigmas:
        raise ConfigError(
            "the data has sigma_max > 0 (crops annotation) but ambient.crop_sigmas/crop_sizes are not set"
        )
    return smin.astype(np.float32), smax.astype(np.float32), origin


def load_crop_table(cfg: TrainConfig) -> None:
    """Without a crop(σ) table in the config, take ``locality.json`` beside the data (annotate writes it)."""
    table_uri = storage.join(storage.normalize(cfg.data), "locality.json")
    if not cfg.ambient.crop_sigmas and storage.exists(table_uri):
        from ambient_ray.stages.locality import read_table

        table = read_table(table_uri)
        cfg.ambient.crop_sigmas, cfg.ambient.crop_sizes = table["sigmas"], table["crop"]


def model_meta(cfg: TrainConfig) -> dict:
    """``model.json``: what rebuilds the network for sampling."""
    return {"kind": "denoiser", "model": cfg.model.model_dump(mode="json"), "sigma_data": cfg.ambient.sigma_data}


# ------------------------------------------------------------------------------ worker


def train_loop(config: dict) -> None:
    """Ray Train worker function (config: the TrainConfig as a dict plus the σ annotations)."""
    cfg = TrainConfig.model_validate(config["cfg"])
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    w = engine.Worker(cfg, build_denoiser(cfg.model, sigma_data=cfg.ambient.sigma_data), model_meta(cfg), config)
    rank, world, device = w.rank, w.world, w.device
    per_row = {"sigma_min": config["sigma_min"], "sigma_max": config["sigma_max"]}
    ids, images, cols, labels = engine.load_rank_rows(rank, world, per_row, cfg.model.label_dim)
    smin, smax = cols["sigma_min"], cols["sigma_max"]
    a = cfg.ambient
    crop = ambient.CropTable(a.crop_sigmas, a.crop_sizes) if a.crop_sigmas else None
    sampler = ambient.SigmaSampler(smin, smax, lambda_max=a.lambda_max, p_mean=a.p_mean, p_std=a.p_std, crop=crop)
    # rank 0's dataset-wide view for the σ donut: eligible counts over all rows, draws summed over ranks
    view = None
    if rank == 0:
        all_min, all_max = (torch.tensor(list(config[k].values())) for k in ("sigma_min", "sigma_max"))
        view = ambient.SigmaSampler(
            all_min, all_max, lambda_max=a.lambda_max, p_mean=a.p_mean, p_std=a.p_std, crop=crop
        )
    state = w.restore()
    if state:
        sampler.load_state_dict({k[len("sampler.") :]: v for k, v in state.items() if k.startswith("sampler.")})

    val_rows = _validation_rows(smin, cfg.val_rows) if cfg.report_every else None
    n_buckets = len(sampler.coverage.edges) - 1
    bucket_loss, bucket_n = torch.zeros(n_buckets), torch.zeros(n_buckets)
    t_last, seen = time.perf_counter(), 0
    gen = w.generator
    while w.step < cfg.steps:
        for _ in range(cfg.optim.grad_accum):
            b = ambient.ambient_batch(sampler, images, smin, cfg.batch_size, gen)
            cl = labels[b.index].to(device) if labels is not None else None
            # x_σ and σ stay fp32: the denoiser computes its preconditioning in fp32 and casts the
            # network input to the parameters' dtype (bf16 under DeepSpeed on GPU) itself
            d_out = w.engine(b.x_sigma.to(device), b.sigma.to(device), cl).float()
            loss, per_sample = ambient.batch_loss(d_out, b, cfg.ambient.sigma_data)
            w.engine.backward(loss)
            w.engine.step()
            k = sampler.coverage.bucket(b.sigma)
            bucket_loss.index_add_(0, k, per_sample.detach().float().cpu())
            bucket_n.index_add_(0, k, torch.ones_like(b.sigma))
            seen += cfg.batch_size
        log_now, checkpoint_now = w.end_step()
        step = w.step
        if log_now:
            now = time.perf_counter()
            # summed over ranks: the interval's loss per σ bucket, and the σ-coverage counters
            c = sampler.coverage
            sums = w.all_reduce(
                torch.cat(
                    [bucket_loss, bucket_n, c.draws, c.full_draws, c.crop_draws, torch.tensor([c.redraws])]
                ).double()
            )
            b_loss, b_n, draws, full_draws, crop_draws, redraws = sums.split([n_buckets] * 5 + [1])
            if view is not None:
                vc = view.coverage
                vc.draws, vc.full_draws, vc.crop_draws = draws.long(), full_draws.long(), crop_draws.long()
                vc.redraws = int(redraws)
            metrics = {
                "step": step,
                "loss": float(b_loss.sum() / b_n.sum().clamp(min=1)),
                "lr": float(w.scheduler.get_last_lr()[0]),
                "images_per_s": seen * world / max(now - t_last, 1e-9),
            }
            buckets = {f"loss_bucket_{i:02d}": float(b_loss[i] / b_n[i]) for i in range(n_buckets) if b_n[i] > 0}
            if val_rows is not None and (checkpoint_now or w.report_due()):  # only what goes to Ray Train
                metrics.update(_validation(w, images, labels, val_rows, cfg))
            if rank == 0:
                engine.progress_line(
                    "train",
                    f"step {step}/{cfg.steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['images_per_s']:.0f} images/s",
                )
                w.log({**metrics, **buckets}, _donut_metrics(view, step))
            bucket_loss.zero_()
            bucket_n.zero_()
            t_last, seen = now, 0
            if checkpoint_now:
                files = None
                if rank == 0:
                    files = {
                        "coverage.json": json.dumps(
                            {"donut": view.donut(), "redraws": view.coverage.redraws, "rows": view.n}
                        )
                    }
                w.save_and_report(metrics, {f"sampler.{k}": v for k, v in sampler.state_dict().items()}, files)
            elif w.report_due():
                w.report(metrics)


VAL_LOSS_CAP = 1e12


def _validation_rows(smin: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's validation rows: its first ``n`` clean rows (σ_min = 0), or its first ``n`` rows if none is clean."""
    clean = torch.nonzero(smin == 0).flatten()
    return (clean if len(clean) else torch.arange(len(smin)))[:n]


def _validation(w, images: torch.Tensor, labels, rows: torch.Tensor, cfg: TrainConfig) -> dict:
    """``val_loss`` (the mean over the fixed σ grid) and ``val_loss_sigma_<σ>``, over every rank's validation rows."""
    y = images[rows].float().div(127.5).sub(1.0)
    lab = labels[rows].to(w.device) if labels is not None else None
    was_training = w.engine.module.training
    w.engine.module.eval()
    sums = edm.validation_losses(
        lambda x, s, c: w.engine(x.to(w.device), s.to(w.device), c),
        y,
        sigma_data=cfg.ambient.sigma_data,
        seed=cfg.seed + 7919,
        labels=lab,
    )
    w.engine.module.train(was_training)
    total = w.all_reduce(torch.cat([sums, torch.tensor([float(len(rows))])]).double())
    per_sigma = total[:-1] / total[-1].clamp(min=1)
    # a diverged run reports VAL_LOSS_CAP, not NaN or inf: schedulers compare with <, where NaN is never
    # worse, and take percentiles, where inf makes NaN
    vals = [min(v, VAL_LOSS_CAP) if math.isfinite(v) else VAL_LOSS_CAP for v in per_sigma.tolist()]
    out = {f"val_loss_sigma_{s:g}": v for s, v in zip(edm.VAL_SIGMAS, vals)}
    out["val_loss"] = float(sum(vals) / len(vals))
    return out


def _donut_metrics(view, step: int) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = []
    for i, row in enumerate(view.donut()):
        items.append(Metric(f"draws_bucket_{i:02d}", float(row["draws"]), ts, step))
        items.append(Metric(f"eligible_bucket_{i:02d}", float(row["eligible_full"] + row["eligible_crops"]), ts, step))
    return items


# ------------------------------------------------------------------------------ driver


def run(cfg: TrainConfig, callbacks: list | None = None) -> dict:
    """Train; returns a summary dict (out URIs, MLflow run id, final metrics). ``callbacks``: Ray Train
    ``UserCallback``s (a Ray Tune trial passes the one that forwards each report to Tune)."""
    from ambient_ray.io import tracking

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    meta = load_metadata(cfg.data)
    if cfg.rows:
        from ambient_ray.data.metadata import match

        meta = meta[match(meta, cfg.rows)].reset_index(drop=True)
        if meta.empty:
            raise ConfigError(f"config key 'rows': no row of {cfg.data} matches {cfg.rows!r}")
    load_crop_table(cfg)
    smin, smax, origin = resolve_sigmas(meta, cfg)
    engine.check_run(cfg, meta, cfg.model.img_resolution, cfg.model.in_channels)
    engine.check_resume(cfg, out, model_meta(cfg))
    cfgmod.save_resolved(cfg, out)

    run_id, uri = tracking.start_run(
        cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": "train", "sigma_min": origin}
    )
    print(
        f"train: {len(meta)} rows"
        + (f" with {cfg.rows}" if cfg.rows else "")
        + f" ({origin})"
        + (f"; MLflow run {run_id} at {uri}" if run_id else "; MLflow off")
    )
    ids = meta["id"].tolist()
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "sigma_min": dict(zip(ids, smin.tolist())),
        "sigma_max": dict(zip(ids, smax.tolist())),
        "mlflow_run_id": run_id,
        "mlflow_uri": uri,
    }
    t0 = time.perf_counter()
    result = engine.fit(
        cfg,
        train_loop,
        loop_config,
        [c for c in ("id", "image", "label") if c in meta.columns or c == "image"],
        callbacks,
    )
    seconds = time.perf_counter() - t0
    ckpt = engine.latest_checkpoint(out)
    summary = {
        "out": out,
        "checkpoint": ckpt,
        "mlflow_run_id": run_id,
        "mlflow_uri": uri,
        "seconds": seconds,
        "metrics": result.metrics,
        "rows": len(meta),
        "sigma_min": origin,
    }
    finish_training(cfg, out, ckpt, run_id, uri)
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1, default=str).encode())
    return summary


def finish_training(cfg, out: str, ckpt: str | None, run_id: str | None, uri: str | None) -> None:
    """Export inference weights, draw the σ donut and a sample grid, and log them to the run."""
    from ambient_ray.io import plots, tracking

    files: dict[str, bytes] = {"config.yaml": storage.read_bytes(storage.join(out, "config.yaml"))}
    if ckpt:
        engine.export_weights(out, ckpt)
        cov = json.loads(storage.read_bytes(storage.join(ckpt, "coverage.json")))
        storage.write_bytes(storage.join(out, "coverage.json"), json.dumps(cov, indent=1).encode())
        png = plots.coverage_plot(cov["donut"], title=f"σ coverage (λ_max={cfg.ambient.lambda_max})")
        storage.write_bytes(storage.join(out, "coverage.png"), png)
        files.update({"coverage.png": png, "coverage.json": json.dumps(cov).encode()})
        if cfg.sample_grid:
            from ambient_ray.stages.sample import draw, load_denoiser

            net = load_denoiser(storage.join(out, "model"))
            imgs = draw(net, cfg.sample_grid, seed=cfg.seed)
            grid = plots.image_grid_png(imgs)
            storage.write_bytes(storage.join(out, "samples.png"), grid)
            files["samples.png"] = grid
    tracking.log_files(run_id, uri, files)
    tracking.finish(run_id, uri, tags={"checkpoint": ckpt or "", "model": storage.join(out, "model")})
