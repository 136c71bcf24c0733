"""The train stage: Ambient-o training on Ray Train (TorchTrainer) with DeepSpeed ZeRO, tracked in MLflow.

The objective (``objective``, default ``ambient``: :mod:`ambient_ray.train.objectives`) prepares the run.
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

from ambient_ray.io import storage
from ambient_ray.models import registry
from ambient_ray.stages.results import TrainResult
from ambient_ray.train import driver, objectives
from ambient_ray.train.tasks.denoiser_config import TrainConfig


def run(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train; returns a summary dict (out URIs, MLflow run id, final metrics). ``callbacks``: Ray Train
    ``UserCallback``s (a Ray Tune trial passes the one that forwards each report to Tune)."""
    objective = objectives.for_stage(cfg.objective, "train")
    storage.check_reachable(storage.normalize(cfg.out))
    prepared = objective.prepare(cfg)
    return driver.train(
        cfg, prepared, stage="train", artifacts=lambda out, ckpt: artifacts(cfg, out, ckpt), callbacks=callbacks
    )


def artifacts(cfg: TrainConfig, out: str, ckpt: str) -> dict[str, bytes]:
    """The σ donut (``coverage.json``, ``coverage.png``) of the last checkpoint and a sample grid of its EMA."""
    from ambient_ray.io import plots
    from ambient_ray.models.weights import load
    from ambient_ray.sampling import SamplerConfig, encode_prompts
    from ambient_ray.sampling.draw import draw

    cov = json.loads(storage.read_bytes(storage.join(ckpt, "coverage.json")))
    storage.write_bytes(storage.join(out, "coverage.json"), json.dumps(cov, indent=1).encode())
    png = plots.coverage_plot(cov["donut"], title=f"σ coverage (λ_max={cfg.ambient.lambda_max})")
    storage.write_bytes(storage.join(out, "coverage.png"), png)
    files = {"coverage.png": png, "coverage.json": json.dumps(cov).encode()}
    for name, part in cov.get("sources", {}).items():  # each source's (or row kind's) donut
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        group = cov.get("group", "source")
        files[f"coverage_{safe}.png"] = p = plots.coverage_plot(part["donut"], title=f"σ coverage of {group} {name}")
        storage.write_bytes(storage.join(out, f"coverage_{safe}.png"), p)
    if cfg.sample_grid:
        net, kw, sampler = load(storage.join(out, "model"), "denoiser"), {}, SamplerConfig()  # EDM's Heun sampler
        if net.meta.get("masked"):  # a network of masked data: the fixed-mask sampler (seed 003 Eq. 3.3)
            sampler = SamplerConfig(name="fixed-mask")
        if registry.takes_captions(cfg.model.arch) and cfg.text.prompts:  # else the null caption, unguided
            kw = {"captions": encode_prompts(net.meta, cfg.text.prompts)}
            sampler = SamplerConfig(name="classifier-free", guidance=cfg.text.guidance)
        imgs = draw(net, cfg.sample_grid, sampler, seed=cfg.seed, **kw)
        files["samples.png"] = grid = plots.image_grid_png(imgs)
        storage.write_bytes(storage.join(out, "samples.png"), grid)
    return files
