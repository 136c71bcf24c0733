"""The features stage: train the in-project feature network (:mod:`ambient_ray.models.features`) on built-in
data, so digits and faces get an honest FD with no download (``ambient-ray features``)."""

from __future__ import annotations

from pydantic import Field

from ambient_ray.config import Strict, flag
from ambient_ray.io import storage
from ambient_ray.stages.results import FeaturesResult


class FeaturesConfig(Strict):
    """Config of ``ambient-ray features`` (train the in-project feature network)."""

    dataset: str = Field(
        "digits", description="built-in name or a stage output URI", json_schema_extra=flag("--dataset")
    )
    where: str | None = Field(
        None, description="row filter on a stage output, e.g. quality=clean", json_schema_extra=flag("--where")
    )
    out: str = Field(..., description="output URI (use it as --features net@OUT)", json_schema_extra=flag("--out"))
    steps: int = Field(
        400,
        ge=1,
        description="training steps (AdamW, one-cycle schedule)",
        json_schema_extra=flag("--steps", "training steps"),
    )
    batch_size: int = Field(128, ge=2, description="images per training step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate of the one-cycle schedule")
    width: int = Field(16, ge=8, description="channels of the first conv stage (a multiple of 8)")
    dim: int = Field(64, ge=2, description="feature dimension")
    seed: int = Field(0, ge=0, description="seed of the initial weights, the held-out tenth and the batches")
    use_labels: bool = Field(True, description="train on the labels when the data has them (else: rotation)")


def run(cfg: FeaturesConfig, progress: bool = True) -> FeaturesResult:
    """Train and save the feature network; returns {"out", "spec", "accuracy", "task"}."""
    from ambient_ray.data.sources import read_array
    from ambient_ray.models.features import save_feature_net, train_feature_net

    if cfg.width % 8:
        raise ValueError(f"config key 'width': {cfg.width} is not a multiple of 8 (GroupNorm groups)")
    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    images, labels = read_array(cfg.dataset, cfg.where)
    net, meta, accuracy = train_feature_net(
        images,
        labels if cfg.use_labels else None,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        width=cfg.width,
        dim=cfg.dim,
        progress=progress,
    )
    meta["dataset"], meta["where"] = cfg.dataset, cfg.where
    save_feature_net(net, meta, out)
    return {"out": out, "spec": f"net@{out}", "accuracy": accuracy, "task": meta["task"]}
