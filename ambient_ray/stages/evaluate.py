"""The evaluate stage: sample-quality metrics of generated images, to JSON and MLflow.

``ambient-ray evaluate --samples URI --reference URI [--features SPEC] [--holdout URI] [--train URI]
[--proximal SPEC --proximal-reference URI] --out URI``

Images come from a built-in dataset name, a ``.npy`` array, a sample output (``samples.npy``) or a
stage output's Parquet rows (with a row filter such as ``quality=clean``). Features come from
:mod:`ambient_ray.features` (Inception, DINOv2, the in-project net, or pixels). Metrics
(:mod:`ambient_ray.metrics`):

- ``fd``: Fréchet distance to the reference (FID with Inception features); ``fd_holdout`` to a
  held-out split, if given; ``precision``/``recall`` (k-NN manifolds) against the reference.
- ``vendi``: the Vendi diversity score of the samples.
- ``memorization``: the share of samples whose nearest training image is < 1/3 of the distance to
  the second nearest (in ``memorization_features``, raw pixels by default: a copy is a copy of
  pixels); ``nearest.png`` shows the most copy-like samples beside their nearest training images.
- ``proximal_fd`` (Denoising Score Distillation): the samples are corrupted like the training data
  (``proximal``, a corruption spec) and compared with the corrupted training rows; usable when no
  clean data exists.

Writes ``OUT/metrics.json`` (metrics, counts, the features used), ``OUT/config.yaml`` and, with
``train``, ``OUT/nearest.png``; logs the metrics, params and files to an MLflow run.
"""

from __future__ import annotations

import json
import time

import numpy as np
from pydantic import Field

from ambient_ray import config as cfgmod
from ambient_ray.config import Strict, flag
from ambient_ray.data.sources import read_array
from ambient_ray.io import storage
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages.results import EvaluateResult

# a feature spec (see ambient_ray.models.features.load), checked when the config is built
FEATURE_SPEC = r"^\s*(pixels|inception@\S.*|dinov2(:[^@]*)?@\S.*|net@\S.*)\s*$"


class EvaluateConfig(Strict):
    """Config of ``ambient-ray evaluate``."""

    samples: str = Field(
        ...,
        description="generated images: a sample output folder, .npy, or stage output",
        json_schema_extra=flag("--samples"),
    )
    reference: str = Field(
        ...,
        description="reference images: a built-in name, .npy, or stage output",
        json_schema_extra=flag("--reference"),
    )
    reference_where: str | None = Field(
        None,
        description="row filter on the reference, e.g. quality=clean",
        json_schema_extra=flag("--reference-where"),
    )
    holdout: str | None = Field(
        None, description="a held-out reference split: adds fd_holdout", json_schema_extra=flag("--holdout")
    )
    holdout_where: str | None = Field(None, description="row filter on the held-out reference, e.g. quality=clean")
    features: str = Field(
        "pixels",
        pattern=FEATURE_SPEC,
        description="pixels, inception@WEIGHTS, dinov2[:ARCH]@WEIGHTS or net@FOLDER",
        json_schema_extra=flag("--features"),
    )
    train: str | None = Field(
        None, description="the training data: adds the memorization share", json_schema_extra=flag("--train")
    )
    train_where: str | None = Field(None, description="row filter on the training data, e.g. quality=clean")
    memorization_features: str = Field(
        "pixels", pattern=FEATURE_SPEC, description="feature spec for the memorization distances"
    )
    memorization_threshold: float = Field(
        1.0 / 3.0,
        gt=0,
        le=1,
        description="a sample counts as memorized when d₁/d₂ < this (distances to its nearest and second "
        "nearest training images)",
    )
    proximal: str | None = Field(
        None, description="corruption spec of the training data: adds proximal_fd", json_schema_extra=flag("--proximal")
    )
    proximal_reference: str | None = Field(
        None, description="corrupted training rows (default: train)", json_schema_extra=flag("--proximal-reference")
    )
    proximal_where: str | None = Field("quality=corrupted", description="row filter on the proximal reference")
    k: int = Field(3, ge=1, description="k of the k-NN precision/recall")
    max_samples: int | None = Field(None, ge=2, description="use at most this many samples (the first ones)")
    seed: int = Field(0, ge=0, description="seeds of the proximal corruption")
    device: str = Field("auto", description="auto (cuda if available), cpu or cuda")
    out: str = Field(..., description="output URI (metrics.json)", json_schema_extra=flag("--out"))
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _check_shapes(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"the samples are {a.shape[1:]} (H, W, C) but the {what} images are {b.shape[1:]}")


