"""The annotation-classifier task (Ambient-o Eq. 3.1 and Sec. 3.2): binary cross-entropy of the half U-Net on
balanced batches of noised images (``noise``) or crops (``crops``).

Its config is :class:`ambient_ray.train.tasks.classifier_config.ClassifierTrainConfig`; the good (1) / bad (0)
labels arrive as :class:`~ambient_ray.train.tasks.classifier_config.ClassifierRows` (-1: not trained on).
"""

from __future__ import annotations

import torch

from ambient_ray.models import classifier as clf
from ambient_ray.models import registry
from ambient_ray.train.parts import Part
from ambient_ray.train.rows import load_rank_rows
from ambient_ray.train.worker import Worker


class ClassifierTask:
    name = "train_classifier"

    def __init__(self, cfg, rows):
        self.cfg, self.rows = cfg, rows

    def parts(self) -> dict[str, Part]:
        return {"net": Part(self.build(), export=True)}

    def build(self) -> torch.nn.Module:
        return registry.build(self.rows.meta)

    def meta(self) -> dict:
        return self.rows.meta

    def setup(self, w: Worker) -> None:
        _, images, cols, _ = load_rank_rows(w.rank, w.world, {"target": self.rows.labels})
        keep = cols["target"] >= 0
        self.images, self.target = images[keep], cols["target"][keep]
        if not (self.target == 1).any() or not (self.target == 0).any():
            raise RuntimeError(f"rank {w.rank} of {w.world} got rows of one class only: use fewer workers or more data")
        self.crop_sizes = self.cfg.resolved_crop_sizes()
        self.loss_sum = self.correct = self.seen = 0.0

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass  # the batches draw from the worker's generator, which the worker restores

    def loss(self, w: Worker, part: str = "net") -> torch.Tensor:
        cfg = self.cfg
        x, sigma, y = clf.classifier_batch(
            cfg.kind,
            self.images,
            self.target,
            cfg.batch_size,
            balanced=cfg.balanced,
            sigma_lo=cfg.sigma_lo,
            sigma_hi=cfg.sigma_hi,
            crop_sizes=self.crop_sizes,
            generator=w.generator,
        )
        logits = w.engine(x.to(w.device), sigma.to(w.device) if sigma is not None else None)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.to(w.device))  # Eq. 3.1
        self.loss_sum += float(loss.detach()) * len(y)
        self.correct += float(((logits.detach() > 0).float().cpu() == y).sum())
        self.seen += len(y)
        return loss

    def interval(self, w: Worker, seconds: float) -> tuple[dict, dict]:
        tot = w.all_reduce(torch.tensor([self.loss_sum, self.correct, self.seen], dtype=torch.float64))
        self.loss_sum = self.correct = self.seen = 0.0
        metrics = {
            "loss": float(tot[0] / tot[2]),
            "accuracy": float(tot[1] / tot[2]),
            "images_per_s": float(tot[2]) / max(seconds, 1e-9),
        }
        return metrics, {}

    def validation(self, w: Worker) -> dict:
        return {}

    def progress(self, m: dict) -> str:
        return f"loss {m['loss']:.4f}  accuracy {m['accuracy']:.3f}  {m['images_per_s']:.0f} images/s"

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def files(self) -> dict[str, str]:
        return {}
