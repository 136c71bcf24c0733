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
- ``memorization_top1_mean``, ``memorization_top1_median``, ``memorization_share_above`` (Ambient
  Diffusion's memorization test, after Somepalli et al.): each sample's top-1 cosine similarity to the
  training set (``memorization.train_data``: by default the ``train`` key's rows; ``auto``: the data the
  samples' model was trained on) in ``memorization.features`` (by default the stage's ``features``,
  computed once for FD and this), and the share above ``memorization.threshold`` (0.95: a copy in DINOv2
  features). Held-out images (``holdout``) give the no-copy baseline in ``metrics.json`` and the histogram.
- ``proximal_fd`` (Denoising Score Distillation): the samples are corrupted like the training data
  (``proximal``, a corruption spec) and compared with the corrupted training rows; usable when no
  clean data exists.

Writes ``OUT/metrics.json`` (metrics, counts, the features used), ``OUT/config.yaml``, with ``train``
``OUT/nearest.png`` and, with training images for the similarity, ``OUT/memorization.png`` (the top-1
histogram), ``OUT/memorization_pairs.png`` (the most similar samples and their nearest training images) and
``OUT/memorization.npz`` (each sample's ``top_k`` neighbours); logs the metrics, params and files to an MLflow run.
"""

from __future__ import annotations

import io
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

# memorization.train_data: the data the samples' model was trained on, as its runs recorded it
TRAIN_AUTO = "auto"


class MemorizationConfig(Strict):
    """Nearest-neighbour similarity of the samples to the training set (Ambient Diffusion's memorization test)."""

    train_data: str | None = Field(
        None,
        description="training images to compare the samples with (a built-in name, .npy or stage output); "
        "default: the train key's; auto: the data the samples' model was trained on (the sample output's "
        "checkpoint, then that training run's data and rows); neither: the similarity metrics are off",
    )
    train_where: str | None = Field(
        None,
        description="row filter on those training images; default: train_where with the train key's images, "
        "the training run's rows with auto",
    )
    features: str | None = Field(
        None,
        pattern=FEATURE_SPEC,
        description="feature spec of the similarities; default: the stage's features (computed once for both)",
    )
    threshold: float = Field(
        0.95,
        ge=-1.0,
        le=1.0,
        description="a sample whose top-1 cosine similarity is above this counts as a copy (0.95: the same "
        "image in DINOv2 features)",
    )
    top_k: int = Field(3, ge=1, description="nearest training images kept per sample (memorization.npz)")
    pairs: int = Field(8, ge=1, le=64, description="most similar samples shown beside their nearest training images")


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
        None,
        description="the training data: adds the memorization share (and, by default, the similarity metrics)",
        json_schema_extra=flag("--train"),
    )
    train_where: str | None = Field(None, description="row filter on the training data, e.g. quality=clean")
    memorization_features: str = Field(
        "pixels", pattern=FEATURE_SPEC, description="feature spec for the memorization share's distances"
    )
    memorization_threshold: float = Field(
        1.0 / 3.0,
        gt=0,
        le=1,
        description="the memorization share counts a sample when d₁/d₂ < this (distances to its nearest and "
        "second nearest training images)",
    )
    memorization: MemorizationConfig = Field(default_factory=MemorizationConfig)
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


class _Features:
    """Feature extractors by spec, and each image set's features per spec, each computed once."""

    def __init__(self, device: str, progress: bool):
        self.device, self.progress = device, progress
        self._extractors: dict = {}
        self._features: dict[tuple[str, str], np.ndarray] = {}

    def extractor(self, spec: str):
        from ambient_ray.models import features as feats

        if spec not in self._extractors:
            self._extractors[spec] = feats.load(spec, self.device)
        return self._extractors[spec]

    def __call__(self, spec: str, name: str, images: np.ndarray, progress: bool | None = None) -> np.ndarray:
        if (spec, name) not in self._features:
            shown = self.progress if progress is None else progress
            self._features[spec, name] = self.extractor(spec)(images, shown)
        return self._features[spec, name]


def recorded_training_data(samples: str) -> tuple[str, str | None]:
    """(data, rows) the model behind a sample output was trained on: the sample output's ``config.yaml`` names
    its ``checkpoint``, and the training output's ``config.yaml`` (beside the checkpoint, or one folder up from a
    ``model/`` folder) names ``data`` and ``rows``. model.json records no data, so this is the record."""
    import yaml

    def config_of(folder: str) -> dict:
        uri = storage.join(folder, "config.yaml")
        if not storage.exists(uri):
            return {}
        data = yaml.safe_load(storage.read_bytes(uri))
        return data if isinstance(data, dict) else {}

    key = f"memorization.train_data={TRAIN_AUTO}"
    folder = storage.normalize(samples)
    checkpoint = config_of(folder).get("checkpoint") if not folder.endswith(".npy") else None
    if not checkpoint:
        raise cfgmod.DataError(
            f"{key}: {folder} records no checkpoint (not a sample output with its config.yaml); "
            "name the training images with memorization.train_data or --train"
        )
    checkpoint = storage.normalize(str(checkpoint)).rstrip("/")
    parent, _, base = checkpoint.rpartition("/")
    for d in (checkpoint, parent) if base == "model" else (checkpoint,):
        train = config_of(d)
        if train.get("data"):
            return str(train["data"]), train.get("rows")
    raise cfgmod.DataError(
        f"{key}: the samples' checkpoint {checkpoint} records no training data (no config.yaml with a data key "
        "beside it); name the training images with memorization.train_data or --train"
    )


def _memorization_source(cfg: EvaluateConfig) -> tuple[str, str | None] | None:
    """(URI, row filter) of the training images of the similarity metrics, or None (off)."""
    m = cfg.memorization
    if m.train_data is None:
        return (cfg.train, m.train_where or cfg.train_where) if cfg.train else None
    if m.train_data.strip() == TRAIN_AUTO:
        data, rows = recorded_training_data(cfg.samples)
        return data, m.train_where or rows
    return m.train_data, m.train_where


def _read_training(uri: str, where: str | None, key: str) -> np.ndarray:
    try:
        return read_array(uri, where)[0]
    except FileNotFoundError as e:
        raise cfgmod.DataError(f"{key}: {e}") from None


def compute(cfg: EvaluateConfig, progress: bool = False) -> tuple[dict, dict]:
    """(metrics, details): the numbers, and what they were computed from (counts, features, nearest pairs);
    the files the details come with (PNGs, arrays) are in ``details["files"]``."""
    from ambient_ray.corruptions import apply, parse
    from ambient_ray.evaluation import metrics

    samples, _ = read_array(cfg.samples)
    if cfg.max_samples:
        samples = samples[: cfg.max_samples]
    # the similarity's training images first: a missing or unrecorded one fails before any features are made
    mem_source = _memorization_source(cfg)
    mem_train = None
    if mem_source is not None:
        if mem_source == (cfg.train, cfg.train_where):
            mem_train = _read_training(cfg.train, cfg.train_where, "train")
        else:
            mem_train = _read_training(*mem_source, "memorization.train_data")
        _check_shapes(samples, mem_train, "memorization training")
    reference, _ = read_array(cfg.reference, cfg.reference_where)
    _check_shapes(samples, reference, "reference")
    device = _device(cfg.device)
    fx = _Features(device, progress)
    extract = fx.extractor(cfg.features)
    f_samples, f_ref = fx(cfg.features, "samples", samples), fx(cfg.features, "reference", reference)
    out: dict[str, float] = {"fd": metrics.frechet_distance(f_samples, f_ref)}
    out["precision"], out["recall"] = metrics.precision_recall(f_ref, f_samples, k=cfg.k)
    out["vendi"] = metrics.vendi_score(f_samples)
    details: dict = {
        "samples": len(samples),
        "reference": len(reference),
        "features": extract.name,
        "dim": int(f_samples.shape[1]),
    }
    files: dict[str, bytes] = {}
    holdout = None
    if cfg.holdout:
        holdout, _ = read_array(cfg.holdout, cfg.holdout_where)
        _check_shapes(samples, holdout, "holdout")
        out["fd_holdout"] = metrics.frechet_distance(f_samples, fx(cfg.features, "holdout", holdout))
        details["holdout"] = len(holdout)
    if cfg.train:
        train = mem_train if mem_source == (cfg.train, cfg.train_where) else None
        if train is None:
            train, _ = read_array(cfg.train, cfg.train_where)
        _check_shapes(samples, train, "training")
        spec = cfg.memorization_features
        f_s, f_t = fx(spec, "samples", samples, False), fx(spec, "train", train, False)
        share, ratio = metrics.memorization(f_s, f_t, cfg.memorization_threshold)
        out["memorization"] = share
        details["train"] = len(train)
        details["nearest"] = _nearest_pairs(f_s, f_t, ratio)
        files["nearest.png"] = _nearest_png(samples, train, details["nearest"])
    if mem_train is not None:
        name = "train" if mem_source == (cfg.train, cfg.train_where) else "memorization train"
        values, info, mem_files = _similarity(cfg, fx, samples, mem_train, name, holdout, device)
        out.update(values)
        details["memorization_similarity"] = {"train_data": mem_source[0], "train_where": mem_source[1], **info}
        files.update(mem_files)
    if cfg.proximal:
        corruption = parse(cfg.proximal)
        seeds = [cfg.seed * 1_000_003 + i for i in range(len(samples))]
        corrupted = np.stack(apply(corruption, list(samples), seeds))
        ref_uri = cfg.proximal_reference or cfg.train
        if not ref_uri:
            raise ValueError("proximal FD needs the corrupted training rows: set proximal_reference (or train)")
        prox_ref, _ = read_array(ref_uri, cfg.proximal_where)
        _check_shapes(samples, prox_ref, "proximal reference")
        out["proximal_fd"] = metrics.frechet_distance(
            fx(cfg.features, "proximal samples", corrupted), fx(cfg.features, "proximal reference", prox_ref)
        )
        details["proximal_reference"] = len(prox_ref)
        details["proximal"] = corruption.spec
    details["files"] = files
    return out, details


def _similarity(
    cfg: EvaluateConfig,
    fx: _Features,
    samples: np.ndarray,
    train: np.ndarray,
    name: str,
    holdout: np.ndarray | None,
    device: str,
) -> tuple[dict[str, float], dict, dict[str, bytes]]:
    """The similarity metrics, their details (features, counts, the most similar samples, the held-out
    baseline) and files (histogram, pairs, each sample's neighbours)."""
    from ambient_ray.evaluation import metrics
    from ambient_ray.io import plots

    m = cfg.memorization
    spec = m.features or cfg.features
    f_train = fx(spec, name, train)
    sims, idx = metrics.nearest_cosine(fx(spec, "samples", samples), f_train, m.top_k, device=device)
    values = {f"memorization_{k}": v for k, v in metrics.similarity_summary(sims[:, 0], m.threshold).items()}
    order = np.argsort(-sims[:, 0], kind="stable")[: m.pairs]
    info: dict = {
        "features": fx.extractor(spec).name,
        "train": len(train),
        "threshold": m.threshold,
        "top_k": int(sims.shape[1]),
        "most_similar": [
            {"sample": int(i), "neighbours": idx[i].tolist(), "similarity": [round(float(v), 6) for v in sims[i]]}
            for i in order
        ],
    }
    groups = {"samples": sims[:, 0]}
    if holdout is not None:  # real images the model never saw: how similar a non-copy is in this feature space
        h_sims, _ = metrics.nearest_cosine(fx(spec, "holdout", holdout), f_train, 1, device=device)
        info["holdout"] = metrics.similarity_summary(h_sims[:, 0], m.threshold)
        groups["held-out images"] = h_sims[:, 0]
    buf = io.BytesIO()
    np.savez_compressed(buf, similarity=sims.astype(np.float32), index=idx.astype(np.int64))
    neighbours = [
        ("nearest\ntraining" if r == 0 else f"neighbour {r + 1}", [train[idx[i, r]] for i in order])
        for r in range(sims.shape[1])
    ]
    files = {
        "memorization.png": plots.similarity_histogram(
            groups,
            m.threshold,
            title=f"top-1 similarity to the training set ({info['features']})",
            kinds={"held-out images": "clean"},
        ),
        "memorization_pairs.png": plots.image_rows(
            [("sample", [samples[i] for i in order]), *neighbours],
            title="most similar samples (top-1 similarity: " + ", ".join(f"{sims[i, 0]:.3f}" for i in order) + ")",
        ),
        "memorization.npz": buf.getvalue(),
    }
    return values, info, files


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
    extra = details.pop("files", {})
    report = {"metrics": values, **details}
    files = {
        "metrics.json": json.dumps(report, indent=1).encode(),
        "config.yaml": storage.read_bytes(storage.join(out, "config.yaml")),
        **extra,
    }
    for name, data in files.items():
        if name != "config.yaml":
            storage.write_bytes(storage.join(out, name), data)
    tags = {"stage": "evaluate", "features": details["features"], "samples": cfg.samples}
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags=tags)
    tracking.log_metrics(run_id, uri, values)
    tracking.log_files(run_id, uri, files)
    tracking.finish(run_id, uri)
    return {"out": out, "metrics": values, "details": details, "mlflow_run_id": run_id, "mlflow_uri": uri}
