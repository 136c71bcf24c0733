"""The driver side of a denoiser run (every denoiser objective): the rows' σ annotations (Ambient-o Sec. 3.1 and
App. D), their space (pixels or precomputed latents) and conditioning, in memory or streamed, handed to the workers
as a typed :class:`DenoiserRows`."""

from __future__ import annotations

import dataclasses

import numpy as np

from ambient_ray.config import ConfigError
from ambient_ray.data.metadata import load_metadata, match, read_latents_info, read_locality_table
from ambient_ray.io import storage
from ambient_ray.models import registry
from ambient_ray.train.config import check_run
from ambient_ray.train.prepared import Prepared
from ambient_ray.train.tasks.denoiser_config import TrainConfig


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
            batch = batch[match(batch, cfg.rows)].reset_index(drop=True)
        smin, smax, _ = resolve_sigmas(batch, cfg)
        return batch.assign(sigma_min=smin, sigma_max=smax)

    return ds.map_batches(add, batch_format="pandas")


def load_crop_table(cfg: TrainConfig) -> None:
    """Without a crop(σ) table in the config, take ``locality.json`` beside the data (annotate writes it)."""
    table_uri = storage.join(storage.normalize(cfg.data), "locality.json")
    if not cfg.ambient.crop_sigmas and storage.exists(table_uri):
        table = read_locality_table(table_uri)
        cfg.ambient.crop_sigmas, cfg.ambient.crop_sizes = table["sigmas"], table["crop"]


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


@dataclasses.dataclass
class DenoiserRows:
    """What the workers of a denoiser run get from the driver (the loop config's ``data``): the rows' space and
    conditioning, and their σ annotations, per id in memory or as stratum counts when streamed."""

    latents: dict | None  # the precompute stage's latents.json (None: pixels)
    captions: dict | None  # {"emb_shape": [T, D]} for a network of captions, else None
    sources: list[str]  # the values of 'source' when there are two or more (per-source metrics), else []
    sigma_min: dict[str, float] | None = None  # in memory: σ_min per id (the rows the workers keep)
    sigma_max: dict[str, float] | None = None  # in memory: σ_max per id (0: no crops annotation)
    source: dict[str, int] | None = None  # in memory, with sources: each id's index in ``sources``
    stream: dict | None = None  # streamed: the strata's edges and dataset-wide counts (:func:`strata_counts`)
    group: str = "source"  # what ``sources`` name: values of the 'source' column, or row kinds (objective masked)
    masks: dict | None = None  # objective masked: {"shape": [1, H, W] or None (no mask column), "meta": ...}
    noisy: dict | None = None  # objective noisy: {"shape": [C, H, W] of the noisy column, "meta": ...}


KINDS = ("clean", "annotated", "masked")  # the row kinds of one masked run, each trained by its own loss


