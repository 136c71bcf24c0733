"""The denoiser tasks' common part: everything a denoiser objective does but its loss. The rows (in memory, or
streamed into per-stratum pools), σ drawn first and paired with an eligible row (Ambient-o Sec. 3.1, App. D), the
row's own σ_n noise added, the conditioning (class labels, or captions with dropout and patch masking), σ-coverage
(the "donut"), per-source counters, the fixed-noise validation loss and the sample grids.

An objective subclasses :class:`DenoiserTask` and gives :meth:`DenoiserTask.objective`: the network's forward on a
drawn batch and the per-sample loss (:class:`~ambient_ray.train.tasks.ambient.AmbientTask` is Ambient-o's). Its
config is :class:`~ambient_ray.train.tasks.denoiser_config.TrainConfig`; its rows arrive as
:class:`~ambient_ray.train.tasks.denoiser_data.DenoiserRows`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from ambient_ray.diffusion import ambient, edm
from ambient_ray.models import registry
from ambient_ray.train.parts import Part
from ambient_ray.train.rows import load_rank_rows, stream_batches
from ambient_ray.train.tasks.denoiser_data import DenoiserRows, model_meta
from ambient_ray.train.worker import Worker

# a diverged run reports VAL_LOSS_CAP, not NaN or inf: schedulers compare with <, where NaN is never
# worse, and take percentiles, where inf makes NaN
VAL_LOSS_CAP = 1e12


class DenoiserTask:
    """A denoiser objective's task, less its loss (:meth:`objective`)."""

    name = "train"
    observed_noisy = False  # the rows hold their σ_n noise already (y = x_{σ_n}: objective noisy)

    def __init__(self, cfg, rows: DenoiserRows):
        self.cfg, self.rows = cfg, rows

    def parts(self) -> dict[str, Part]:
        return {"net": Part(self.build(), export=True)}

    def build(self) -> torch.nn.Module:
        return registry.build(self.meta())

    def meta(self) -> dict:
        return model_meta(self.cfg, self.rows.latents)

    def setup(self, w: Worker) -> None:
        self.pools = None
        self.wait_seen = 0.0
        if self.rows.stream:
            return self.setup_stream(w)
        cfg, rows = self.cfg, self.rows
        per_row = {"sigma_min": rows.sigma_min, "sigma_max": rows.sigma_max}
        if rows.sources:
            per_row["source"] = rows.source
        lat, cap = rows.latents, rows.captions
        tensor = ("latent", lat["latent_shape"]) if lat else None
        columns = {"caption_emb": cap["emb_shape"], "caption_mask": cap["emb_shape"][:1]} if cap else {}
        columns.update(self.extra_columns())
        label_dim = getattr(cfg.model, "label_dim", 0)
        self.ids, held, cols, self.labels = load_rank_rows(w.rank, w.world, per_row, label_dim, tensor, columns)
        self.columns = cols
        self.captions = (cols["caption_emb"], cols["caption_mask"]) if cap else None
        self.source = cols.get("source")
        # uint8 images, or latents (mean, std) drawn afresh at every use
        self.images = ambient.Latents(held, torch.tensor(lat["shift"]), torch.tensor(lat["scale"])) if lat else held
        self.smin, smax = cols["sigma_min"], cols["sigma_max"]
        a = cfg.ambient
        crop = ambient.CropTable(a.crop_sigmas, a.crop_sizes) if a.crop_sigmas else None
        kw = dict(lambda_max=self.lambda_max(), p_mean=a.p_mean, p_std=a.p_std, crop=crop)
        self.sampler = ambient.SigmaSampler(self.smin, smax, **kw)
        # rank 0's dataset-wide view for the σ donut: eligible counts over all rows, draws summed over ranks
        self.view = None
        self.source_views = []
        if w.rank == 0:
            all_min, all_max = (torch.tensor(list(d.values())) for d in (rows.sigma_min, rows.sigma_max))
            self.view = ambient.SigmaSampler(all_min, all_max, **kw)
            if rows.sources:  # the same ids in the same order as the annotations
                src = torch.tensor(list(rows.source.values()))
                self.source_views = [
                    ambient.SigmaSampler(all_min[src == k], all_max[src == k], **kw) if bool((src == k).any()) else None
                    for k in range(len(rows.sources))
                ]
        self.setup_sources()
        self.n_buckets = len(self.sampler.coverage.edges) - 1
        self.bucket_loss, self.bucket_n = torch.zeros(self.n_buckets), torch.zeros(self.n_buckets)
        self.seen = 0
        self.val_rows = None
        if cfg.report_every:  # this rank's first val_rows clean rows (σ_min = 0), or its first rows if none is clean
            clean = torch.nonzero(self.smin == 0).flatten()
            self.val_rows = (clean if len(clean) else torch.arange(len(self.smin)))[: cfg.val_rows]

    def setup_stream(self, w: Worker) -> None:
        """Streaming: this worker reads only its share (Ray Data ``streaming_split``) into bounded
        per-stratum pools (:mod:`ambient_ray.data.streaming`); σ-first pairing through the stratified
        sampler with the dataset-wide stratum counts (:mod:`ambient_ray.diffusion.stratified`)."""
        from ambient_ray.data import streaming
        from ambient_ray.data.images import decode_png
        from ambient_ray.diffusion import stratified

        cfg, st, lat = self.cfg, self.rows.stream, self.rows.latents
        a = cfg.ambient
        crop = ambient.CropTable(a.crop_sigmas, a.crop_sizes) if a.crop_sigmas else None
        table = stratified.strata_table(st["edges"])
        self.n_full = torch.zeros(len(table), dtype=torch.long)
        self.n_full[torch.tensor(st["strata"], dtype=torch.long)] = torch.tensor(st["counts"], dtype=torch.long)
        self.table, self.crop = table, crop
        self.sampler = self.stratified(self.n_full)
        self.view = self.stratified(self.n_full) if w.rank == 0 else None
        self.source_views = []
        if w.rank == 0 and self.rows.sources:  # each source's own stratum counts
            for part in st.get("sources", []):
                n = torch.zeros(len(table), dtype=torch.long)
                n[torch.tensor(part["strata"], dtype=torch.long)] = torch.tensor(part["counts"], dtype=torch.long)
                self.source_views.append(self.stratified(n) if int(n.sum()) else None)
        self.setup_sources()
        # pool sizes by each stratum's share of the draws (σ's drawn with a fixed seed: the same on every rank)
        g, sizing = torch.Generator().manual_seed(cfg.seed + 31337), self.stratified(self.n_full)
        probs = sizing.stratum_probs(sizing.sample(20_000, g)[0]).mean(0)
        caps = streaming.capacities(probs, self.sampler.active, cfg.stream.pool_rows)
        label_dim, shape = getattr(cfg.model, "label_dim", 0), lat["latent_shape"] if lat else None
        cap = self.rows.captions
        code = {name: i for i, name in enumerate(self.rows.sources)}
        fields = streaming.FIELDS + (("caption_emb", "caption_mask") if cap else ()) + (("source",) if code else ())

        def rows(batch: dict) -> dict:  # a Ray Data batch -> x (image uint8 CHW or latent), σ's, label[, captions]
            n = len(batch["id"])
            if lat:
                x = np.asarray(batch["latent"], dtype=np.float32).reshape(n, *shape)
            else:
                x = np.stack([decode_png(b).transpose(2, 0, 1) for b in batch["image"]])
            label = batch["label"] if label_dim and "label" in batch else np.zeros(n)
            out = {
                "x": x,
                "sigma_min": np.array(batch["sigma_min"], np.float32),  # copies: Ray's arrays are read-only
                "sigma_max": np.array(batch["sigma_max"], np.float32),
                "label": np.nan_to_num(np.asarray(label, np.float64)).astype(np.int64),
            }
            if cap:
                out["caption_emb"] = np.stack([np.asarray(e).reshape(cap["emb_shape"]) for e in batch["caption_emb"]])
                out["caption_mask"] = np.stack([np.asarray(m, np.uint8) for m in batch["caption_mask"]])
            if code:
                out["source"] = np.array([code.get(v, -1) for v in batch["source"]], np.int64)
            return out

        def stratum_of(batch: dict) -> np.ndarray:
            return stratified.strata_of(batch["sigma_min"], batch["sigma_max"], a.lambda_max, st["edges"])[0].numpy()

        stream = ((rows(b), e) for b, e in stream_batches(cfg.stream.read_batch))
        self.pools = streaming.StratumPools(
            stream, stratum_of, caps, torch.Generator().manual_seed(cfg.seed * 7 + w.rank), fields=fields
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

    def lambda_max(self) -> float:
        """The buffer's λ_max (Eq. D.2): σ > sqrt(1 + 1/(λ_max − 1))·σ_min; inf: σ > σ_min."""
        return self.cfg.ambient.lambda_max

    def extra_columns(self) -> dict[str, list[int]]:
        """More tensor columns an objective reads per row, ``{name: shape}`` (in memory: ``self.columns[name]``)."""
        return {}

    def setup_sources(self) -> None:
        """Per-source counters (data of several ``source`` values, or of several row kinds: ``rows.group``): loss,
        draws and σ coverage per source."""
        names = self.rows.sources
        edges = self.sampler.coverage.edges
        self.source_cov = [ambient.Coverage(edges) for _ in names]
        self.source_loss, self.source_n = torch.zeros(len(names)), torch.zeros(len(names))

    def count_sources(self, src: torch.Tensor, b: ambient.Batch, per_sample: torch.Tensor) -> None:
        for k, cov in enumerate(self.source_cov):
            m = src == k
            if bool(m.any()):
                cov.count(b.sigma[m], b.crop_size[m])
                self.source_loss[k] += float(per_sample[m].sum())
                self.source_n[k] += int(m.sum())

    def condition(self, w: Worker, labels, captions, train: bool) -> tuple[tuple, dict]:
        """The network's inputs after (x, σ): class labels, or for a network of captions the caption tokens and
        mask (in training, ``text.caption_dropout`` of them set to the null caption: zeros, no valid token) and
        the patches each image keeps (``text.mask_ratio``)."""
        if captions is None:
            return (labels.to(w.device) if labels is not None else None,), {}
        emb, mask = captions[0].float(), captions[1].float()
        kw = {}
        if train:
            t = self.cfg.text
            if t.caption_dropout:
                drop = torch.rand(len(emb), generator=w.generator) < t.caption_dropout
                emb, mask = emb.masked_fill(drop[:, None, None], 0.0), mask.masked_fill(drop[:, None], 0.0)
            if t.mask_ratio:
                from ambient_ray.models import dit

                kw["keep"] = dit.patch_keep(len(emb), self.cfg.model.tokens(), t.mask_ratio, w.generator).to(w.device)
        return (emb.to(w.device), mask.to(w.device)), kw

    def stratified(self, n: torch.Tensor):
        from ambient_ray.diffusion.stratified import StratifiedSigmaSampler

        a = self.cfg.ambient
        return StratifiedSigmaSampler(
            self.table[:, 0], self.table[:, 1], n, p_mean=a.p_mean, p_std=a.p_std, crop=self.crop
        )

    def stream_batch(self, w: Worker) -> tuple[ambient.Batch, torch.Tensor | None]:
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
        caps = (rows["caption_emb"], rows["caption_mask"]) if "caption_emb" in rows else None
        return b, rows["label"] if self.labels is not None else None, caps, rows.get("source")

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            prefix = "sampler."
            self.sampler.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            for k, cov in enumerate(self.source_cov):
                p = f"source.{k}."
                if any(key.startswith(p) for key in state):
                    cov.load_state_dict({key[len(p) :]: v for key, v in state.items() if key.startswith(p)})

    def loss(self, w: Worker, part: str = "net") -> torch.Tensor:
        """One micro-batch: σ first and its rows (:meth:`draw`), the conditioning, the objective's forward and loss
        (:meth:`objective`), then the interval's per-σ and per-source statistics."""
        b, cl, caps, src = self.draw(w)
        args, kw = self.condition(w, cl, caps, train=True)
        if "keep" in kw:  # MicroDiT: the loss counts only the patches the network kept
            from ambient_ray.models import dit

            m = self.cfg.model
            b.mask = b.mask * dit.patch_mask(kw["keep"], m.tokens(), m.patch, m.img_resolution)
        loss, per_sample = self.objective(w, b, args, kw)
        if src is not None and self.source_cov:
            self.count_sources(src, b, per_sample.detach().float().cpu())
        k = self.sampler.coverage.bucket(b.sigma)
        self.bucket_loss.index_add_(0, k, per_sample.detach().float().cpu())
        self.bucket_n.index_add_(0, k, torch.ones_like(b.sigma))
        self.seen += self.cfg.batch_size
        return loss

    def draw(self, w: Worker) -> tuple[ambient.Batch, torch.Tensor | None, tuple | None, torch.Tensor | None]:
        """A micro-batch: (the noised batch, class labels, captions, source codes), each None where absent."""
        if self.pools is not None:
            return self.stream_batch(w)
        b = ambient.ambient_batch(
            self.sampler, self.images, self.smin, self.cfg.batch_size, w.generator, self.observed_noisy
        )
        cl = self.labels[b.index] if self.labels is not None else None
        caps = (self.captions[0][b.index], self.captions[1][b.index]) if self.captions is not None else None
        src = self.source[b.index] if self.source is not None else None
        return b, cl, caps, src

    def objective(self, w: Worker, b: ambient.Batch, args: tuple, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective: the network's forward on batch ``b`` (conditioning ``args``, ``kw``) and (the loss to
        backpropagate, the per-sample loss for the statistics)."""
        raise NotImplementedError

    def interval(self, w: Worker, seconds: float) -> tuple[dict, dict]:
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
        if self.source_cov:  # per source: its loss and draws of the interval, its σ coverage so far
            names, nb = self.rows.sources, self.n_buckets
            parts = [self.source_loss, self.source_n]
            parts += [torch.cat([c.draws, c.full_draws, c.crop_draws]) for c in self.source_cov]
            tot = w.all_reduce(torch.cat(parts).double())
            s_loss, s_n, per = tot[: len(names)], tot[len(names) : 2 * len(names)], tot[2 * len(names) :]
            for k, name in enumerate(names):
                d, full, crop = per[k * 3 * nb : (k + 1) * 3 * nb].long().split(nb)
                group = self.rows.group
                if s_n[k] > 0:
                    extra[f"loss_{group}_{name}"] = float(s_loss[k] / s_n[k])
                extra[f"draws_{group}_{name}"] = float(s_n[k])
                if k < len(self.source_views) and self.source_views[k] is not None:
                    vc = self.source_views[k].coverage
                    vc.draws, vc.full_draws, vc.crop_draws = d, full, crop
            self.source_loss.zero_()
            self.source_n.zero_()
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

    def validation(self, w: Worker) -> dict:
        """``val_loss`` (the mean over the fixed σ grid) and ``val_loss_sigma_<σ>``, over every rank's rows."""
        if self.val_rows is None:
            return {}
        rows, g = self.val_rows, torch.Generator().manual_seed(self.cfg.seed + 104729)
        if self.pools is not None:  # the rows this worker kept for validation when streaming began
            x = self.val["x"]
            y = self.latents.draw(x, g) if self.latents is not None else x.float() / 127.5 - 1.0
            lab = self.val["label"] if self.labels is not None else None
            caps = (self.val["caption_emb"], self.val["caption_mask"]) if "caption_emb" in self.val else None
        else:
            y = ambient.clean_rows(self.images, rows, g)
            lab = self.labels[rows] if self.labels is not None else None
            caps = (self.captions[0][rows], self.captions[1][rows]) if self.captions is not None else None
        args, _ = self.condition(w, lab, caps, train=False)
        was_training = w.engine.module.training
        w.engine.module.eval()
        sums = edm.validation_losses(
            lambda x, s, _c: w.engine(x.to(w.device), s.to(w.device), *args),
            y,
            sigma_data=self.cfg.ambient.sigma_data,
            seed=self.cfg.seed + 7919,
        )
        w.engine.module.train(was_training)
        total = w.all_reduce(torch.cat([sums, torch.tensor([float(len(rows))])]).double())
        per_sigma = total[:-1] / total[-1].clamp(min=1)
        vals = [min(v, VAL_LOSS_CAP) if math.isfinite(v) else VAL_LOSS_CAP for v in per_sigma.tolist()]
        out = {f"val_loss_sigma_{s:g}": v for s, v in zip(edm.VAL_SIGMAS, vals)}
        out["val_loss"] = float(sum(vals) / len(vals))
        return out

    def grid(self, w: Worker) -> bytes | None:
        """Collective under ZeRO-3 (the EMA is gathered a parameter at a time; rank 0 keeps it): on rank 0, a PNG
        of ``grid_images`` samples of the EMA weights, the same seed and class labels (0, 1, 2, ... cycled) at
        every step, so grids compare across steps; decoded by the run's VAE when it trains on latents."""
        from ambient_ray.io import plots
        from ambient_ray.sampling import SamplerConfig
        from ambient_ray.sampling.decode import latent_decoder
        from ambient_ray.sampling.draw import draw

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
        kw, sampler = {}, SamplerConfig(steps=c.grid_sampler_steps)  # EDM's Heun sampler
        if meta.get("masked"):  # a network of masked data samples behind masks at Ã's density (seed 003 Eq. 3.3)
            sampler = SamplerConfig(name="fixed-mask", steps=c.grid_sampler_steps)
        if self.rows.captions:  # the fixed prompts (or the first rows' captions), with CFG
            kw = {"captions": self.grid_captions(meta)}
            sampler = SamplerConfig(name="classifier-free", steps=c.grid_sampler_steps, guidance=c.text.guidance)
        imgs = draw(net, c.grid_images, sampler, seed=c.seed, device=w.device, decode=self.decode, **kw)
        return plots.image_grid_png(imgs)

    def grid_captions(self, meta: dict):
        """The grids' captions: ``text.prompts`` through the run's text encoder (loaded once), else the caption
        embeddings of this rank's first rows (the validation rows when streaming); None: the null caption."""
        if not hasattr(self, "_grid_captions"):
            from ambient_ray.sampling import encode_prompts

            val = getattr(self, "val", {})
            rows = self.captions if self.pools is None else (val.get("caption_emb"), val.get("caption_mask"))
            if self.cfg.text.prompts:
                self._grid_captions = encode_prompts(meta, self.cfg.text.prompts)
            elif rows is not None and rows[0] is not None:
                n = self.cfg.grid_images
                self._grid_captions = (rows[0][:n].float(), rows[1][:n].float())
            else:
                self._grid_captions = None
        return self._grid_captions

    def progress(self, m: dict) -> str:
        return f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['images_per_s']:.0f} images/s"

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"sampler.{k}": v for k, v in self.sampler.state_dict().items()}
        for i, cov in enumerate(self.source_cov):
            out.update({f"source.{i}.{k}": v for k, v in cov.state_dict().items()})
        return out

    def files(self) -> dict[str, str]:
        v = self.view
        cov = {"donut": v.donut(), "redraws": v.coverage.redraws, "rows": v.n}
        if self.source_views:  # each source's donut: its own eligible rows, and the draws paired with them
            cov["group"] = self.rows.group
            cov["sources"] = {
                name: {"donut": sv.donut(), "rows": sv.n}
                for name, sv in zip(self.rows.sources, self.source_views)
                if sv is not None
            }
        return {"coverage.json": json.dumps(cov)}
