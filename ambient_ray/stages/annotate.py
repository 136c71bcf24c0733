"""The annotate stage: σ_min (and σ_max) for every row, from trained classifiers or fixed rules, with Ray Data.

Two phases.

1. **Curves** (the expensive part; Ray Data ``map_batches`` over an actor pool, one input shard per
   call, each actor loading the classifiers once): for every row, the noise classifier's mean
   probability of "clean" over ``draws`` noise draws at each σ of the grid (Eq. 3.2's inner
   expectation), the crops classifier's mean probability of "target" over ``draws`` crops of size
   crop(σ) (Eq. 3.4), and the quality score. Noise and crops are seeded per row, so a row's curve
   does not depend on batching, concurrency or resumption. Written per input shard to
   ``OUT/curves/<shard>.parquet`` with a completion marker ``OUT/_curves_done/<shard>.json``: an
   interrupted run resumes with the unfinished shards. The curves depend on the classifiers, grid,
   draws, seed and data, fingerprinted in ``OUT/_manifest.json``; another set into the same ``out``
   is refused unless ``overwrite``.
2. **Annotation** (cheap, on the driver, redone on every run, so a new τ or mode re-annotates without
   recomputing a curve): σ_min per row, by the first rule that applies:

   - the image cannot be decoded or has another shape -> the row goes to ``OUT/quarantine/`` with the reason;
   - ``scorer``: rows in the top ``top_percent`` % by score become ``quality=clean``, the rest ``corrupted``
     (the score is kept in ``quality_score``);
   - the row's ``source`` is in ``fixed`` (``--fixed source=sigma``) -> that σ_min (annotation ``fixed:SOURCE``);
   - ``quality=clean`` -> 0 (``clean``);
   - a noise classifier -> σ_min from its curve: the first grid σ with probability > τ (Eq. 3.2), per
     dataset (one per corruption spec, or one for all non-clean rows with ``sets=all``), or per sample, read
     off each sample's curve by ``rule`` (default ``shrunk``: the curve shrunk toward its set's first)
     (``classifier``; a curve that never crosses gets the top of the grid and ``classifier:never-crossed``,
     and is counted in the report);
   - ``fixed_sigma_min`` -> that σ_min (``fixed``).

   σ_max (with a crops classifier, for rows that are not clean): the largest grid σ whose crop(σ)
   crops still fool it (Eq. 3.4), 0 if none. Without one, an existing ``sigma_max`` column is kept.

Outputs: ``OUT/data/<shard>.parquet`` (the input rows and columns, plus ``sigma_min``, ``sigma_max``,
``annotation``, and the provenance as Parquet metadata), ``OUT/quarantine/``, ``OUT/annotation.json``
(provenance and counts), ``OUT/locality.json`` (the crop(σ) table, where ``train`` finds it),
``OUT/latents.json`` (copied from precomputed input: the latents' normalisation),
``OUT/sigma_min.png`` (histogram per corruption) and ``OUT/curves.png`` (mean probability against σ
per corruption, with τ: Ambient-o Fig. 2), also logged to MLflow. Rows in = rows out + rows quarantined.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError
from ambient_ray.diffusion import thresholds
from ambient_ray.io import shards, storage
from ambient_ray.models.classifier import crop_curves, noise_curves
from ambient_ray.stages.actor_stage import ActorStage
from ambient_ray.stages.annotate_config import AnnotateConfig, parse_fixed  # noqa: F401 (re-exported)
from ambient_ray.stages.results import AnnotateResult, StageFailed

ANNOTATION_COLUMNS = ("sigma_min", "sigma_max", "annotation", "quality_score")
CURVES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("noise_curve", pa.list_(pa.float32())),
        ("noise_std", pa.list_(pa.float32())),
        ("crop_curve", pa.list_(pa.float32())),
        ("score", pa.float32()),
        ("error", pa.string()),
    ]
)


def row_seed(seed: int, rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"annotate/{seed}/{rid}".encode(), digest_size=8).digest(), "big") >> 2


# ------------------------------------------------------------------------------ phase 1: curves (Ray Data actors)


class CurveActor:
    """Ray Data actor: loads the classifiers and scorer once, then turns one input shard per call into curves."""

    def __init__(self, plan: dict):
        from ambient_ray.models.scorers import load_scorer
        from ambient_ray.models.weights import load

        self.plan = plan
        self.device = "cuda" if plan["num_gpus"] > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(plan["num_cpus"])))
        h, c = plan["image_size"], plan["channels"]
        self.noise = self.crops = self.scorer = None
        if plan["classifier"]:
            self.noise = load(plan["classifier"], "noise", plan["weights"], img_resolution=h, channels=c).to(
                self.device
            )
        if plan["crops_classifier"]:
            self.crops = load(plan["crops_classifier"], "crops", plan["weights"], channels=c).to(self.device)
        if plan["scorer"]:
            self.scorer = load_scorer(plan["scorer"], self.device)
        self.grid = torch.tensor(plan["grid"])
        self.max_forward = plan.get("max_forward") or (32768 if self.device == "cuda" else 4096)
        self.crop_sizes = torch.tensor(plan["crop_sizes"]) if plan["crop_sizes"] else None

    def __call__(self, batch: dict) -> dict:
        """One shard; a shard that fails is reported (not raised), so the others still finish."""
        src, name = str(batch["path"][0]), str(batch["name"][0])
        try:
            summary = self.shard(src, name)
        except Exception as e:
            summary = {"name": name, "rows": 0, "errors": 0, "seconds": 0.0, "failed": f"{type(e).__name__}: {e}"}
        return {k: np.array([v]) for k, v in summary.items()}

    def shard(self, src: str, name: str) -> dict:
        t0 = time.perf_counter()
        if self.plan.get("debug_fail_shard") == name:
            raise RuntimeError(f"debug_fail_shard={name}: planted failure")
        fs, path = storage.filesystem(src)
        table = pq.read_table(path, filesystem=fs, columns=["id", "image"])
        ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
        arrays, errors = curve_rows(ids, images, self.plan["image_size"], self.plan["channels"])
        g = len(self.plan["grid"])
        noise = np.full((len(ids), g), np.nan, np.float32)
        noise_std = np.full((len(ids), g), np.nan, np.float32)
        crop = np.full((len(ids), g), np.nan, np.float32)
        score = np.full(len(ids), np.nan, np.float32)
        ok = [i for i, e in enumerate(errors) if not e]
        bs = self.plan["batch_size"]
        for s in range(0, len(ok), bs):
            rows = ok[s : s + bs]
            y8 = torch.from_numpy(np.stack([arrays[i] for i in rows]))
            y = (y8.float() / 127.5 - 1.0).to(self.device)
            seeds = [row_seed(self.plan["seed"], ids[i]) for i in rows]
            if self.noise is not None:
                mean, std = noise_curves(
                    self.noise, y, self.grid, self.plan["draws"], seeds, self.max_forward, with_std=True
                )
                noise[rows], noise_std[rows] = mean.numpy(), std.numpy()
            if self.crops is not None:
                crop[rows] = crop_curves(self.crops, y, self.crop_sizes, self.plan["draws"], seeds).numpy()
            if self.scorer is not None:
                score[rows] = self.scorer(y8.float() / 255.0).numpy()
        out = pa.table(
            {
                "id": ids,
                "noise_curve": list(noise),
                "noise_std": list(noise_std),
                "crop_curve": list(crop),
                "score": score,
                "error": errors,
            },
            schema=CURVES_SCHEMA,
        )
        storage.write_parquet(storage.join(self.plan["out"], "curves", f"{name}.parquet"), out)
        summary = {
            "name": name,
            "rows": len(ids),
            "errors": len(ids) - len(ok),
            "seconds": time.perf_counter() - t0,
            "failed": "",
        }
        shards.mark_done(storage.join(self.plan["out"], "_curves_done"), name, self.plan["fingerprint"], summary)
        return summary


def curve_rows(
    ids: list[str], images: list[bytes], size: int, channels: int
) -> tuple[dict[int, np.ndarray], list[str]]:
    """Decode a shard's images to uint8 (C, H, W); the reason for each row that cannot be used ('' if fine)."""
    from ambient_ray.data.images import decode_png

    arrays, errors = {}, []
    for i, img in enumerate(images):
        try:
            arr = decode_png(img)
        except Exception as e:  # undecodable bytes: quarantined by phase 2
            errors.append(f"cannot decode image: {type(e).__name__}: {e}")
            continue
        if arr.shape != (size, size, channels):
            errors.append(
                f"image is {arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]}, the classifier takes {size}x{size}x{channels}"
            )
            continue
        arrays[i] = np.ascontiguousarray(arr.transpose(2, 0, 1))
        errors.append("")
    return arrays, errors


