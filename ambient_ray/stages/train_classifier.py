"""The train-classifier stage: Ambient-o's noise or crops classifier on the training engine.

``ambient-ray train-classifier --data URI --kind noise|crops --out URI`` trains a half U-Net
(:mod:`ambient_ray.classifier`) with binary cross-entropy on Ray Train + DeepSpeed, with the same
checkpoints, resume, failure handling and MLflow tracking as the diffusion model
(:mod:`ambient_ray.train.worker`).

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

from ambient_ray.io import storage
from ambient_ray.stages.results import ClassifierResult
from ambient_ray.train import driver, objectives
from ambient_ray.train.tasks.classifier_config import ClassifierTrainConfig


def run(cfg: ClassifierTrainConfig) -> ClassifierResult:
    """Train the classifier; returns a summary (out, checkpoint, MLflow run, final metrics)."""
    from ambient_ray.io import plots

    objective = objectives.for_stage(cfg.objective, "train-classifier")
    storage.check_reachable(storage.normalize(cfg.out))
    prepared = objective.prepare(cfg)
    ids = np.array(list(prepared.rows.labels))
    labels = np.array(list(prepared.rows.labels.values()))

    def artifacts(out: str, ckpt: str) -> dict[str, bytes]:
        curves = evaluation_curves(cfg, out, ids, labels)
        png = plots.prob_curves(*curves, tau=None, title=f"{cfg.kind} classifier (EMA)")
        storage.write_bytes(storage.join(out, "curves.png"), png)
        return {"curves.png": png}

    return driver.train(cfg, prepared, stage="train-classifier", artifacts=artifacts)


def evaluation_curves(cfg: ClassifierTrainConfig, out: str, ids: np.ndarray, labels: np.ndarray, per_class: int = 128):
    """The trained classifier's mean curves on up to ``per_class`` good and bad rows (``ids`` and their ``labels``):
    (x, {name: curve}, xlabel)."""
    import torch

    from ambient_ray.data.images import read_images
    from ambient_ray.models import classifier as clf
    from ambient_ray.models.weights import load

    net = load(out, cfg.kind)
    rng = np.random.default_rng(cfg.seed)
    series = {}
    g = torch.Generator().manual_seed(cfg.seed)
    grid = torch.logspace(np.log10(cfg.sigma_lo), np.log10(cfg.sigma_hi), 24)
    sizes = torch.tensor(cfg.resolved_crop_sizes())
    for name, lab in (("good", 1), ("bad", 0)):
        idx = np.nonzero(labels == lab)[0]
        pick = ids[rng.choice(idx, size=min(per_class, len(idx)), replace=False)]
        y = read_images(cfg.data, set(pick.tolist()))[1].float() / 127.5 - 1.0
        curve = clf.noise_curves(net, y, grid, 4, g) if cfg.kind == "noise" else clf.crop_curves(net, y, sizes, 4, g)
        series[f"{name} ({cfg.good if lab else cfg.bad or 'the rest'})"] = curve.mean(dim=0)
    if cfg.kind == "noise":
        return grid, series, "σ"
    return sizes.float(), series, "crop size (pixels)"
