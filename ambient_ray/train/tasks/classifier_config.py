"""Config and driver side of the annotation classifiers (``ambient-ray train-classifier``, Ambient-o Eq. 3.1 and
Sec. 3.2): which rows are good (1) and bad (0), the classifier's ``model.json``."""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import Field, field_validator, model_validator

from ambient_ray.config import ConfigError, flag
from ambient_ray.data.metadata import load_metadata, match, parse_filter
from ambient_ray.io import storage
from ambient_ray.models import registry
from ambient_ray.models.ddpmpp_config import ClassifierConfig, Kind
from ambient_ray.train.config import EngineConfig, check_run, data_field
from ambient_ray.train.prepared import Prepared


class ClassifierTrainConfig(EngineConfig):
    """Config of ``ambient-ray train-classifier`` (the engine's keys, plus the classifier's)."""

    data: str = data_field(required=True)
    objective: str = Field("classifier", description="the training objective: classifier (the only one here)")

    kind: Kind = Field(
        "noise",
        description="noise: c(x_σ, σ) for σ_min (Eq. 3.1); crops: target vs other crops for σ_max",
        json_schema_extra=flag("--kind"),
    )
    model: registry.config_type("classifier") = Field(
        default_factory=ClassifierConfig,
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
    sigma_hi: float = Field(20.0, gt=0, description="noise kind: the top of the σ range (above sigma_lo)")
    sigma_data: float = Field(
        0.5, gt=0, description="the data's standard deviation in the noise classifier's input scaling (EDM's c_in)"
    )
    crop_sizes: list[int] = Field(
        default_factory=list, description="crops kind: crop sizes (default: every even size up to the image)"
    )
    checkpoint_every: int = Field(200, ge=1, description="checkpoint every this many steps, and at the last step")
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=2, description="micro-batch per worker (balanced: half good, half bad)")

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


@dataclasses.dataclass
class ClassifierRows:
    """What the workers of a classifier run get from the driver: each row's label by id (1 good, 0 bad, -1 not
    trained on) and the classifier's ``model.json``."""

    labels: dict[str, int]
    meta: dict


def prepare(cfg: ClassifierTrainConfig) -> Prepared:
    """The driver side: the data's one image shape (the network's interface), the good/bad labels."""
    meta = load_metadata(cfg.data)
    h, c = check_run(cfg, meta)
    cfg.model = registry.with_interface(cfg.model, h, c)
    if cfg.kind == "crops" and max(cfg.resolved_crop_sizes()) > h:
        raise ConfigError(f"config key 'crop_sizes': {cfg.crop_sizes} has sizes above the image size {h}")
    labels = labels_of(meta, cfg)
    n_good, n_bad = int((labels == 1).sum()), int((labels == 0).sum())
    model = model_meta(cfg)
    return Prepared(
        meta=model,
        rows=ClassifierRows(dict(zip(meta["id"].tolist(), labels.tolist())), model),
        columns=["id", "image"],
        tags={"kind": cfg.kind, "good_rows": n_good, "bad_rows": n_bad},
        headline=f"train-classifier ({cfg.kind}): {n_good} good rows ({cfg.good}), "
        f"{n_bad} bad ({cfg.bad or 'the rest'})",
        extra={"good_rows": n_good, "bad_rows": n_bad},
    )