def mask_kinds(cfg: TrainConfig, meta, smin: np.ndarray, latents: dict | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Objective masked: each row's observed fraction (the mean of its mask A; 1 without a mask) and kind (an index
    of :data:`KINDS`: masked where A hides a pixel, else annotated where σ_min > 0, else clean), and whether the
    data has a ``mask`` column. Masks are pixel masks: latent data is refused."""
    import pyarrow.parquet as pq

    from ambient_ray.data import schema
    from ambient_ray.data.metadata import parquet_files, read_schema_names

    if latents:
        raise ConfigError(
            f"config key 'objective': masked trains on pixel data, and {cfg.data} holds VAE latents; a pixel mask has "
            "no exact latent counterpart (a latent mixes every pixel of its patch), so train the masked objective on "
            "the corrupt stage's pixel output"
        )
    frac = {}
    has_column = False
    for f in parquet_files(cfg.data):
        if "mask" not in read_schema_names(f):
            continue
        has_column = True
        fs, path = storage.filesystem(f)
        table = pq.read_table(path, filesystem=fs, columns=["id", "mask"])
        spec = schema.specs_of(table.schema).get("mask")
        if spec is None:
            raise ConfigError(
                f"{f}: column 'mask' is not a tensor column (uint8 0/1, (1, H, W)): run it through corrupt"
            )
        a = schema.to_numpy(table.column("mask"), spec).reshape(table.num_rows, -1)
        frac.update(zip(table.column("id").to_pylist(), (a != 0).mean(axis=1).tolist()))
    observed = meta["id"].map(frac).fillna(1.0).to_numpy(dtype=np.float64)
    kind = np.where(observed < 1.0, 2, np.where(smin > 0, 1, 0))
    return observed, kind, has_column


def noisy_rows(cfg: TrainConfig, meta, latents: dict | None, streaming: bool) -> tuple[np.ndarray, dict, str]:
    """Objective noisy (DSD's Phase I, seed 004): each row's σ_min is its own ``sigma_n`` (the noise its ``noisy``
    column holds; 0: clean), the noisy column's shape, and the run's description. Pixel data in memory only."""
    from ambient_ray.data.noisy import noisy_shape

    if latents:
        raise ConfigError(
            f"config key 'objective': noisy trains on the float 'noisy' column of pixel data, and {cfg.data} holds "
            "VAE latents; train it on the corrupt stage's output (noise:sigma=...)"
        )
    if streaming:
        raise ConfigError(
            "config key 'stream.mode': the noisy objective reads its rows in memory; set --data-path memory"
        )
    shape = noisy_shape(cfg.data)
    if shape is None:
        raise ConfigError(
            f"config key 'objective': noisy needs a 'noisy' tensor column and 'sigma_n' per row; {cfg.data} has "
            "none (corrupt with --corruption noise:sigma=S, or bring noisy data: docs/stages/corrupt.md)"
        )
    sn = meta["sigma_n"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(sn) | (sn < 0)
    if bad.any():
        raise ConfigError(
            f"{cfg.data}: sigma_n must be finite and >= 0; rows {meta['id'][bad].head(5).tolist()} are not"
        )
    noisy = sn > 0
    levels = sorted({round(float(v), 6) for v in sn[noisy]})
    info = {
        "sigma_n": float(np.median(sn[noisy])) if noisy.any() else 0.0,
        "sigma_n_levels": levels[:16],
        "rows_noisy": int(noisy.sum()),
        "rows_clean": int((~noisy).sum()),
        "extra_weight": cfg.noisy.extra_weight,
        "way": cfg.noisy.way,
    }
    if cfg.noisy.way == "standard":  # the noisy rows as if clean: the EDM loss on y at every σ
        return (
            np.zeros_like(sn, dtype=np.float32),
            {"shape": list(shape), "meta": info},
            (f"noisy objective, standard way (DSD Eq. 1): {info['rows_noisy']} noisy rows trained as if clean"),
        )
    how = (
        f"noisy objective (DSD Phase I): {info['rows_noisy']} rows observed with noise σ_n "
        + ("= " + ", ".join(f"{v:g}" for v in levels[:4]) + (", ..." if len(levels) > 4 else "") if levels else "")
        + f", {info['rows_clean']} clean; σ > σ_n"
        + (
            f" above the λ_max={cfg.ambient.lambda_max:g} buffer, with the ambient weight"
            if cfg.noisy.extra_weight
            else ""
        )
    )
    return sn.astype(np.float32), {"shape": list(shape), "meta": info}, how


def prepare(cfg: TrainConfig) -> Prepared:
    """The driver side of a denoiser objective, before any worker starts: the rows (the ``rows`` filter), the
    crop table, the σ annotations (:func:`resolve_sigmas`), the network's interface from the data, in memory or
    streamed; the run's description for the MLflow run and the progress line."""
    no_mask = "mask_input" in cfg.model.model_fields_set and not cfg.model.mask_input  # set false by the user
    extra = ((cfg.ambient.quality_score,) if cfg.ambient.quality_score else ()) + (
        ("sigma_n",) if cfg.objective == "noisy" else ()
    )
    meta = load_metadata(cfg.data, extra)
    if cfg.rows:
        meta = meta[match(meta, cfg.rows)].reset_index(drop=True)
        if meta.empty:
            raise ConfigError(f"config key 'rows': no row of {cfg.data} matches {cfg.rows!r}")
    load_crop_table(cfg)
    smin, smax, origin = resolve_sigmas(meta, cfg)
    latents = latents_of(cfg.data)
    shape = (latents["latent_shape"][1], latents["latent_shape"][0] // 2) if latents else None
    cfg.model = registry.with_interface(cfg.model, *check_run(cfg, meta, shape))
    captions = caption_interface(cfg, latents)
    ids = meta["id"].tolist()
    sources = sorted(meta["source"].dropna().unique().tolist()) if "source" in meta else []
    space = f"{'x'.join(map(str, latents['latent_shape']))} latents" if latents else "pixels"
    streaming = cfg.stream.mode == "stream" or (cfg.stream.mode == "auto" and len(meta) > cfg.stream.above_rows)
    x = "latent" if latents else "image"
    cap_cols = ["caption_emb", "caption_mask"] if captions else []
    rows = DenoiserRows(latents, captions, sources if len(sources) > 1 else [])
    if streaming:  # the annotations travel as columns; the workers get the strata's counts only
        groups = [(meta["source"] == name).to_numpy() for name in sources] if len(sources) > 1 else []
        rows.stream = strata_counts(cfg, smin, smax, groups)
        columns = ["id", x, *cap_cols, *[c for c in meta.columns if c != "id"]]
    else:
        rows.sigma_min, rows.sigma_max = dict(zip(ids, smin.tolist())), dict(zip(ids, smax.tolist()))
        columns = [c for c in ("id", x, *cap_cols, "label") if c in meta.columns or c != "label"]
        if len(sources) > 1:  # per-source loss, draws and donut
            code = {name: i for i, name in enumerate(sources)}
            rows.source = dict(zip(ids, meta["source"].map(code).fillna(-1).astype(int).tolist()))
    if cfg.objective == "noisy":  # σ_min is each row's own noise level; y = x_{σ_n} is the row as observed
        smin, rows.noisy, origin = noisy_rows(cfg, meta, latents, streaming)
        if not streaming:
            rows.sigma_min = dict(zip(ids, smin.tolist()))
        columns.append("noisy")
    how = "streamed" if streaming else "in memory"
    params, tags = {}, {"sigma_min": origin, "space": space, "data_path": how}
    if cfg.objective == "masked":
        observed, kind, has_column = mask_kinds(cfg, meta, smin, latents)
        if streaming:
            raise ConfigError(
                "config key 'stream.mode': the masked objective reads its rows in memory (every worker holds its "
                "share and its masks); set --data-path memory"
            )
        if no_mask:
            raise ConfigError("config key 'model.mask_input': the masked objective's network takes the mask; drop it")
        cfg.model = type(cfg.model).model_validate({**cfg.model.model_dump(), "mask_input": True})
        n_kind = {name: int((kind == k).sum()) for k, name in enumerate(KINDS)}
        origin = origin.replace(": every row treated as clean (plain EDM)", "")  # masked rows are not clean
        if "; warning:" in origin:  # masked rows are corrupted rows that train as such: count only the others
            origin = origin.split("; warning:")[0]
            n_bad = int(((meta["quality"] == "corrupted").to_numpy() & (kind == 0)).sum())
            if n_bad:
                origin += (
                    f"; warning: {n_bad} rows marked corrupted train as clean "
                    "(annotate them, or set ambient.corrupted_sigma_min)"
                )
        masked = kind == 2
        frac = float(observed[masked].mean()) if masked.any() else 1.0
        delta = cfg.masked.delta
        rows.masks = {
            "shape": [1, *shape_of(cfg.model)] if has_column else None,
            "meta": {"delta": delta, "observed_fraction": frac, "density": frac * (1 - delta) if masked.any() else 1.0},
        }
        present = [name for name, n in n_kind.items() if n]
        if len(present) > 1:  # per-kind loss, draws and donut (in place of per-source ones)
            rows.group, rows.sources = "kind", present
            code = {KINDS.index(name): i for i, name in enumerate(present)}
            rows.source = dict(zip(ids, [code[int(k)] for k in kind]))
        if has_column:
            columns.append("mask")
        params = {"mask_observed_fraction": round(frac, 6), **{f"rows_{k}": v for k, v in n_kind.items()}}
        tags["row_kinds"] = ", ".join(f"{v} {k}" for k, v in n_kind.items() if v)
        origin += (
            f"; masked objective, δ={delta:g}: "
            + tags["row_kinds"]
            + (f" (masked rows observe {frac:.1%} of their pixels)" if masked.any() else "; no masked row")
        )
    model = model_meta(cfg, latents)
    if rows.masks:
        model["masked"] = rows.masks["meta"]
    if rows.noisy:
        model["noisy"] = rows.noisy["meta"]
        params = {"rows_noisy": rows.noisy["meta"]["rows_noisy"], "sigma_n": rows.noisy["meta"]["sigma_n"]}
    return Prepared(
        meta=model,
        rows=rows,
        columns=columns,
        tags={**tags, "sigma_min": origin},
        headline=f"train: {len(meta)} rows"
        + (f" with {cfg.rows}" if cfg.rows else "")
        + f" ({origin}; {space}; {how})",
        extra={"rows": len(meta), "sigma_min": origin},
        stream=(lambda ds: with_sigmas(ds, cfg)) if streaming else None,
        costs=denoiser_costs(model, cfg.text.mask_ratio) if cfg.mlflow.enabled else None,
        params=params,
    )


def shape_of(model) -> list[int]:
    return [model.img_resolution, model.img_resolution]


def model_meta(cfg: TrainConfig, latents: dict | None = None) -> dict:
    """``model.json`` of a denoiser: what rebuilds the network for sampling (and, for a model of precomputed
    latents, the VAE and normalisation that decode its samples)."""
    meta = {
        "kind": "denoiser",
        "arch": cfg.model.arch,
        "model": cfg.model.model_dump(mode="json"),
        "sigma_data": cfg.ambient.sigma_data,
    }
    if latents:
        meta["latents"] = latents
    return meta
