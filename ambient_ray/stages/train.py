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
from typing import Literal

import numpy as np
from pydantic import Field

from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.data.metadata import load_metadata
from ambient_ray.io import storage
from ambient_ray.models import registry
from ambient_ray.stages.results import TrainResult
from ambient_ray.train import engine, loop
from ambient_ray.train.engine import EngineConfig
from ambient_ray.train.tasks.ambient import AmbientTask, model_meta


class AmbientConfig(Strict):
    lambda_max: float = Field(4.0, gt=1.0, description="buffer: σ > sqrt(1 + 1/(λ_max − 1))·σ_min (Eq. D.2)")
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    corrupted_sigma_min: float | None = Field(
        None, ge=0, description="σ_min for rows with quality=corrupted when the data has no sigma_min column"
    )
    quality_score: str | None = Field(
        None,
        description="a column of per-row quality scores (e.g. CLIP-IQA): the lowest low_fraction of rows get "
        "corrupted_sigma_min, the rest are clean (Ambient-o's ImageNet recipe); used without a sigma_min column",
    )
    low_fraction: float = Field(0.9, gt=0, lt=1, description="with quality_score: the share of rows called low quality")
    source_sigma_min: dict[str, float] = Field(
        default_factory=dict,
        description="a fixed σ_min per value of the 'source' column (Ambient-o's text-to-image recipe: the "
        "synthetic DiffusionDB at 2, the other sources clean); a row's σ_min is the larger of this and what the "
        "other rules give it",
    )
    crop_sigmas: list[float] = Field(default_factory=list, description="crop(σ) table: σ thresholds, ascending")
    crop_sizes: list[int] = Field(default_factory=list, description="crop(σ) table: crop size for σ ≤ each threshold")


class StreamConfig(Strict):
    """How the workers get their rows (README "Streaming training")."""

    mode: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="memory: every worker holds its share in RAM (exact random access, the small-data default); "
        "stream: each worker reads only its share through Ray Data into bounded per-stratum pools; "
        "auto: stream above 'above_rows' rows",
        json_schema_extra=flag("--data-path", "memory, stream or auto", choices=("auto", "memory", "stream")),
    )
    above_rows: int = Field(200_000, ge=0, description="auto: stream datasets with more rows than this")
    pool_rows: int = Field(8192, ge=16, description="stream: rows a worker keeps in its per-stratum pools in all")
    read_batch: int = Field(256, ge=1, description="stream: rows per Ray Data batch read by a worker")


class TextConfig(Strict):
    """Text-to-image training (a network that takes captions, e.g. ``model.arch: dit``; README "Text to image")."""

    mask_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of patch tokens dropped per image (MicroDiT: 0.75 in pretraining)"
    )
    caption_dropout: float = Field(
        0.1, ge=0, le=1, description="share of rows trained with the null caption (zeros), for classifier-free guidance"
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="fixed prompts of the periodic sample grids (default: the first rows' captions)",
    )
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance weight of the periodic grids")


class TrainConfig(EngineConfig):
    """Config of ``ambient-ray train`` (the engine's keys, plus the model and the ambient objective)."""

    model: registry.config_type("denoiser") = Field(
        default_factory=registry.ARCHS.get("ddpmpp").config,
        description="the denoiser: model.arch (ddpmpp) and its keys; resolution and channels come from the data",
    )
    ambient: AmbientConfig = Field(default_factory=AmbientConfig)
    sample_grid: int = Field(16, ge=0, description="samples drawn from the EMA model at the end (0: none)")
    rows: str | None = Field(
        None, description="train only on the rows this filter selects, FIELD=V1[,V2] (e.g. quality=clean)"
    )
    val_rows: int = Field(64, ge=1, description="with report_every: clean rows per worker for the validation loss")
    stream: StreamConfig = Field(default_factory=StreamConfig)
    text: TextConfig = Field(default_factory=TextConfig)


# ------------------------------------------------------------------------------ data


