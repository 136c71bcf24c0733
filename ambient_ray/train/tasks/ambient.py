"""The Ambient-o denoiser task (Ambient-o Sec. 3.1, App. D): σ drawn first and paired with an eligible row,
the row's own σ_n noise added, the ambient loss; σ-coverage (the "donut") and a fixed-noise validation loss.

Its config is :class:`ambient_ray.stages.train.TrainConfig`; the σ annotations arrive in the loop config as
``{"sigma_min": {id: σ}, "sigma_max": {id: σ}}``.
"""

from __future__ import annotations

import json
import math

import torch

from ambient_ray.diffusion import ambient, edm
from ambient_ray.models import registry
from ambient_ray.train import engine

# a diverged run reports VAL_LOSS_CAP, not NaN or inf: schedulers compare with <, where NaN is never
# worse, and take percentiles, where inf makes NaN
VAL_LOSS_CAP = 1e12


def model_meta(cfg, latents: dict | None = None) -> dict:
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


class AmbientTask:
    name = "train"

    def __init__(self, cfg, config: dict):
        self.cfg, self.config = cfg, config

    def build(self) -> torch.nn.Module:
        return registry.build(self.meta())

    def meta(self) -> dict:
        return model_meta(self.cfg, self.config.get("latents"))

    def setup(self, w: engine.Worker) -> None:
        cfg, config = self.cfg, self.config
        per_row = {"sigma_min": config["sigma_min"], "sigma_max": config["sigma_max"]}
        lat = config.get("latents")
        tensor = ("latent", lat["latent_shape"]) if lat else None
        _, rows, cols, self.labels = engine.load_rank_rows(w.rank, w.world, per_row, cfg.model.label_dim, tensor)
        # uint8 images, or latents (mean, std) drawn afresh at every use
        self.images = ambient.Latents(rows, torch.tensor(lat["shift"]), torch.tensor(lat["scale"])) if lat else rows
        self.smin, smax = cols["sigma_min"], cols["sigma_max"]
        a = cfg.ambient
        crop = ambient.CropTable(a.crop_sigmas, a.crop_sizes) if a.crop_sigmas else None
        kw = dict(lambda_max=a.lambda_max, p_mean=a.p_mean, p_std=a.p_std, crop=crop)
        self.sampler = ambient.SigmaSampler(self.smin, smax, **kw)
        # rank 0's dataset-wide view for the σ donut: eligible counts over all rows, draws summed over ranks
        self.view = None
        if w.rank == 0:
            all_min, all_max = (torch.tensor(list(config[k].values())) for k in ("sigma_min", "sigma_max"))
            self.view = ambient.SigmaSampler(all_min, all_max, **kw)
        self.n_buckets = len(self.sampler.coverage.edges) - 1
        self.bucket_loss, self.bucket_n = torch.zeros(self.n_buckets), torch.zeros(self.n_buckets)
        self.seen = 0
        self.val_rows = None
        if cfg.report_every:  # this rank's first val_rows clean rows (σ_min = 0), or its first rows if none is clean
            clean = torch.nonzero(self.smin == 0).flatten()
            self.val_rows = (clean if len(clean) else torch.arange(len(self.smin)))[: cfg.val_rows]

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            prefix = "sampler."
            self.sampler.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def loss(self, w: engine.Worker) -> torch.Tensor:
        b = ambient.ambient_batch(self.sampler, self.images, self.smin, self.cfg.batch_size, w.generator)
        cl = self.labels[b.index].to(w.device) if self.labels is not None else None
        # x_σ and σ stay fp32: the denoiser computes its preconditioning in fp32 and casts the
        # network input to the parameters' dtype (bf16 under DeepSpeed on GPU) itself
        d_out = w.engine(b.x_sigma.to(w.device), b.sigma.to(w.device), cl).float()
        loss, per_sample = ambient.batch_loss(d_out, b, self.cfg.ambient.sigma_data)
        k = self.sampler.coverage.bucket(b.sigma)
        self.bucket_loss.index_add_(0, k, per_sample.detach().float().cpu())
        self.bucket_n.index_add_(0, k, torch.ones_like(b.sigma))
        self.seen += self.cfg.batch_size
        return loss

    def interval(self, w: engine.Worker, seconds: float) -> tuple[dict, dict]:
        # summed over ranks: the interval's loss per σ bucket, and the σ-coverage counters
        c, n = self.sampler.coverage, self.n_buckets
        parts = [self.bucket_loss, self.bucket_n, c.draws, c.full_draws, c.crop_draws, torch.tensor([c.redraws])]
        b_loss, b_n, draws, full_draws, crop_draws, redraws = w.all_reduce(torch.cat(parts).double()).split(
            [n] * 5 + [1]
        )
        extra = {}
        if self.view is not None:
            vc = self.view.coverage
            vc.draws, vc.full_draws, vc.crop_draws = draws.long(), full_draws.long(), crop_draws.long()
            vc.redraws = int(redraws)
            extra = {f"loss_bucket_{i:02d}": float(b_loss[i] / b_n[i]) for i in range(n) if b_n[i] > 0}
            for i, row in enumerate(self.view.donut()):
                extra[f"draws_bucket_{i:02d}"] = float(row["draws"])
                extra[f"eligible_bucket_{i:02d}"] = float(row["eligible_full"] + row["eligible_crops"])
        metrics = {
            "loss": float(b_loss.sum() / b_n.sum().clamp(min=1)),
            "images_per_s": self.seen * w.world / max(seconds, 1e-9),
        }
        self.bucket_loss.zero_()
        self.bucket_n.zero_()
        self.seen = 0
        return metrics, extra

    def validation(self, w: engine.Worker) -> dict:
        """``val_loss`` (the mean over the fixed σ grid) and ``val_loss_sigma_<σ>``, over every rank's rows."""
        if self.val_rows is None:
            return {}
        rows = self.val_rows
        y = ambient.clean_rows(self.images, rows, torch.Generator().manual_seed(self.cfg.seed + 104729))
        lab = self.labels[rows].to(w.device) if self.labels is not None else None
        was_training = w.engine.module.training
        w.engine.module.eval()
        sums = edm.validation_losses(
            lambda x, s, c: w.engine(x.to(w.device), s.to(w.device), c),
            y,
            sigma_data=self.cfg.ambient.sigma_data,
            seed=self.cfg.seed + 7919,
            labels=lab,
        )
        w.engine.module.train(was_training)
        total = w.all_reduce(torch.cat([sums, torch.tensor([float(len(rows))])]).double())
        per_sigma = total[:-1] / total[-1].clamp(min=1)
        vals = [min(v, VAL_LOSS_CAP) if math.isfinite(v) else VAL_LOSS_CAP for v in per_sigma.tolist()]
        out = {f"val_loss_sigma_{s:g}": v for s, v in zip(edm.VAL_SIGMAS, vals)}
        out["val_loss"] = float(sum(vals) / len(vals))
        return out

    def progress(self, m: dict) -> str:
        return f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['images_per_s']:.0f} images/s"

    def state(self) -> dict[str, torch.Tensor]:
        return {f"sampler.{k}": v for k, v in self.sampler.state_dict().items()}

    def files(self) -> dict[str, str]:
        v = self.view
        return {"coverage.json": json.dumps({"donut": v.donut(), "redraws": v.coverage.redraws, "rows": v.n})}
