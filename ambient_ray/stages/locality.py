"""The locality stage of Ambient-o (Sec. 3.2): the map crop(σ) (:mod:`ambient_ray.diffusion.locality`) on data.

Stage (``ambient-ray locality --checkpoint DENOISER --data URI --out URI``): the map on clean rows of
the data, written as ``OUT/locality.json`` (σ grid, contexts, losses, crop(σ), ε) and
``OUT/locality.png``. The annotate stage takes it (``--locality``) to size the crops of σ_max and
copies it beside the annotated data, where ``train`` finds it as its crop(σ) table.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import Field

from ambient_ray.config import Strict, flag
from ambient_ray.io import storage
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages.results import LocalityResult


class LocalityConfig(Strict):
    """Config of ``ambient-ray locality``."""

    checkpoint: str = Field(
        ...,
        description="a trained denoiser: a train output folder (or its model/)",
        json_schema_extra=flag("--checkpoint"),
    )
    data: str = Field(
        ..., description="dataset URI; the map is measured on its clean rows", json_schema_extra=flag("--data")
    )
    out: str = Field(..., description="output URI", json_schema_extra=flag("--out"))
    sigma_lo: float = Field(0.02, gt=0, description="σ grid's low end")
    sigma_hi: float = Field(10.0, gt=0, description="σ grid's high end (above sigma_lo)")
    sigma_points: int = Field(12, ge=2, description="σ grid points, log-spaced on [sigma_lo, sigma_hi]")
    contexts: list[int] = Field(
        default_factory=list, description="context sizes (default: every valid size up to the image)"
    )
    patch: int = Field(2, ge=1, description="side of the centre patch the loss is measured on")
    eps: float = Field(
        0.05,
        ge=0,
        description="relative tolerance: loss(crop) <= (1 + eps) * loss(full)",
        json_schema_extra=flag("--eps"),
    )
    rows: int = Field(256, ge=1, description="clean rows measured")
    weights: str = Field(
        "ema",
        pattern="^(ema|raw)$",
        description="denoiser weights: ema (ema.safetensors) or raw (model.safetensors, the last step's)",
    )
    seed: int = Field(0, ge=0, description="seed of the rows measured and of the noise")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def run(cfg: LocalityConfig) -> LocalityResult:
    """Measure the map; write ``locality.json`` and ``locality.png``; returns the table."""
    import pandas as pd
    import torch

    from ambient_ray import config as cfgmod
    from ambient_ray.data.images import read_images
    from ambient_ray.data.metadata import load_metadata
    from ambient_ray.diffusion.locality import crop_sizes, locality_losses, valid_contexts
    from ambient_ray.io import plots, tracking
    from ambient_ray.models.weights import load

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    meta = load_metadata(cfg.data)  # the data checked before the checkpoint is read
    net = load(cfg.checkpoint, "denoiser", cfg.weights)
    mc = net.config
    clean = meta[meta["quality"] == "clean"] if "quality" in meta else pd.DataFrame()
    pool = clean if len(clean) else meta
    rng = np.random.default_rng(cfg.seed)
    ids = pool["id"].to_numpy()[rng.choice(len(pool), size=min(cfg.rows, len(pool)), replace=False)]
    _, imgs = read_images(cfg.data, set(ids.tolist()))
    if imgs.shape[1] != mc.in_channels or imgs.shape[2] != imgs.shape[3]:
        raise ValueError(
            f"the data's images are {tuple(imgs.shape[1:])} (C, H, W); "
            f"the denoiser takes {mc.in_channels} channels, square"
        )
    img = imgs.shape[-1]
    factor = 2 ** (len(mc.channel_mult) - 1)
    contexts = sorted(cfg.contexts) or valid_contexts(img, cfg.patch, factor)
    bad = [c for c in contexts if c not in valid_contexts(img, cfg.patch, factor)]
    if bad or not contexts or contexts[-1] != img:
        raise ValueError(
            f"contexts {contexts}: each must be in {valid_contexts(img, cfg.patch, factor)} "
            f"and the last the image size {img}"
        )
    if cfg.sigma_hi <= cfg.sigma_lo:
        raise ValueError("sigma_hi must exceed sigma_lo")
    sigmas = np.geomspace(cfg.sigma_lo, cfg.sigma_hi, cfg.sigma_points).tolist()
    y = imgs.float() / 127.5 - 1.0
    losses = locality_losses(net, y, sigmas, contexts, cfg.patch, torch.Generator().manual_seed(cfg.seed))
    crop = crop_sizes(losses, contexts, cfg.eps)
    table = {
        "sigmas": sigmas,
        "contexts": contexts,
        "losses": losses.tolist(),
        "crop": crop,
        "eps": cfg.eps,
        "patch": cfg.patch,
        "rows": len(ids),
        "checkpoint": storage.normalize(cfg.checkpoint),
        "image_size": img,
    }
    cfgmod.save_resolved(cfg, out)
    storage.write_bytes(storage.join(out, "locality.json"), json.dumps(table, indent=1).encode())
    png = plots.locality_plot(contexts, sigmas, losses.numpy(), crop)
    storage.write_bytes(storage.join(out, "locality.png"), png)
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": "locality"})
    tracking.log_files(run_id, uri, {"locality.png": png, "locality.json": json.dumps(table).encode()})
    tracking.finish(run_id, uri)
    return {"out": out, "table": table, "mlflow_run_id": run_id}