def resolve_sigmas(meta, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """σ_min and σ_max per row, and where they came from."""
    n = len(meta)
    if "sigma_min" in meta:
        smin = meta["sigma_min"].to_numpy(dtype=np.float64, na_value=np.nan)
        origin = "sigma_min column"
    elif cfg.ambient.quality_score is not None:
        a = cfg.ambient
        if a.corrupted_sigma_min is None:
            raise ConfigError("config key 'ambient.quality_score': set ambient.corrupted_sigma_min for the low part")
        score = meta[a.quality_score].to_numpy(dtype=np.float64, na_value=np.nan)
        cut = np.nanquantile(score, a.low_fraction)
        low = ~(score > cut)  # a row without a score counts as low quality
        smin = np.where(low, a.corrupted_sigma_min, 0.0)
        origin = (
            f"fixed sigma_min={a.corrupted_sigma_min} for the {int(low.sum())} rows of lowest {a.quality_score} "
            f"(<= {cut:.4g}; {int(np.isnan(score).sum())} without a score), {int((~low).sum())} clean"
        )
    elif cfg.ambient.corrupted_sigma_min is not None and "quality" in meta:
        smin = np.where(meta["quality"].to_numpy() == "corrupted", cfg.ambient.corrupted_sigma_min, 0.0)
        origin = f"fixed sigma_min={cfg.ambient.corrupted_sigma_min} for quality=corrupted"
    else:
        smin = np.zeros(n)
        origin = "no sigma_min column: every row treated as clean (plain EDM)"
    if cfg.ambient.source_sigma_min:
        if "source" not in meta:
            raise ConfigError("config key 'ambient.source_sigma_min': the data has no 'source' column")
        fixed = meta["source"].map(cfg.ambient.source_sigma_min).to_numpy(dtype=np.float64, na_value=0.0)
        smin = np.maximum(smin, fixed)
        origin += "; fixed sigma_min by source: " + ", ".join(
            f"{k}={v:g}" for k, v in cfg.ambient.source_sigma_min.items()
        )
    n_bad = int(((meta["quality"] == "corrupted").to_numpy() & (smin == 0)).sum()) if "quality" in meta else 0
    if n_bad and origin.startswith("no sigma_min column"):
        origin += (
            f"; warning: {n_bad} rows marked corrupted train as clean "
            "(annotate them, or set ambient.corrupted_sigma_min)"
        )
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


def latents_of(data: str) -> dict | None:
    """The precompute stage's ``latents.json`` beside the data (annotate carries it forward): the rows are
    latents (column ``latent``: mean and std), normalised per channel by its shift and scale. None for
    pixel data."""
    from ambient_ray.stages.precompute import read_latents_info

    info = read_latents_info(data)
    if info is None:
        return None
    keys = ("vae", "vae_subfolder", "vae_fingerprint", "channels", "latent_shape", "shift", "scale", "resolution")
    keys += ("text_encoder", "text_fingerprint", "emb_shape", "emb_dtype")
    return {k: info.get(k) for k in keys}


def strata_counts(cfg: TrainConfig, smin: np.ndarray, smax: np.ndarray, groups: list[np.ndarray] = ()) -> dict:
    """The dataset-wide stratum counts of the streaming σ-first sampler: edges from the annotations' own
    values where they are few (a grid: nothing is rounded), else the default log grid (thresholds rounded up,
    σ_max down). With ``groups`` (a boolean row mask per source), each group's own counts too, as ``sources``."""
    import torch

    from ambient_ray.diffusion import stratified

    lam = cfg.ambient.lambda_max
    values_min, values_max = np.unique(smin), np.unique(smax[smax > 0])
    if len(values_min) + len(values_max) <= 256:
        edges = stratified.grid_edges(values_min, values_max, lam) or stratified.DEFAULT_EDGES
    else:
        edges = stratified.DEFAULT_EDGES
    ids, table = stratified.strata_of(torch.from_numpy(smin), torch.from_numpy(smax), lam, edges)

    def counts(rows: torch.Tensor) -> dict:
        n = torch.bincount(rows, minlength=len(table))
        nz = n.nonzero().flatten()
        return {"strata": nz.tolist(), "counts": n[nz].tolist()}

    out = {"edges": edges, **counts(ids)}
    if len(groups):
        out["sources"] = [counts(ids[torch.from_numpy(g)]) for g in groups]
    return out


def with_sigmas(ds, cfg: TrainConfig):
    """The streamed dataset's lazy steps: the ``rows`` filter, then ``sigma_min``/``sigma_max`` columns by the
    same rules as :func:`resolve_sigmas` (on each batch: a row's annotation depends on the row alone)."""

    def add(batch):
        if cfg.rows:
            from ambient_ray.data.metadata import match

            batch = batch[match(batch, cfg.rows)].reset_index(drop=True)
        smin, smax, _ = resolve_sigmas(batch, cfg)
        return batch.assign(sigma_min=smin, sigma_max=smax)

    return ds.map_batches(add, batch_format="pandas")


def load_crop_table(cfg: TrainConfig) -> None:
    """Without a crop(σ) table in the config, take ``locality.json`` beside the data (annotate writes it)."""
    table_uri = storage.join(storage.normalize(cfg.data), "locality.json")
    if not cfg.ambient.crop_sigmas and storage.exists(table_uri):
        from ambient_ray.stages.locality import read_table

        table = read_table(table_uri)
        cfg.ambient.crop_sigmas, cfg.ambient.crop_sizes = table["sigmas"], table["crop"]


# ------------------------------------------------------------------------------ worker


def train_loop(config: dict) -> None:
    """Ray Train worker function (config: the TrainConfig as a dict plus the σ annotations)."""
    cfg = TrainConfig.model_validate(config["cfg"])
    loop.run(AmbientTask(cfg, config), cfg, config)


# ------------------------------------------------------------------------------ driver


def run(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train; returns a summary dict (out URIs, MLflow run id, final metrics). ``callbacks``: Ray Train
    ``UserCallback``s (a Ray Tune trial passes the one that forwards each report to Tune)."""

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    meta = load_metadata(cfg.data, (cfg.ambient.quality_score,) if cfg.ambient.quality_score else ())
    if cfg.rows:
        from ambient_ray.data.metadata import match

        meta = meta[match(meta, cfg.rows)].reset_index(drop=True)
        if meta.empty:
            raise ConfigError(f"config key 'rows': no row of {cfg.data} matches {cfg.rows!r}")
    load_crop_table(cfg)
    smin, smax, origin = resolve_sigmas(meta, cfg)
    latents = latents_of(cfg.data)
    shape = (latents["latent_shape"][1], latents["latent_shape"][0] // 2) if latents else None
    cfg.model = registry.with_interface(cfg.model, *engine.check_run(cfg, meta, shape))
    captions = caption_interface(cfg, latents)
    ids = meta["id"].tolist()
    sources = sorted(meta["source"].dropna().unique().tolist()) if "source" in meta else []
    space = f"{'x'.join(map(str, latents['latent_shape']))} latents" if latents else "pixels"
    streaming = cfg.stream.mode == "stream" or (cfg.stream.mode == "auto" and len(meta) > cfg.stream.above_rows)
    x = "latent" if latents else "image"
    cap_cols = ["caption_emb", "caption_mask"] if captions else []
    if streaming:  # the annotations travel as columns; the workers get the strata's counts only
        groups = [(meta["source"] == name).to_numpy() for name in sources] if len(sources) > 1 else []
        per_row = {"stream": strata_counts(cfg, smin, smax, groups), "latents": latents}
        columns = ["id", x, *cap_cols, *[c for c in meta.columns if c != "id"]]
    else:
        per_row = {"sigma_min": dict(zip(ids, smin.tolist())), "sigma_max": dict(zip(ids, smax.tolist()))}
        per_row["latents"] = latents
        columns = [c for c in ("id", x, *cap_cols, "label") if c in meta.columns or c != "label"]
        if len(sources) > 1:  # per-source loss, draws and donut
            code = {name: i for i, name in enumerate(sources)}
            per_row["source"] = dict(zip(ids, meta["source"].map(code).fillna(-1).astype(int).tolist()))
    per_row["sources"] = sources if len(sources) > 1 else []
    per_row["captions"] = captions
    how = "streamed" if streaming else "in memory"
    return engine.train(
        cfg,
        train_loop,
        model_meta(cfg, latents),
        per_row,
        columns,
        stage="train",
        tags={"sigma_min": origin, "space": space, "data_path": how},
        headline=f"train: {len(meta)} rows"
        + (f" with {cfg.rows}" if cfg.rows else "")
        + f" ({origin}; {space}; {how})",
        stream=(lambda ds: with_sigmas(ds, cfg)) if streaming else None,
        artifacts=lambda out, ckpt: artifacts(cfg, out, ckpt),
        extra={"rows": len(meta), "sigma_min": origin},
        callbacks=callbacks,
        costs=denoiser_costs(model_meta(cfg, latents), cfg.text.mask_ratio) if cfg.mlflow.enabled else None,
    )


def caption_interface(cfg: TrainConfig, latents: dict | None) -> dict | None:
    """For a network that takes captions: the caption embeddings' shape from the precompute stage (it sets
    ``model.caption_tokens``/``model.caption_dim``, as the data sets the image interface; the text encoder of the
    grids' prompts is read from ``model.json``'s latents); None for a class-conditional or unconditional network.
    A mask ratio needs a network that masks."""
    if not registry.takes_captions(cfg.model.arch):
        if cfg.text.mask_ratio:
            raise ConfigError(f"config key 'text.mask_ratio': model.arch {cfg.model.arch} has no patch masking")
        return None
    if not latents or not latents.get("emb_shape"):
        raise ConfigError(
            f"config key 'data': model.arch {cfg.model.arch} trains on caption embeddings; {cfg.data} has none "
            "(run 'ambient-ray precompute' with --text-encoder, and --vae pixels for pixel data)"
        )
    t, d = latents["emb_shape"]
    cfg.model = type(cfg.model).model_validate({**cfg.model.model_dump(), "caption_tokens": t, "caption_dim": d})
    return {"emb_shape": [t, d]}


def denoiser_costs(meta: dict, mask_ratio: float = 0.0):
    """The denoiser's parameters (exact and active) and FLOPs per image of its step as trained (patch-masked:
    :func:`ambient_ray.train.perf.count_denoiser`, on the meta device), for MLflow only; None, with a note, where
    a network cannot be counted there (then no tflop_per_s or mfu is logged)."""
    from ambient_ray.train import perf

    try:
        return perf.count_denoiser(meta, mask_ratio)
    except Exception as e:  # never a reason to stop a run
        print(f"train: could not count the model's FLOPs on the meta device ({type(e).__name__}: {e})")
        return None


def artifacts(cfg: TrainConfig, out: str, ckpt: str) -> dict[str, bytes]:
    """The σ donut (``coverage.json``, ``coverage.png``) of the last checkpoint and a sample grid of its EMA."""
    from ambient_ray.io import plots
    from ambient_ray.io.weights import load
    from ambient_ray.stages.sample import draw

    cov = json.loads(storage.read_bytes(storage.join(ckpt, "coverage.json")))
    storage.write_bytes(storage.join(out, "coverage.json"), json.dumps(cov, indent=1).encode())
    png = plots.coverage_plot(cov["donut"], title=f"σ coverage (λ_max={cfg.ambient.lambda_max})")
    storage.write_bytes(storage.join(out, "coverage.png"), png)
    files = {"coverage.png": png, "coverage.json": json.dumps(cov).encode()}
    for name, part in cov.get("sources", {}).items():  # each source's donut
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        files[f"coverage_{safe}.png"] = p = plots.coverage_plot(part["donut"], title=f"σ coverage of source {name}")
        storage.write_bytes(storage.join(out, f"coverage_{safe}.png"), p)
    if cfg.sample_grid:
        net, kw = load(storage.join(out, "model"), "denoiser"), {}
        if registry.takes_captions(cfg.model.arch) and cfg.text.prompts:  # else the null caption
            from ambient_ray.stages.sample import encode_prompts

            kw = {"captions": encode_prompts(net.meta, cfg.text.prompts), "guidance": cfg.text.guidance}
        imgs = draw(net, cfg.sample_grid, seed=cfg.seed, **kw)
        files["samples.png"] = grid = plots.image_grid_png(imgs)
        storage.write_bytes(storage.join(out, "samples.png"), grid)
    return files
