"""The Ambient-o denoiser task (Ambient-o Sec. 3.1, App. D): σ drawn first and paired with an eligible row,
the row's own σ_n noise added, the ambient loss; σ-coverage (the "donut") and a fixed-noise validation loss.

Its config is :class:`ambient_ray.stages.train.TrainConfig`; the σ annotations arrive in the loop config as
``{"sigma_min": {id: σ}, "sigma_max": {id: σ}}``.
"""

from __future__ import annotations

import json
import math

import numpy as np
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
        self.pools = None
        # a network with a learned log-variance u(σ) (EDM2) trains with its uncertainty weighting
        self.logvar = bool(getattr(w.net, "has_logvar", False))
        self.wait_seen = 0.0
        if self.config.get("stream"):
            return self.setup_stream(w)
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

    def setup_stream(self, w: engine.Worker) -> None:
        """Streaming: this worker reads only its share (Ray Data ``streaming_split``) into bounded
        per-stratum pools (:mod:`ambient_ray.data.streaming`); σ-first pairing through the stratified
        sampler with the dataset-wide stratum counts (:mod:`ambient_ray.diffusion.stratified`)."""
        from ambient_ray.data import streaming
        from ambient_ray.data.images import decode_png
        from ambient_ray.diffusion import stratified

        cfg, st, lat = self.cfg, self.config["stream"], self.config.get("latents")
        a = cfg.ambient
        crop = ambient.CropTable(a.crop_sigmas, a.crop_sizes) if a.crop_sigmas else None
        table = stratified.strata_table(st["edges"])
        self.n_full = torch.zeros(len(table), dtype=torch.long)
        self.n_full[torch.tensor(st["strata"], dtype=torch.long)] = torch.tensor(st["counts"], dtype=torch.long)
        self.table, self.crop = table, crop
        self.sampler = self.stratified(self.n_full)
        self.view = self.stratified(self.n_full) if w.rank == 0 else None
        # pool sizes by each stratum's share of the draws (σ's drawn with a fixed seed: the same on every rank)
        g, sizing = torch.Generator().manual_seed(cfg.seed + 31337), self.stratified(self.n_full)
        probs = sizing.stratum_probs(sizing.sample(20_000, g)[0]).mean(0)
        caps = streaming.capacities(probs, self.sampler.active, cfg.stream.pool_rows)
        label_dim, shape = cfg.model.label_dim, lat["latent_shape"] if lat else None

        def rows(batch: dict) -> dict:  # a Ray Data batch -> x (image uint8 CHW or latent), σ's, label
            n = len(batch["id"])
            if lat:
                x = np.asarray(batch["latent"], dtype=np.float32).reshape(n, *shape)
            else:
                x = np.stack([decode_png(b).transpose(2, 0, 1) for b in batch["image"]])
            label = batch["label"] if label_dim and "label" in batch else np.zeros(n)
            return {
                "x": x,
                "sigma_min": np.array(batch["sigma_min"], np.float32),  # copies: Ray's arrays are read-only
                "sigma_max": np.array(batch["sigma_max"], np.float32),
                "label": np.nan_to_num(np.asarray(label, np.float64)).astype(np.int64),
            }

        def stratum_of(batch: dict) -> np.ndarray:
            return stratified.strata_of(batch["sigma_min"], batch["sigma_max"], a.lambda_max, st["edges"])[0].numpy()

        stream = ((rows(b), e) for b, e in engine.stream_batches(cfg.stream.read_batch))
        self.pools = streaming.StratumPools(
            stream, stratum_of, caps, torch.Generator().manual_seed(cfg.seed * 7 + w.rank)
        )
        self.latents = (
            ambient.Latents(torch.zeros(0), torch.tensor(lat["shift"]), torch.tensor(lat["scale"])) if lat else None
        )
        self.labels = True if label_dim else None
        self.n_buckets = len(self.sampler.coverage.edges) - 1
        self.bucket_loss, self.bucket_n = torch.zeros(self.n_buckets), torch.zeros(self.n_buckets)
        self.seen = 0
        self.val_rows = None
        if cfg.report_every:  # the first val_rows rows of this worker's clean strata (or of any, if none is clean)
            clean = [
                k for k in self.sampler.active.tolist() if float(table[k, 0]) == 0.0
            ] or self.sampler.active.tolist()
            picks = [self.pools.take(torch.full((cfg.val_rows,), k)) for k in clean[:1]]
            if picks and picks[0] is not None:
                self.val = picks[0]
                self.val_rows = torch.arange(cfg.val_rows)

    def stratified(self, n: torch.Tensor):
        from ambient_ray.diffusion.stratified import StratifiedSigmaSampler

        a = self.cfg.ambient
        return StratifiedSigmaSampler(
            self.table[:, 0], self.table[:, 1], n, p_mean=a.p_mean, p_std=a.p_std, crop=self.crop
        )

    def stream_batch(self, w: engine.Worker) -> tuple[ambient.Batch, torch.Tensor | None]:
        """σ first, then a stratum, then a row of its pool; a stratum absent from this worker's share is
        dropped from its draws (counted in the pools) and the batch redrawn."""
        while True:
            sigma, strata, crop_size = self.sampler.sample(self.cfg.batch_size, w.generator)
            rows = self.pools.take(strata)
            if rows is not None:
                break
            n = self.n_full.clone()
            n[torch.tensor(sorted(self.pools.absent), dtype=torch.long)] = 0
            state = self.sampler.state_dict()
            self.sampler = self.stratified(n)
            self.sampler.load_state_dict(state)
        y = self.latents.draw(rows["x"], w.generator) if self.latents is not None else rows["x"].float() / 127.5 - 1.0
        b = ambient.noise_batch(sigma, y, rows["sigma_min"], crop_size, torch.arange(len(sigma)), w.generator)
        return b, rows["label"] if self.labels is not None else None

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            prefix = "sampler."
            self.sampler.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def loss(self, w: engine.Worker) -> torch.Tensor:
        if self.pools is not None:
            b, cl = self.stream_batch(w)
            cl = cl.to(w.device) if cl is not None else None
        else:
            b = ambient.ambient_batch(self.sampler, self.images, self.smin, self.cfg.batch_size, w.generator)
            cl = self.labels[b.index].to(w.device) if self.labels is not None else None
        # x_σ and σ stay fp32: the denoiser computes its preconditioning in fp32 and casts the
        # network input to the parameters' dtype (bf16 under DeepSpeed on GPU) itself
        out = w.engine(
            b.x_sigma.to(w.device), b.sigma.to(w.device), cl, **({"return_logvar": True} if self.logvar else {})
        )
        d_out, u = out if self.logvar else (out, None)
        loss, per_sample = ambient.batch_loss(d_out.float(), b, self.cfg.ambient.sigma_data)
        if u is not None:  # EDM2 Sec. 2.5: the ambient loss ℓ(σ) weighted by 1/e^u(σ), plus u(σ)
            loss = (per_sample / u.reshape(-1).exp() + u.reshape(-1)).mean()
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
        if self.pools is not None:  # streaming: the share of the interval spent waiting for rows, over ranks
            waited = self.pools.wait_seconds - self.wait_seen
            self.wait_seen = self.pools.wait_seconds
            tot = w.all_reduce(torch.tensor([waited, seconds, float(self.pools.rows_held())], dtype=torch.float64))
            metrics["data_wait_fraction"] = float(tot[0] / tot[1].clamp(min=1e-9))
            extra["rows_held"] = float(tot[2])
        self.bucket_loss.zero_()
        self.bucket_n.zero_()
        self.seen = 0
        return metrics, extra

    def validation(self, w: engine.Worker) -> dict:
        """``val_loss`` (the mean over the fixed σ grid) and ``val_loss_sigma_<σ>``, over every rank's rows."""
        if self.val_rows is None:
            return {}
        rows, g = self.val_rows, torch.Generator().manual_seed(self.cfg.seed + 104729)
        if self.pools is not None:  # the rows this worker kept for validation when streaming began
            x = self.val["x"]
            y = self.latents.draw(x, g) if self.latents is not None else x.float() / 127.5 - 1.0
            lab = self.val["label"].to(w.device) if self.labels is not None else None
        else:
            y = ambient.clean_rows(self.images, rows, g)
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

    def grid(self, w: engine.Worker) -> bytes | None:
        """Collective under ZeRO-3 (the EMA is gathered a parameter at a time; rank 0 keeps it): on rank 0, a PNG
        of ``grid_images`` samples of the EMA weights, the same seed and class labels (0, 1, 2, ... cycled) at
        every step, so grids compare across steps; decoded by the run's VAE when it trains on latents."""
        from ambient_ray.io import plots
        from ambient_ray.stages.sample import draw, latent_decoder

        state = w.ema_weights()
        if state is None:
            return None
        meta = self.meta()
        with torch.random.fork_rng(devices=[]):  # the training's own random state is left as it was
            torch.manual_seed(self.cfg.seed)  # as the training network was built (fixed random buffers alike)
            net = registry.build(meta)
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(state[n])
            live = dict(w.engine.module.named_buffers())  # buffers are whole on every rank, at every ZeRO stage
            for n, b in net.named_buffers():
                if n in live:
                    b.copy_(live[n])
        net.meta = meta
        net = net.to(w.device).eval()
        if not hasattr(self, "decode"):  # the VAE is loaded once per run
            self.decode = latent_decoder(meta)
        c = self.cfg
        imgs = draw(net, c.grid_images, seed=c.seed, steps=c.grid_sampler_steps, device=w.device, decode=self.decode)
        return plots.image_grid_png(imgs)

    def progress(self, m: dict) -> str:
        return f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['images_per_s']:.0f} images/s"

    def state(self) -> dict[str, torch.Tensor]:
        return {f"sampler.{k}": v for k, v in self.sampler.state_dict().items()}

    def files(self) -> dict[str, str]:
        v = self.view
        return {"coverage.json": json.dumps({"donut": v.donut(), "redraws": v.coverage.redraws, "rows": v.n})}