# ------------------------------------------------------------------------------ the plan


def _file_digest(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def make_plan(cfg: AnnotateConfig, out: str, files: list[str], meta) -> dict:
    """What the curves depend on (fingerprinted), after checking classifiers, locality and data agree."""
    from ambient_ray.data.metadata import one_shape, read_locality_table
    from ambient_ray.diffusion.ambient import CropTable
    from ambient_ray.models.weights import load, model_dir

    size, channels = one_shape(meta, cfg.data)
    wfile = "ema.safetensors" if cfg.weights == "ema" else "model.safetensors"
    plan: dict = {"classifier": None, "crops_classifier": None, "digests": {}, "locality": None, "crop_sizes": []}
    noise_meta = None
    if cfg.classifier:
        d, noise_meta = model_dir(cfg.classifier)
        load(
            cfg.classifier, "noise", cfg.weights, img_resolution=size, channels=channels
        )  # refuse here, not in the actors
        plan["classifier"] = d
        plan["digests"]["classifier"] = [_file_digest(storage.join(d, n)) for n in ("model.json", wfile)]
    lo = cfg.grid_lo or (noise_meta["sigma_range"][0] if noise_meta else 0.01)
    hi = cfg.grid_hi or (noise_meta["sigma_range"][1] if noise_meta else 20.0)
    if hi <= lo:
        raise ConfigError(f"config key 'grid_hi': {hi} must exceed grid_lo {lo}")
    grid = make_grid(cfg, lo, hi)
    if cfg.locality_eps is not None and not (cfg.crops_classifier and cfg.locality):
        raise ConfigError(
            "config key 'locality_eps': re-derives crop(σ) for the crops classifier; "
            "give crops_classifier and locality too"
        )
    if cfg.crops_classifier:
        if not cfg.locality:
            raise ConfigError(
                "config key 'locality': a crops classifier needs the crop(σ) table (ambient-ray locality --out URI)"
            )
        d, _ = model_dir(cfg.crops_classifier)
        load(cfg.crops_classifier, "crops", cfg.weights, channels=channels)
        table = read_locality_table(cfg.locality)
        if cfg.locality_eps is not None:
            from ambient_ray.diffusion.locality import crop_sizes

            table = {
                **table,
                "eps": cfg.locality_eps,
                "crop": crop_sizes(
                    torch.tensor(table["losses"], dtype=torch.float64), table["contexts"], cfg.locality_eps
                ),
            }
        if table["image_size"] != size:
            raise ValueError(
                f"the locality table {cfg.locality} was measured on {table['image_size']}px images; "
                f"the data is {size}px"
            )
        crop = CropTable(table["sigmas"], table["crop"])
        plan["crops_classifier"], plan["locality"] = d, table
        plan["crop_sizes"] = crop(torch.tensor(grid, dtype=torch.float64)).tolist()
        plan["digests"]["crops_classifier"] = [_file_digest(storage.join(d, n)) for n in ("model.json", wfile)]
    plan.update(
        {
            "out": out,
            "grid": grid,
            "draws": cfg.draws,
            "seed": cfg.seed,
            "weights": cfg.weights,
            "scorer": cfg.scorer,
            "image_size": size,
            "channels": channels,
            "batch_size": cfg.batch_size,
            "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus,
            "debug_fail_shard": cfg.debug_fail_shard,
            "max_forward": cfg.max_forward,
        }
    )
    if cfg.scorer:
        from ambient_ray.models.scorers import load_scorer, scorer_file

        load_scorer(cfg.scorer)  # refuse a bad scorer here, not in every actor
        if scorer_file(cfg.scorer):
            plan["digests"]["scorer"] = _file_digest(scorer_file(cfg.scorer))
    keep = {
        "curves": 2,  # 2: the std over the draws is stored beside the mean
        **{
            k: plan[k]
            for k in (
                "classifier",
                "crops_classifier",
                "digests",
                "grid",
                "draws",
                "seed",
                "weights",
                "scorer",
                "crop_sizes",
            )
        },
    }
    keep["files"] = [
        (shards.shard_name(f), storage.filesystem(f)[0].get_file_info(storage.filesystem(f)[1]).size) for f in files
    ]
    plan["fingerprint"] = shards.fingerprint(keep)
    return plan


def make_grid(cfg: AnnotateConfig, lo: float, hi: float) -> list[float]:
    """The σ grid: log-spaced over [lo, hi], or (``grid: lognormal``) the sorted draws of the training
    log-normal that fall inside [lo, hi], ``grid_points`` of them (a fixed seed: the same grid every run)."""
    if cfg.grid == "log":
        return np.geomspace(lo, hi, cfg.grid_points).tolist()
    # draw until grid_points land inside [lo, hi]; refuse a range the log-normal hardly reaches
    inside = thresholds.lognormal_grid(cfg.grid_points * 64, cfg.grid_p_mean, cfg.grid_p_std)
    inside = inside[(inside >= lo) & (inside <= hi)]
    if len(inside) < cfg.grid_points:
        raise ConfigError(
            f"config key 'grid': the log-normal (grid_p_mean {cfg.grid_p_mean}, grid_p_std {cfg.grid_p_std}) "
            f"puts too few σ's inside [{lo:g}, {hi:g}] for {cfg.grid_points} grid points"
        )
    pick = np.linspace(0, len(inside) - 1, cfg.grid_points).round().astype(int)
    return inside[np.unique(pick)].tolist()


def _check_rules(cfg: AnnotateConfig, meta) -> None:
    """Every non-clean row must have a rule, before any work."""
    if cfg.classifier or cfg.fixed_sigma_min is not None:
        return
    quality = meta["quality"] if "quality" in meta else None
    todo = np.ones(len(meta), bool) if cfg.scorer or quality is None else (quality != "clean").to_numpy()
    if "source" in meta and cfg.fixed:
        todo = todo & ~meta["source"].isin(list(cfg.fixed)).to_numpy()
    if todo.any():
        raise ConfigError(
            f"{int(todo.sum())} rows are not clean and nothing annotates them: give --classifier, "
            "fixed_sigma_min, or --fixed SOURCE=SIGMA for their sources"
        )


# ------------------------------------------------------------------------------ phase 2: annotation


def annotate_rows(cfg: AnnotateConfig, plan: dict, meta, curves) -> dict:
    """σ_min, σ_max, quality and the annotation label per row (arrays aligned with ``meta``)."""
    n = len(meta)
    err = curves["error"].to_numpy()
    usable = err == ""
    quality = (
        meta["quality"].astype(str).to_numpy().copy() if "quality" in meta else np.full(n, "unknown", dtype=object)
    )
    score = curves["score"].to_numpy(dtype=np.float64)
    if cfg.scorer:
        ranked = np.where(usable, score, -np.inf)
        k = int(round(cfg.top_percent / 100.0 * usable.sum()))
        top = np.argsort(-ranked, kind="stable")[:k]
        quality = np.where(usable, "corrupted", quality).astype(object)
        quality[top] = "clean"
    smin = np.zeros(n)
    label = np.full(n, "", dtype=object)
    source = meta["source"].astype(str).to_numpy() if "source" in meta else np.full(n, "", dtype=object)
    fixed = np.array([s in cfg.fixed for s in source], bool)
    smin[fixed] = [cfg.fixed[s] for s in source[fixed]]
    label[fixed] = [f"fixed:{s}" for s in source[fixed]]
    clean = ~fixed & (quality == "clean")
    label[clean] = "clean"
    rest = usable & ~fixed & ~clean
    crossed_all = np.ones(n, bool)
    if cfg.classifier and rest.any():
        # per dataset = one σ_min per corrupted set: the curves are pooled within each corruption spec,
        # or over every non-clean row (sets="all"); per sample the grouping does not matter
        by_spec = cfg.sets == "corruption" and "corruption" in meta
        sets = meta["corruption"].fillna("").astype(str).to_numpy() if by_spec else np.full(n, "")
        grid = torch.tensor(plan["grid"])
        for name in dict.fromkeys(sets[rest]):
            sel = rest & (sets == name)
            cur = torch.from_numpy(np.stack(curves["noise_curve"].to_numpy()[sel]))
            if cfg.mode == "per-dataset":
                s, crossed = thresholds.sigma_min(cur, grid, cfg.tau, cfg.mode)
            else:  # shrunk: toward the curve of this sample's set
                std = torch.from_numpy(np.stack(curves["noise_std"].to_numpy()[sel]))
                s, crossed = thresholds.estimate_sigma_min(
                    cfg.rule, cur, grid, cfg.tau, std=std, draws=cfg.draws, span=cfg.span, z=cfg.z
                )
            smin[sel] = s.numpy()
            crossed_all[sel] = crossed.numpy()
            label[sel] = np.where(crossed.numpy(), "classifier", "classifier:never-crossed")
    elif rest.any():
        smin[rest] = cfg.fixed_sigma_min
        label[rest] = "fixed"
    smax = meta["sigma_max"].to_numpy(dtype=np.float64, na_value=0.0) if "sigma_max" in meta else np.zeros(n)
    if cfg.crops_classifier:
        smax = np.zeros(n)
        crops_rows = usable & ~clean
        if crops_rows.any():
            cur = np.stack(curves["crop_curve"].to_numpy()[crops_rows])
            s, _ = thresholds.sigma_max(torch.from_numpy(cur), torch.tensor(plan["grid"]), cfg.tau, cfg.crops_mode)
            smax[crops_rows] = s.numpy()
    return {
        "sigma_min": smin,
        "sigma_max": smax,
        "annotation": label,
        "quality": quality,
        "usable": usable,
        "never_crossed": ~crossed_all,
        "score": score,
    }


def write_outputs(
    cfg: AnnotateConfig, out: str, files: list[str], meta, rows: dict, err, provenance: dict
) -> tuple[int, int]:
    """The annotated shards and the quarantine; returns (rows out, rows quarantined)."""
    pos = {rid: i for i, rid in enumerate(meta["id"].tolist())}
    n_out = n_q = 0
    for f in files:
        fs, path = storage.filesystem(f)
        t = pq.read_table(path, filesystem=fs)
        t = t.drop_columns([c for c in ANNOTATION_COLUMNS if c in t.column_names])
        idx = np.array([pos[r] for r in t.column("id").to_pylist()], dtype=np.int64)
        ok = rows["usable"][idx]
        name = shards.shard_name(f)
        good = t.filter(pa.array(ok))
        gi = idx[ok]
        if cfg.scorer:  # the scorer's split replaces the quality column (otherwise it is kept as it was)
            quality = pa.array(rows["quality"][gi].astype(str))
            if "quality" in good.column_names:
                good = good.set_column(good.column_names.index("quality"), "quality", quality)
            else:
                good = good.append_column("quality", quality)
        good = good.append_column("sigma_min", pa.array(rows["sigma_min"][gi], pa.float32()))
        good = good.append_column("sigma_max", pa.array(rows["sigma_max"][gi], pa.float32()))
        good = good.append_column("annotation", pa.array(rows["annotation"][gi].astype(str)))
        if cfg.scorer:
            good = good.append_column("quality_score", pa.array(rows["score"][gi], pa.float32()))
        md = dict(good.schema.metadata or {})
        md[b"ambient_ray.annotation"] = json.dumps(provenance).encode()
        storage.write_parquet(storage.join(out, "data", f"{name}.parquet"), good.replace_schema_metadata(md))
        bad = t.filter(pa.array(~ok))
        qpath = storage.join(out, "quarantine", f"{name}.parquet")
        if bad.num_rows:
            q = pa.table(
                {
                    "id": bad.column("id"),
                    "source": bad.column("source")
                    if "source" in bad.column_names
                    else pa.nulls(bad.num_rows, pa.string()),
                    "stage": pa.array(["annotate"] * bad.num_rows),
                    "reason": pa.array(err[idx[~ok]].astype(str)),
                    "image": bad.column("image"),
                }
            )
            storage.write_parquet(qpath, q)
        elif storage.exists(qpath):
            storage.delete(qpath)
        n_out += good.num_rows
        n_q += bad.num_rows
    return n_out, n_q


# ------------------------------------------------------------------------------ the stage


class Annotate(ActorStage):
    """The annotate stage on :class:`ActorStage`: phase 1 (the curves) on the actor pool, phase 2 in
    :meth:`finish`. The curves' done-markers are in ``_curves_done`` of OUT, or of ``curves_from`` when it
    holds this very plan's curves."""

    label = "annotate"
    held = "curves from other classifiers, grid, draws, seed or data"
    replace = " to recompute them"
    outputs = (
        "curves",
        "_curves_done",
        "data",
        "quarantine",
        "locality.json",
        "latents.json",
        "annotation.json",
        "summary.json",
        "sigma_min.png",
        "sigma_max.png",
        "curves.png",
        "crop_curves.png",
    )

    def plan(self) -> None:
        from ambient_ray.data.metadata import data_dir, load_metadata, parquet_files

        cfg = self.cfg
        self.refuse_overlap(data_dir(cfg.data), "annotation")
        if not (cfg.classifier or cfg.crops_classifier or cfg.fixed or cfg.scorer or cfg.fixed_sigma_min is not None):
            raise ConfigError(
                "nothing to annotate with: give --classifier, --crops-classifier, --fixed SOURCE=SIGMA, "
                "--scorer or fixed_sigma_min"
            )
        self.files = parquet_files(cfg.data)  # a folder of shards or one Parquet file
        self.meta = load_metadata(cfg.data)
        _check_rules(cfg, self.meta)
        self.curves_plan = make_plan(cfg, self.out, self.files, self.meta)
        self.fingerprint = self.curves_plan["fingerprint"]
        self.shards = [shards.shard_name(f) for f in self.files]
        self.manifest = {"shards": len(self.files)}

    def claim(self) -> None:
        super().claim()
        self.curves_root = _reusable_curves(self.cfg, self.curves_plan, self.files) or self.out
        self.markers = storage.join(self.curves_root, "_curves_done")

    def work(self, todo: list[str]) -> list[dict]:
        wanted = set(todo)
        files = [f for f in self.files if shards.shard_name(f) in wanted]
        complete = "shards' curves complete"
        return self.actors(
            CurveActor, self.curves_plan, files, error=StageFailed, done="_curves_done", complete=complete
        )

    def finish(self, done: dict[str, dict], ran: list[dict], seconds: float) -> AnnotateResult:
        """Phase 2: σ_min (and σ_max) per row from the curves, the annotated shards, the report and plots."""
        import pandas as pd

        cfg, out, files, meta, plan = self.cfg, self.out, self.files, self.meta, self.curves_plan
        curves_root, results = self.curves_root, ran
        tables = []
        for f in files:
            c_uri = storage.join(curves_root, "curves", f"{shards.shard_name(f)}.parquet")
            fs, path = storage.filesystem(c_uri)
            tables.append(pq.read_table(path, filesystem=fs))
        curves = pa.concat_tables(tables).to_pandas().set_index("id").loc[meta["id"]].reset_index()
        rows = annotate_rows(cfg, plan, meta, curves)
        err = curves["error"].to_numpy()
        provenance = {
            "classifier": plan["classifier"],
            "crops_classifier": plan["crops_classifier"],
            "tau": cfg.tau,
            "mode": cfg.mode,
            "rule": cfg.rule if cfg.mode == "per-sample" else None,
            "span": cfg.span if cfg.rule == "smoothed" else None,
            "z": cfg.z if cfg.rule == "confident" else None,
            "sets": cfg.sets,
            "crops_mode": cfg.crops_mode,
            "grid": plan["grid"],
            "draws": cfg.draws,
            "weights": cfg.weights,
            "fixed": cfg.fixed,
            "fixed_sigma_min": cfg.fixed_sigma_min,
            "scorer": cfg.scorer,
            "top_percent": cfg.top_percent if cfg.scorer else None,
            "locality": storage.normalize(cfg.locality) if cfg.locality else None,
            "locality_eps": cfg.locality_eps,
            "data": storage.normalize(cfg.data),
            "curves": curves_root,
        }
        n_out, n_q = write_outputs(cfg, out, files, meta, rows, err, provenance)
        self.conserve(len(meta), len(meta), n_out, n_q)
        if plan["locality"]:
            storage.write_bytes(storage.join(out, "locality.json"), json.dumps(plan["locality"], indent=1).encode())
        latents = storage.join(storage.normalize(cfg.data), "latents.json")
        if storage.exists(
            latents
        ):  # precomputed latents: training and sampling read their normalisation beside the data
            storage.write_bytes(storage.join(out, "latents.json"), storage.read_bytes(latents))

        usable = rows["usable"]
        group = _groups(meta, rows)
        by_group = {g: rows["sigma_min"][(group == g) & usable] for g in dict.fromkeys(group[usable])}
        annotated = usable & (rows["annotation"] != "clean")
        summary = {
            "out": out,
            "rows_in": len(meta),
            "rows_out": n_out,
            "rows_quarantined": n_q,
            "shards": len(files),
            "shards_run": len(results),
            "shards_skipped": len(files) - len(results),
            "rows_run": int(sum(r["rows"] for r in results)),
            "seconds_curves": seconds,
            "images_per_s": sum(r["rows"] for r in results) / seconds if results and seconds > 0 else 0.0,
            "never_crossed": int((rows["never_crossed"] & usable).sum()),
            "mean_sigma_min": float(rows["sigma_min"][annotated].mean()) if annotated.any() else 0.0,
            "mean_sigma_min_by_group": {g: float(v.mean()) for g, v in by_group.items() if len(v)},
            "rows_with_sigma_max": int((rows["sigma_max"][usable] > 0).sum()),
            "annotations": pd.Series(rows["annotation"][usable]).value_counts().to_dict(),
            "provenance": provenance,
        }
        storage.write_bytes(storage.join(out, "annotation.json"), json.dumps(summary, indent=1, default=float).encode())
        files_out = _plots(cfg, plan, out, curves, rows, group, summary)
        _track(cfg, out, summary, files_out)
        if summary.get("mlflow_run_id"):
            storage.write_bytes(
                storage.join(out, "annotation.json"), json.dumps(summary, indent=1, default=float).encode()
            )
        return summary


def run(cfg: AnnotateConfig, *, progress: bool = True) -> AnnotateResult:
    """Run the annotate stage (Ray started in-process if not connected); returns the summary."""
    return Annotate(cfg, progress).run()


def _reusable_curves(cfg: AnnotateConfig, plan: dict, files: list[str]) -> str | None:
    """``curves_from`` when it holds every shard's curves for this very plan; else None (with a note why)."""
    if not cfg.curves_from:
        return None
    src = storage.normalize(cfg.curves_from)
    why = None
    if not storage.exists(storage.join(src, "_manifest.json")):
        why = "it holds no curves"
    elif shards.manifest_changed(src, plan["fingerprint"]):
        why = "its curves come from other classifiers, grid, draws, seed, crop sizes or data"
    else:
        done = shards.done_all(storage.join(src, "_curves_done"), plan["fingerprint"])
        missing = [f for f in files if shards.shard_name(f) not in done]
        if missing:
            why = f"{len(missing)} of {len(files)} shards' curves are unfinished there"
    if why:
        print(f"annotate: not reusing the curves in {src}: {why}; computing them in {plan['out']}")
        return None
    return src


def _groups(meta, rows) -> np.ndarray:
    """A label per row for plots and reports: 'clean', the corruption spec, or the annotation rule."""
    corr = (
        meta["corruption"].fillna("").astype(str).to_numpy()
        if "corruption" in meta
        else np.full(len(meta), "", dtype=object)
    )
    return np.where(corr != "", corr, rows["quality"]).astype(str)


def _plots(cfg, plan, out, curves, rows, group, summary) -> dict[str, bytes]:
    from ambient_ray.io import plots

    files: dict[str, bytes] = {"annotation.json": json.dumps(summary, indent=1, default=float).encode()}
    usable = rows["usable"]
    names = list(dict.fromkeys(group[usable]))
    hist = {g: rows["sigma_min"][(group == g) & usable & (rows["annotation"] != "clean")] for g in names}
    hist = {g: v for g, v in hist.items() if len(v)}
    if hist:
        files["sigma_min.png"] = plots.sigma_histogram(hist, title=f"σ_min per sample (τ={cfg.tau}, {cfg.mode})")
    for key, kind, fname in (
        ("noise_curve", "classifier", "curves.png"),
        ("crop_curve", "crops_classifier", "crop_curves.png"),
    ):
        if not plan[kind]:
            continue
        series = {}
        for g in names:
            sel = (group == g) & usable
            series[g] = np.stack(curves[key].to_numpy()[sel]).mean(axis=0)
        marks = {  # a dotted line in the group's colour, named in the legend
            f"mean σ_min {g}": (summary["mean_sigma_min_by_group"][g], g)
            for g in names
            if key == "noise_curve" and g != "clean" and summary["mean_sigma_min_by_group"].get(g, 0) > 0
        }
        title = (
            "noise classifier: mean P(clean) vs σ (Ambient-o Fig. 2)"
            if key == "noise_curve"
            else "crops classifier: P(target) of crop(σ) crops"
        )
        files[fname] = plots.prob_curves(plan["grid"], series, "σ", tau=cfg.tau, title=title, marks=marks)
    if cfg.crops_classifier and (rows["sigma_max"] > 0).any():
        files["sigma_max.png"] = plots.sigma_histogram(
            {"σ_max > 0": rows["sigma_max"][rows["sigma_max"] > 0]}, "σ_max per sample", "σ_max", {"σ_max > 0": "crops"}
        )
    for name, data in files.items():
        if name.endswith(".png"):
            storage.write_bytes(storage.join(out, name), data)
    return files


def _track(cfg: AnnotateConfig, out: str, summary: dict, files: dict[str, bytes]) -> None:
    import re

    from ambient_ray.io import tracking

    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": "annotate"})
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    metrics = {
        k: float(summary[k])
        for k in ("rows_in", "rows_out", "rows_quarantined", "never_crossed", "mean_sigma_min", "images_per_s")
    }
    for g, v in summary["mean_sigma_min_by_group"].items():
        metrics[f"mean_sigma_min.{re.sub(r'[^A-Za-z0-9_.-]', '_', g)}"] = v
    client = MlflowClient(uri)
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    tracking.log_files(run_id, uri, files)
    tracking.finish(run_id, uri)
    summary["mlflow_run_id"] = run_id