def compute(cfg: EvaluateConfig, progress: bool = False) -> tuple[dict, dict]:
    """(metrics, details): the numbers, and what they were computed from (counts, features, nearest pairs)."""
    from ambient_ray.corruptions import apply, parse
    from ambient_ray.evaluation import metrics
    from ambient_ray.models import features as feats

    samples, _ = read_array(cfg.samples)
    if cfg.max_samples:
        samples = samples[: cfg.max_samples]
    reference, _ = read_array(cfg.reference, cfg.reference_where)
    _check_shapes(samples, reference, "reference")
    device = _device(cfg.device)
    extract = feats.load(cfg.features, device)
    f_samples, f_ref = extract(samples, progress), extract(reference, progress)
    out: dict[str, float] = {"fd": metrics.frechet_distance(f_samples, f_ref)}
    out["precision"], out["recall"] = metrics.precision_recall(f_ref, f_samples, k=cfg.k)
    out["vendi"] = metrics.vendi_score(f_samples)
    details: dict = {
        "samples": len(samples),
        "reference": len(reference),
        "features": extract.name,
        "dim": int(f_samples.shape[1]),
    }
    if cfg.holdout:
        holdout, _ = read_array(cfg.holdout, cfg.holdout_where)
        _check_shapes(samples, holdout, "holdout")
        out["fd_holdout"] = metrics.frechet_distance(f_samples, extract(holdout, progress))
        details["holdout"] = len(holdout)
    if cfg.train:
        train, _ = read_array(cfg.train, cfg.train_where)
        _check_shapes(samples, train, "training")
        mem = extract if cfg.memorization_features == cfg.features else feats.load(cfg.memorization_features, device)
        f_s, f_t = mem(samples), mem(train)
        share, ratio = metrics.memorization(f_s, f_t, cfg.memorization_threshold)
        out["memorization"] = share
        details["train"] = len(train)
        details["nearest"] = _nearest_pairs(f_s, f_t, ratio)
        details["nearest_png"] = _nearest_png(samples, train, details["nearest"])
    if cfg.proximal:
        corruption = parse(cfg.proximal)
        seeds = [cfg.seed * 1_000_003 + i for i in range(len(samples))]
        corrupted = np.stack(apply(corruption, list(samples), seeds))
        ref_uri = cfg.proximal_reference or cfg.train
        if not ref_uri:
            raise ValueError("proximal FD needs the corrupted training rows: set proximal_reference (or train)")
        prox_ref, _ = read_array(ref_uri, cfg.proximal_where)
        _check_shapes(samples, prox_ref, "proximal reference")
        out["proximal_fd"] = metrics.frechet_distance(extract(corrupted, progress), extract(prox_ref, progress))
        details["proximal_reference"] = len(prox_ref)
        details["proximal"] = corruption.spec
    return out, details


def _nearest_pairs(
    f_samples: np.ndarray, f_train: np.ndarray, ratio: np.ndarray, n: int = 8
) -> list[tuple[int, int, float]]:
    """(sample index, nearest training index, ratio) of the ``n`` most copy-like samples."""
    import torch

    order = np.argsort(ratio)[:n]
    d = torch.cdist(torch.from_numpy(f_samples[order]), torch.from_numpy(f_train))
    return [(int(i), int(j), float(ratio[i])) for i, j in zip(order, d.argmin(1).tolist())]


def _nearest_png(samples: np.ndarray, train: np.ndarray, pairs: list[tuple[int, int, float]]) -> bytes:
    from ambient_ray.io import plots

    return plots.image_rows(
        [("sample", [samples[i] for i, _, _ in pairs]), ("nearest\ntraining", [train[j] for _, j, _ in pairs])],
        title="most copy-like samples (d1/d2: " + ", ".join(f"{r:.2f}" for _, _, r in pairs) + ")",
    )


def run(cfg: EvaluateConfig, progress: bool = True) -> EvaluateResult:
    """Evaluate; returns {"out", "metrics", "details", "mlflow_run_id"}."""
    from ambient_ray.io import tracking

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    t0 = time.perf_counter()
    values, details = compute(cfg, progress)
    details["seconds"] = time.perf_counter() - t0
    cfgmod.save_resolved(cfg, out)
    png = details.pop("nearest_png", None)
    report = {"metrics": values, **details}
    files = {
        "metrics.json": json.dumps(report, indent=1).encode(),
        "config.yaml": storage.read_bytes(storage.join(out, "config.yaml")),
    }
    if png:
        files["nearest.png"] = png
    for name, data in files.items():
        if name != "config.yaml":
            storage.write_bytes(storage.join(out, name), data)
    tags = {"stage": "evaluate", "features": details["features"], "samples": cfg.samples}
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags=tags)
    tracking.log_metrics(run_id, uri, values)
    tracking.log_files(run_id, uri, files)
    tracking.finish(run_id, uri)
    return {"out": out, "metrics": values, "details": details, "mlflow_run_id": run_id, "mlflow_uri": uri}
