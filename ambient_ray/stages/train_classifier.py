"""The train-classifier stage: Ambient-o's noise or crops classifier on the training engine.

``ambient-ray train-classifier --data URI --kind noise|crops --out URI`` trains a half U-Net
(:mod:`ambient_ray.classifier`) with binary cross-entropy on Ray Train + DeepSpeed, with the same
checkpoints, resume, failure handling and MLflow tracking as the diffusion model
(:mod:`ambient_ray.engine`).

Which rows are good (label 1) and bad (label 0) is a row filter ``field=v1,v2`` over ``quality``,
``source``, ``label`` or ``corruption``: by default ``good: quality=clean`` and bad = every other
row, i.e. S_G versus S_B of Eq. 3.1 for the noise classifier. A crops classifier needs the target
named, e.g. ``good: label=0,1,2,3,4`` (those digits are the target data, the others out of
distribution). Batches are balanced (half good, half bad) unless ``balanced: false``.

Outputs under OUT, as for ``train``: ``model/{ema,model}.safetensors`` and ``model/model.json``
(``kind`` noise or crops, the architecture, image size, σ range or crop sizes, the row filters),
``ray/train/checkpoint_*``, ``curves.png`` (the trained classifier's mean probability of "good" for
good and bad rows against σ, or against the crop size: Ambient-o Fig. 2), ``config.yaml``,
``mlflow_run.json``, ``summary.json``.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ambient_ray.config import ConfigError, flag
from ambient_ray.data.metadata import load_metadata, match, parse_filter
from ambient_ray.io import storage
from ambient_ray.models import classifier as clf
from ambient_ray.models import registry
from ambient_ray.stages.results import ClassifierResult
from ambient_ray.train import engine, loop
from ambient_ray.train.engine import EngineConfig
from ambient_ray.train.tasks.classifier import ClassifierTask


class ClassifierTrainConfig(EngineConfig):
    """Config of ``ambient-ray train-classifier`` (the engine's keys, plus the classifier's)."""

    kind: clf.Kind = Field(
        "noise",
        description="noise: c(x_σ, σ) for σ_min (Eq. 3.1); crops: target vs other crops for σ_max",
        json_schema_extra=flag("--kind"),
    )
    model: registry.config_type("classifier") = Field(
        default_factory=clf.ClassifierConfig,
        description="the half U-Net (model.arch classifier); resolution and channels come from the data",
    )
    good: str = Field(
        "quality=clean",
        description="rows labelled 1 (S_G, or the target data): FIELD=V1[,V2...]",
        json_schema_extra=flag("--good"),
    )
    bad: str | None = Field(
        None,
        description="rows labelled 0 (S_B, or other data); default: every row not good",
        json_schema_extra=flag("--bad"),
    )
    balanced: bool = Field(True, description="half good, half bad in every batch (the paper's default)")
    sigma_lo: float = Field(0.01, gt=0, description="noise kind: σ log-uniform on [sigma_lo, sigma_hi]")
    sigma_hi: float = Field(20.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    crop_sizes: list[int] = Field(
        default_factory=list, description="crops kind: crop sizes (default: every even size up to the image)"
    )
    checkpoint_every: int = Field(200, ge=1)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2)

    @field_validator("good", "bad")
    @classmethod
    def _filter(cls, v: str | None) -> str | None:
        if v is not None:
            parse_filter(v)
        return v

    @model_validator(mode="after")
    def _ranges(self) -> "ClassifierTrainConfig":
        if self.sigma_hi <= self.sigma_lo:
            raise ValueError(f"sigma_hi ({self.sigma_hi}) must exceed sigma_lo ({self.sigma_lo})")
        if any(s < 1 for s in self.crop_sizes):
            raise ValueError(f"crop_sizes must be >= 1 (got {self.crop_sizes})")
        return self

    def resolved_crop_sizes(self) -> list[int]:
        res = self.model.img_resolution
        return sorted(set(self.crop_sizes)) if self.crop_sizes else list(range(2, res + 1, 2))


def model_meta(cfg: ClassifierTrainConfig) -> dict:
    """``model.json`` of a classifier: what rebuilds it, and what annotation must check against."""
    return {
        "kind": cfg.kind,
        "arch": cfg.model.arch,
        "model": cfg.model.model_dump(mode="json"),
        "sigma_data": cfg.sigma_data,
        "img_resolution": cfg.model.img_resolution,
        "in_channels": cfg.model.in_channels,
        "sigma_range": [cfg.sigma_lo, cfg.sigma_hi],
        "crop_sizes": cfg.resolved_crop_sizes(),
        "good": cfg.good,
        "bad": cfg.bad,
        "balanced": cfg.balanced,
        "data": storage.normalize(cfg.data),
    }


def labels_of(meta, cfg: ClassifierTrainConfig) -> np.ndarray:
    """1 good, 0 bad, -1 neither (not trained on); clear errors when a side is empty or both overlap."""
    good = match(meta, cfg.good)
    bad = match(meta, cfg.bad) if cfg.bad else ~good
    both = good & bad
    if both.any():
        raise ValueError(
            f"{int(both.sum())} rows match both good={cfg.good!r} and bad={cfg.bad!r}, "
            f"e.g. {meta['id'][both].head(3).tolist()}"
        )
    if not good.any() or not bad.any():
        side = "good" if not good.any() else "bad"
        raise ValueError(
            f"no {side} rows in {cfg.data} (good={cfg.good!r}, bad={cfg.bad or 'the rest'!r}): a classifier needs both"
        )
    return np.where(good, 1, np.where(bad, 0, -1))


# ------------------------------------------------------------------------------ worker


def classifier_loop(config: dict) -> None:
    """Ray Train worker function: BCE on balanced batches of noised images or crops."""
    cfg = ClassifierTrainConfig.model_validate(config["cfg"])
    loop.run(ClassifierTask(cfg, config, model_meta(cfg)), cfg, config)


# ------------------------------------------------------------------------------ driver


def run(cfg: ClassifierTrainConfig) -> ClassifierResult:
    """Train the classifier; returns a summary (out, checkpoint, MLflow run, final metrics)."""
    from ambient_ray.io import plots

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    meta = load_metadata(cfg.data)
    h, c = engine.check_run(cfg, meta)
    cfg.model = registry.with_interface(cfg.model, h, c)
    if cfg.kind == "crops" and max(cfg.resolved_crop_sizes()) > h:
        raise ConfigError(f"config key 'crop_sizes': {cfg.crop_sizes} has sizes above the image size {h}")
    labels = labels_of(meta, cfg)
    n_good, n_bad = int((labels == 1).sum()), int((labels == 0).sum())

    def artifacts(out: str, ckpt: str) -> dict[str, bytes]:
        curves = evaluation_curves(cfg, out, meta, labels)
        png = plots.prob_curves(*curves, tau=None, title=f"{cfg.kind} classifier (EMA)")
        storage.write_bytes(storage.join(out, "curves.png"), png)
        return {"curves.png": png}

    return engine.train(
        cfg,
        classifier_loop,
        model_meta(cfg),
        {"labels": dict(zip(meta["id"].tolist(), labels.tolist()))},
        ["id", "image"],
        stage="train-classifier",
        tags={"kind": cfg.kind, "good_rows": n_good, "bad_rows": n_bad},
        headline=f"train-classifier ({cfg.kind}): {n_good} good rows ({cfg.good}), "
        f"{n_bad} bad ({cfg.bad or 'the rest'})",
        artifacts=artifacts,
        extra={"good_rows": n_good, "bad_rows": n_bad},
    )


def evaluation_curves(cfg: ClassifierTrainConfig, out: str, meta, labels: np.ndarray, per_class: int = 128):
    """The trained classifier's mean curves on up to ``per_class`` good and bad rows: (x, {name: curve}, xlabel)."""
    from ambient_ray.data.images import read_images
    from ambient_ray.io.weights import load

    net = load(out, cfg.kind)
    rng = np.random.default_rng(cfg.seed)
    series = {}
    g = torch.Generator().manual_seed(cfg.seed)
    grid = torch.logspace(np.log10(cfg.sigma_lo), np.log10(cfg.sigma_hi), 24)
    sizes = torch.tensor(cfg.resolved_crop_sizes())
    for name, lab in (("good", 1), ("bad", 0)):
        idx = np.nonzero(labels == lab)[0]
        ids = meta["id"].to_numpy()[rng.choice(idx, size=min(per_class, len(idx)), replace=False)]
        y = read_images(cfg.data, set(ids.tolist()))[1].float() / 127.5 - 1.0
        curve = clf.noise_curves(net, y, grid, 4, g) if cfg.kind == "noise" else clf.crop_curves(net, y, sizes, 4, g)
        series[f"{name} ({cfg.good if lab else cfg.bad or 'the rest'})"] = curve.mean(dim=0)
    if cfg.kind == "noise":
        return grid, series, "σ"
    return sizes.float(), series, "crop size (pixels)"
